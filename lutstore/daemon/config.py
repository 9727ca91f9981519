"""What `lutstore serve` runs with: one object, its defaults and its checks in one place.

The CLI's serve flags are its fields (same names, defaults from here); lutstore.daemon.run.serve
takes one. A check that fails is a UserError naming the flag. Imports no gRPC: the CLI reads the
defaults when it builds its parser.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

from lutstore.errors import UserError
from lutstore.formats.protocol import is_loopback_host

MiB = 1 << 20


@dataclass(frozen=True)
class DaemonConfig:
    db: str | Path                        # a RocksDB folder or a cluster URL (lutstore.storage.backends)
    host: str = "127.0.0.1"               # loopback only unless told otherwise
    port: int = 50051                     # 0: a free one, printed
    cache_mb: float = 1024                # hot-row LRU
    max_batch_rows: int = 4096            # token ids in one BatchGet
    max_message_mb: float = 8             # largest gRPC message sent or received
    max_concurrent_streams: int = 64      # RPCs in flight per connection
    workers: int = 16                     # server threads
    max_sessions: int | None = None       # open BatchGetStream sessions; None: workers // 2 (at least 1)
    refresh_seconds: float = 1.0          # how often to look for newly ingested tables
    max_concurrent_rpcs: int = 256        # RPCs in flight over all connections
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth_token: str | None = None
    auth_token_file: Path | None = None
    allow_shared_memory: bool = False     # answer BatchGetShared (loopback hosts only)
    max_response_mb: float = 64           # response bytes being built or sent at once, all calls together
    stalled_send_seconds: float = 20.0    # cancel a stream whose reader took no message for this long
    metrics_port: int | None = None       # Prometheus /metrics; None: off
    metrics_host: str = "127.0.0.1"
    log_format: str = "text"              # or "json"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DaemonConfig:
        """From `lutstore serve`'s parsed flags (every field is a flag of the same name)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    @classmethod
    def default(cls, name: str):
        """A field's default, for the flag that sets it."""
        return cls.__dataclass_fields__[name].default

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * MiB)

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_mb * MiB)

    @property
    def response_budget_bytes(self) -> int:
        return int(self.max_response_mb * MiB)

    @property
    def sessions(self) -> int:
        return self.max_sessions if self.max_sessions is not None else max(1, self.workers // 2)

    def check(self) -> None:
        """UserError naming the flag whose value cannot work."""
        if self.max_batch_rows < 1:
            raise UserError(f"--max-batch-rows must be >= 1, got {self.max_batch_rows}")
        if self.max_message_mb <= 0:
            raise UserError(f"--max-message-mb must be > 0, got {self.max_message_mb}")
        if self.cache_mb < 0:
            raise UserError(f"--cache-mb must be >= 0, got {self.cache_mb}")
        if self.workers < 1 or self.max_concurrent_streams < 1:
            raise UserError("--workers and --max-concurrent-streams must be >= 1")
        if self.refresh_seconds <= 0:
            raise UserError(f"--refresh-seconds must be > 0, got {self.refresh_seconds}")
        if not 0 <= self.port < 65536:
            raise UserError(f"--port must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise UserError(f"--metrics-port must be in 0..65535, got {self.metrics_port}")
        if self.max_sessions is not None and not 0 <= self.max_sessions < self.workers:
            raise UserError(f"--max-sessions must be 0..{self.workers - 1} (below --workers: each open session holds "
                            f"a server thread), got {self.max_sessions}")
        if self.max_concurrent_rpcs < 1:
            raise UserError(f"--max-concurrent-rpcs must be >= 1, got {self.max_concurrent_rpcs}")
        if self.max_response_mb <= 0:
            raise UserError(f"--max-response-mb must be > 0, got {self.max_response_mb}")
        if self.stalled_send_seconds <= 0:
            raise UserError(f"--stalled-send-seconds must be > 0, got {self.stalled_send_seconds}")
        if self.allow_shared_memory and not is_loopback_host(self.host):
            raise UserError(f"--allow-shared-memory serves same-host clients only: it needs a loopback --host, "
                            f"not {self.host}")
