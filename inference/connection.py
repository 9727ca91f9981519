"""Reaching a lutstore daemon: the settings every front end shares, and opening a table.

Three kinds of front end reach a daemon, all through this module:
  - the CLIs (inference.generate, evaluate, serve): `add_remote_args` adds the flags,
    `LutstoreSettings.from_args` reads them, `connect` opens the backbone and the table;
  - the engines' model classes (the vLLM plugin, the transformers model): they bring
    their own backbone (a checkpoint folder) and need only the rows. They take the
    same settings as a mapping (`LutstoreSettings.from_mapping`: the `lutstore` key of
    a model config or of vLLM's --hf-overrides) and call `open_table`;
  - scripts: `LutstoreSettings(addr=...)` directly.

Defaults are inference.generate's; the keys of the mapping form are the field names
of LutstoreSettings (addr, table, version, cache_mb, retry_seconds, timeout, tls_ca,
token_file, shared_memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from lutstore.client.address import parse_addresses, why_unreachable
from lutstore.errors import LutError, UserError

DEFAULT_CACHE_MB = 256
DEFAULT_RETRY_SECONDS = 10.0
DEFAULT_TIMEOUT = 30.0
SHARED_MEMORY_CHOICES = {"auto": "auto", "on": True, "off": False}


@dataclass(frozen=True)
class LutstoreSettings:
    """Where a table's rows come from, and how the client behaves."""

    addr: str                              # host:port, or h1:p,h2:p for replicas
    table: str | None = None               # None: the only table the daemon serves
    version: int = 0                       # 0: the latest (pinned once resolved)
    cache_mb: float = DEFAULT_CACHE_MB     # device memory budget of the row cache (MiB)
    retry_seconds: float = DEFAULT_RETRY_SECONDS   # how long an unreachable daemon is retried
    timeout: float = DEFAULT_TIMEOUT       # seconds per call
    tls_ca: Path | None = None             # PEM CA certificate: TLS, trusting this CA
    token_file: Path | None = None         # file holding the bearer token the daemon asks for
    token: str | None = dataclasses.field(default=None, repr=False)   # the token itself (CLI --auth-token)
    shared_memory: str = "auto"            # auto | on | off (same-host fast path)

    def __post_init__(self) -> None:
        parse_addresses(self.addr)   # UserError naming the bad part
        if not isinstance(self.version, int) or isinstance(self.version, bool) or not 0 <= self.version < 1 << 32:
            raise UserError(f"table version must be an integer in 0..2^32-1 (0: the latest), not {self.version!r}")
        for name in ("cache_mb", "retry_seconds", "timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise UserError(f"lutstore {name} must be a number >= 0, not {value!r}")
        if self.timeout == 0:
            raise UserError("lutstore timeout must be > 0 seconds")
        if self.shared_memory not in SHARED_MEMORY_CHOICES:
            raise UserError(f"lutstore shared_memory must be one of {', '.join(SHARED_MEMORY_CHOICES)}, "
                            f"not {self.shared_memory!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "lutstore settings") -> LutstoreSettings:
        """Settings from a JSON-like mapping (a model config's `lutstore` key); unknown keys are refused
        by name, so a typo never silently falls back to a default."""
        if not isinstance(values, Mapping):
            raise UserError(f"{where} must be a mapping like {{\"addr\": \"HOST:PORT\", \"table\": \"NAME\"}}, "
                            f"not {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                            f"known keys: {', '.join(sorted(known))}")
        if not values.get("addr"):
            raise UserError(f"{where} needs \"addr\": the daemon's HOST:PORT (or h1:p,h2:p)")
        kwargs = dict(values)
        for key in ("tls_ca", "token_file"):
            if kwargs.get(key) is not None:
                kwargs[key] = Path(kwargs[key]).expanduser()
        if isinstance(kwargs.get("version"), float) and kwargs["version"].is_integer():
            kwargs["version"] = int(kwargs["version"])
        return cls(**kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LutstoreSettings:
        """Settings from the flags of add_remote_args."""
        if not args.lut_addr:
            raise UserError("--lut-addr is required (the address of a `lutstore serve` daemon, e.g. 127.0.0.1:50051)")
        return cls(addr=args.lut_addr, table=args.table, version=args.version, cache_mb=args.lut_cache_mb,
                   retry_seconds=args.retry_seconds, tls_ca=args.tls_ca, token_file=args.auth_token_file,
                   token=args.auth_token, shared_memory=args.shared_memory)

    def to_mapping(self) -> dict[str, Any]:
        """The JSON form (for a config file); never includes a literal token."""
        out: dict[str, Any] = {"addr": self.addr}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("addr", "token") or value == f.default:
                continue
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments of LutClient / open_remote for TLS, the token and shared memory."""
        from lutstore.security import read_token

        return {"tls_ca": self.tls_ca, "auth_token": read_token(self.token, self.token_file),
                "shared_memory": SHARED_MEMORY_CHOICES[self.shared_memory]}

    def retries(self) -> int:
        """Enough retries (backoff <= 1 s each) to last the whole retry_seconds budget."""
        return 5 + math.ceil(self.retry_seconds)

    def why_unreachable(self) -> str | None:
        """None if a TCP connection to the address (any replica) opens within half a second; else why
        not ("Connection refused", "no answer yet", "cannot resolve ...")."""
        return why_unreachable(parse_addresses(self.addr))

    def say_if_unreachable(self, prog: str) -> None:
        """One line on stderr at once when nothing answers at the address yet (the caller then
        retries for retry_seconds), so a user does not stare at silence."""
        reason = self.why_unreachable()
        if reason:
            print(f"{prog}: connecting to {self.addr} ({reason}; retrying for {self.retry_seconds:g} s)",
                  file=sys.stderr, flush=True)


def add_remote_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by generate, evaluate and serve for reaching a daemon."""
    p.add_argument("--lut-addr", help="lutstore daemon address host:port, e.g. 127.0.0.1:50051 "
                                      "(or h1:p,h2:p for replicas)")
    p.add_argument("--table", help="table name (default: the only table the daemon serves)")
    p.add_argument("--version", type=int, default=0, help="table version (default: 0, the latest)")
    p.add_argument("--backbone", type=Path,
                   help="use this local backbone folder instead of the fetched one (checked against the table's "
                        "sha256s; default: fetched once into $LUTSTORE_CACHE/<fingerprint>, else "
                        "~/.cache/lutstore/<fingerprint>)")
    p.add_argument("--lut-cache-mb", type=float, default=DEFAULT_CACHE_MB,
                   help="device memory budget of the row cache (MiB)")
    p.add_argument("--retry-seconds", type=float, default=DEFAULT_RETRY_SECONDS,
                   help="how long to retry an unreachable daemon")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default float32, as the official loader)")
    p.add_argument("--tls-ca", type=Path, help="PEM CA certificate: connect with TLS, trusting this CA (default plaintext)")
    p.add_argument("--auth-token", help="bearer token the daemon asks for (visible in `ps`: prefer --auth-token-file)")
    p.add_argument("--auth-token-file", type=Path, help="read the bearer token from this file")
    p.add_argument("--shared-memory", choices=list(SHARED_MEMORY_CHOICES), default="auto",
                   help="same-host fast path (daemon started with --allow-shared-memory): auto uses it for loopback "
                        "addresses when the daemon allows it, else plain BatchGet; on fails at start unless the "
                        "daemon allows it")


def client_options(args: argparse.Namespace) -> dict:
    """TLS, token and shared-memory keyword arguments of open_remote from the flags of add_remote_args."""
    return LutstoreSettings.from_args(args).client_options()


def _check_shared_memory(remote, settings: LutstoreSettings, what: str) -> None:
    """Shared memory "on" means fail now, not quietly fall back later: one row through BatchGetShared."""
    try:
        remote.client.get_payloads(remote.info.name, [0], remote.info.version)
    except LutError as e:
        raise UserError(f"{what}: the daemon at {settings.addr} refused it ({e.message}); "
                        f"start it with --allow-shared-memory on this host, or use auto") from None


def connect(prog: str, args: argparse.Namespace, device: str, dtype: torch.dtype):
    """open_remote (backbone + table) for the flags of add_remote_args: the address checked at once,
    a line on stderr while an unreachable daemon is retried, --shared-memory on checked against the daemon."""
    from inference.backbone import open_remote

    settings = LutstoreSettings.from_args(args)
    settings.say_if_unreachable(prog)
    remote = open_remote(settings.addr, settings.table, settings.version, device, dtype, settings.cache_mb,
                         args.backbone, settings.retry_seconds, **settings.client_options())
    if settings.shared_memory == "on":
        try:
            _check_shared_memory(remote, settings, "--shared-memory on")
        except BaseException:
            remote.close()
            raise
    return remote


@dataclass
class OpenTable:
    """A served table opened for an engine that brings its own backbone: the client, the pinned
    table's info and its RemoteTable (one per process, shared by every request)."""

    client: Any     # lutstore.client.LutClient
    info: Any       # lutstore.v1 TableInfo, version pinned
    source: Any     # inference.lut.RemoteTable

    def close(self) -> None:
        self.source.close()
        self.client.close()


def open_table(settings: LutstoreSettings, device: str | torch.device = "cpu", prog: str = "lutstore") -> OpenTable:
    """Connect, resolve the table (the only one when settings.table is None; errors list what exists),
    pin its version, open a RemoteTable on device. UserError/LutError are one-line reasons."""
    from inference.backbone import pick_table
    from inference.lut import MiB, RemoteTable
    from lutstore.client import LutClient

    settings.say_if_unreachable(prog)
    client = LutClient(settings.addr, timeout=settings.timeout, retries=settings.retries(),
                       retry_seconds=settings.retry_seconds, **settings.client_options())
    try:
        info = pick_table(client, settings.table, settings.version)
        source = RemoteTable(client, info.name, int(info.version), device, cache_bytes=int(settings.cache_mb * MiB))
        opened = OpenTable(client, info, source)
        if settings.shared_memory == "on":
            try:
                _check_shared_memory(opened, settings, 'shared_memory "on"')
            except BaseException:
                source.close()
                raise
    except BaseException:
        client.close()
        raise
    return opened
