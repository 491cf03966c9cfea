"""Stream-processor query side: Bytewax dataflow, local RocksDB store and interactive queries."""
