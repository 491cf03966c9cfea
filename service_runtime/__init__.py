"""Service plumbing every HTTP service here shares: the uvicorn server it runs on
(:mod:`service_runtime.server`), one JSON error shape, health and metrics routes
(:mod:`service_runtime.http`) and the settings base (:mod:`service_runtime.settings`).

Example::

    from service_runtime.server import load_settings, run_service

    settings = load_settings(MutatorSettings)          # None: invalid, said on stderr
    run_service(settings, create_app, lambda s: (s.mutator_host, s.mutator_port),
                lambda s: f"Kafka {s.kafka_bootstrap_servers}")

The data contracts (schemas, serdes, key encoding, partitioner, topics, the id rule)
live apart, in :mod:`shared_schemas`, which imports nothing of the web stack.
"""
