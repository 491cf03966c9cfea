# One image for every service of the project; docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared_schemas ./shared_schemas
COPY service_runtime ./service_runtime
COPY inventory_mutator ./inventory_mutator
COPY sellable_calculator ./sellable_calculator
COPY sellable_service ./sellable_service
# Only what runs: no tests, benchmarks, comparison or local stack. No [embedded] extra:
# in compose, Kafka and Cassandra are real servers of their own.
RUN find . -type d -name tests -prune -exec rm -rf {} + && pip install .

# Calculator state (its RocksDB store) lives in the container: a new container restores
# its partitions from the changelog topic.
ENV CALCULATOR_STATE_DIR=/var/lib/sellable-calculator
RUN useradd --create-home --uid 10001 app \
    && mkdir -p /var/lib/sellable-calculator && chown app /var/lib/sellable-calculator
USER app
