"""The live console: a web page that posts to the mutator, shows every watched key on
every calculator instance and on the Cassandra service side by side as it converges,
who owns which partition, and (under ``make up``) stops and starts a calculator to watch
the failover.

Example::

    python -m console                 # http://localhost:9090/ (make up starts it)

Where to read on: ``app.py`` (the routes and the event stream), ``state.py`` (what is
gathered from the backends, and how a write is chased), ``control.py`` (stopping and
starting instances, and when that is allowed), ``static/`` (the page: HTML, one script,
one style sheet; no build step, nothing loaded from elsewhere).
"""
