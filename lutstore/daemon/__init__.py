"""`lutstore serve`: the gRPC servicer and what stands around it (row source, limits, health,
metrics, logs, the shared-memory server side). Reads tables through lutstore.storage."""
