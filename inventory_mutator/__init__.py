"""Command side: FastAPI service that turns adjustments and reservations into Kafka events."""
