"""Where tables live: the store interface, one module per backend (RocksDB, Redis Cluster
protocol) and the choice of backend from a --db value. Never imports the daemon or the client."""
