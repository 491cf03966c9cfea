"""Makes the embedded-infrastructure fixtures available to every test."""

pytest_plugins = ["local_stack.pytest_plugin"]
