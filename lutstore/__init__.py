"""lutstore: serve Mixture-of-Lookup-Experts tables from RocksDB over gRPC."""

__version__ = "0.1.0"
