"""Read-model query side: consumes ``sellable_inventory`` into Cassandra and serves it."""
