"""The embedded infrastructure (and, with ``up``, the whole system) as local processes.

Example::

    from local_stack.broker import EmbeddedBroker
    from local_stack.cassandra import EmbeddedCassandra

    with EmbeddedBroker(port=9092) as broker, EmbeddedCassandra(port=9042) as cassandra:
        print(broker.bootstrap_servers, cassandra.contact_points, cassandra.port)

From the shell: ``python -m local_stack up`` (what ``make up`` runs), or ``broker``,
``cassandra``, ``infra``, ``fetch``; ``--help`` lists the options. Downloads, data and
logs live under ``.local/`` (``LOCAL_STACK_HOME`` moves it).
"""
