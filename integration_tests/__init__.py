"""End-to-end tests against the whole running system."""
