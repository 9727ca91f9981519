"""Prometheus metrics of the daemon (served on --metrics-port when given)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# Buckets from 100 us to 10 s: a hot one-row BatchGet is sub-millisecond.
_LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """One registry per server, so several servers in one process don't collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lutstore_requests", "RPCs answered, by method and status code", ["method", "code"], registry=r)
        self.latency = Histogram("lutstore_request_seconds", "RPC latency, by method", ["method"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.rows = Counter("lutstore_rows_served", "Rows sent, by table", ["table"], registry=r)
        self.bytes = Counter("lutstore_bytes_served", "Row bytes sent, by table", ["table"], registry=r)
        self.cache_hits = Counter("lutstore_cache_hits", "Row lookups answered from the RAM cache", registry=r)
        self.cache_misses = Counter("lutstore_cache_misses", "Row lookups that went to RocksDB", registry=r)
        self.cache_bytes = Gauge("lutstore_cache_bytes", "Bytes held by the RAM row cache", registry=r)
        self.cache_hit_ratio = Gauge("lutstore_cache_hit_ratio", "Cache hits / lookups since start", registry=r)
        self.auth_rejects = Counter("lutstore_auth_rejected", "RPCs rejected for a missing or wrong token", registry=r)

    def observe_cache(self, hits: int, misses: int, held_bytes: int) -> None:
        self.cache_hits.inc(hits)
        self.cache_misses.inc(misses)
        self.cache_bytes.set(held_bytes)
        total = self.cache_hits._value.get() + self.cache_misses._value.get()
        self.cache_hit_ratio.set(self.cache_hits._value.get() / total if total else 0.0)

    def serve_http(self, host: str, port: int) -> int:
        """Expose /metrics; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound = server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound
