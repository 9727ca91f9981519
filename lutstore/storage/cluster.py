"""Tables in a Valkey / Redis Cluster (redis-py's RedisCluster), behind the same
store interface as the RocksDB backend (lutstore.storage.api.TableStore).

Keys (NS is the URL's `namespace`, default "lut"):

    NS:r:TABLE_ID:TOKEN_ID            -> stored row value (codec: payload || crc32), byte-identical to RocksDB's
    NS:a:TABLE_ID:INDEX:CHUNK         -> artifact bytes, 4 MiB chunks
    {NS}:manifest   hash  TABLE_ID -> TableMeta JSON (the same JSON as RocksDB's manifest)
    {NS}:counters   hash  next_table_id, v:NAME -> highest version ever published (never reused)
    {NS}:pending    hash  TABLE_ID -> what an unfinished ingest (or drop) may have written
    {NS}:lease:TABLE_ID   a key with a TTL, kept alive by the ingest that owns TABLE_ID

Row and artifact keys have no hash tag, so they spread over all 16384 slots
(a few hash tags would land unevenly and make slots too big to move). The
{NS} keys share one slot, so publishing is one atomic Lua script: rows are
written first, then the manifest entry appears together with the version
counter, and the pending marker goes (after WAIT: the replicas hold the rows). An ingest killed before that leaves a
pending marker whose lease expires; the next ingest or drop deletes what it
names. Reads group a batch by the node serving each key's slot and send one
pipelined round trip of GETs per node and chunk (at most PIPELINE_BYTES of
rows per round trip), all nodes in parallel. A node that cannot be reached is
retried (slot map refreshed: a failover moves slots) for `retry_seconds`, then
the rows it holds fail with StoreUnavailable naming the node and its slots.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import ssl
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal
from urllib.parse import parse_qs, urlsplit

import redis
from redis.cluster import ClusterNode, LoadBalancingStrategy, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from lutstore.formats.codec import RowFormat
from lutstore.storage.model import (StoreBase, StoreError, StoreUnavailable, TableMeta, TableWriterBase, check_complete,
                                    check_new_table)

log = logging.getLogger(__name__)

PIPELINE_BYTES = 8 << 20  # rows per round trip per connection: bounds a node's output buffer per reply
DEFAULT_PASSWORD_ENV = "LUTSTORE_CLUSTER_PASSWORD"
_RETRYABLE_REPLIES = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "LOADING", "MASTERDOWN", "READONLY")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# Publish a version: only if its ingest still holds its lease and pending marker, and only
# with a version above every version ever published under that name (else: that version).
_PUBLISH = """
if redis.call('EXISTS', KEYS[4]) == 0 or redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then return -1 end
local cur = tonumber(redis.call('HGET', KEYS[2], 'v:' .. ARGV[2]) or '0')
if cur >= tonumber(ARGV[3]) then return cur end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[2], 'v:' .. ARGV[2], ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4])
return 0
"""
# Unpublish a version and leave a pending marker for its rows, in one step.
_UNPUBLISH = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""


# ---- configuration ----------------------------------------------------------

@dataclass
class ClusterConfig:
    """`redis-cluster://HOST:PORT[,HOST:PORT...][?OPTIONS]` (`rediss-cluster://`: TLS). Options:
    namespace=NAME (key prefix, default lut), username=NAME, password_file=PATH or password_env=VAR
    (default: $LUTSTORE_CLUSTER_PASSWORD if set; never the password itself), tls_ca_file=PATH,
    tls_cert_file=PATH, tls_key_file=PATH (TLS only: refused with redis-cluster://, where they would
    send the password in the clear), tls_check_hostname=0 (verify the chain but not that the
    certificate names the host the cluster announces; default 1), read_from_replicas=1,
    retry_seconds=S (how long a read or write waits for a failover before UNAVAILABLE, default 5),
    lease_seconds=S (an ingest that stops renewing its lease this long is a leftover, default 30),
    timeout_seconds=S (socket, default 10)."""

    seeds: list[tuple[str, int]]
    namespace: str = "lut"
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_check_hostname: bool = True
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    read_from_replicas: bool = False
    retry_seconds: float = 5.0
    lease_seconds: float = 30.0
    timeout_seconds: float = 10.0

    @classmethod
    def from_url(cls, url: str) -> ClusterConfig:
        parts = urlsplit(url)
        if parts.scheme not in ("redis-cluster", "rediss-cluster"):
            raise StoreError(f"cluster URL must start with redis-cluster:// or rediss-cluster://, got {url!r}")
        if "@" in parts.netloc:
            raise StoreError("do not put credentials in the cluster URL (it shows in `ps`); use "
                             "?password_file=PATH or ?password_env=VAR")
        seeds = []
        for seed in filter(None, parts.netloc.split(",")):
            host, _, port = seed.rpartition(":")
            if not host or not port.isdigit():
                raise StoreError(f"bad seed node {seed!r} in cluster URL: use HOST:PORT[,HOST:PORT...]")
            seeds.append((host.strip("[]"), int(port)))
        if not seeds:
            raise StoreError("cluster URL names no seed node: use redis-cluster://HOST:PORT[,HOST:PORT...]")
        q = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        known = {"namespace", "username", "password_file", "password_env", "tls", "tls_ca_file", "tls_cert_file",
                 "tls_key_file", "tls_check_hostname", "read_from_replicas", "retry_seconds", "lease_seconds",
                 "timeout_seconds"}
        if "password" in q:
            raise StoreError("the cluster URL must not carry the password; use ?password_file=PATH or ?password_env=VAR")
        unknown = sorted(set(q) - known)
        if unknown:
            raise StoreError(f"unknown cluster URL option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        cfg = cls(seeds=seeds, tls=parts.scheme == "rediss-cluster" or q.get("tls", "0") in ("1", "true", "yes"))
        cfg.namespace = q.get("namespace", cfg.namespace)
        if not _NAMESPACE.match(cfg.namespace):
            raise StoreError(f"bad namespace {cfg.namespace!r}: 1-64 of A-Z a-z 0-9 _ . -")
        cfg.username = q.get("username") or None
        cfg.tls_ca_file, cfg.tls_cert_file, cfg.tls_key_file = (q.get(k) or None for k in (
            "tls_ca_file", "tls_cert_file", "tls_key_file"))
        cfg.tls_check_hostname = q.get("tls_check_hostname", "1") not in ("0", "false", "no")
        given = [k for k in ("tls_ca_file", "tls_cert_file", "tls_key_file", "tls_check_hostname") if k in q]
        if given and not cfg.tls:
            raise StoreError(f"{', '.join(given)} given, but {parts.scheme}:// is plain TCP (the password would go "
                             f"in the clear): use rediss-cluster:// for TLS")
        if cfg.tls:
            _check_tls_files(cfg)
        cfg.read_from_replicas = q.get("read_from_replicas", "0") in ("1", "true", "yes")
        for name in ("retry_seconds", "lease_seconds", "timeout_seconds"):
            if name in q:
                try:
                    value = float(q[name])
                except ValueError:
                    value = -1
                if value <= 0:
                    raise StoreError(f"cluster URL option {name} must be a number > 0, got {q[name]!r}")
                setattr(cfg, name, value)
        cfg.password = _read_password(q.get("password_file"), q.get("password_env"))
        return cfg

    def describe(self) -> str:
        seeds = ",".join(f"{h}:{p}" for h, p in self.seeds)
        return f"cluster {seeds} (namespace {self.namespace})"


def _check_tls_files(cfg: ClusterConfig) -> None:
    """Load the CA and the client certificate once up front, so a missing or wrong file is named
    as such (not reported later as an unreachable cluster)."""
    if cfg.tls_key_file and not cfg.tls_cert_file:
        raise StoreError("tls_key_file needs tls_cert_file (the client certificate)")
    context = ssl.create_default_context()
    for option, load in (("tls_ca_file", lambda: context.load_verify_locations(cafile=cfg.tls_ca_file)),
                         ("tls_cert_file", lambda: context.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file,
                                                                            password=_no_key_password))):
        path = getattr(cfg, option)
        if not path:
            continue
        try:
            load()
        except OSError as e:  # ssl.SSLError is an OSError too, but has no strerror
            if isinstance(e, ssl.SSLError) or not e.strerror:
                what = "a PEM CA certificate" if option == "tls_ca_file" else \
                    "a PEM certificate and its unencrypted private key (tls_key_file, if apart)"
                raise StoreError(f"{option} {path}: not {what} ({e})") from None
            raise StoreError(f"cannot read {option} {e.filename or path}: {e.strerror}") from None


def _no_key_password() -> str:
    # An encrypted key would otherwise make OpenSSL prompt on the terminal (a daemon has none).
    raise StoreError("tls_key_file is encrypted; give an unencrypted key (readable by this user only)")


def _causes(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while error is not None and len(chain) < 8:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _connect_failure(error: BaseException, cfg: ClusterConfig) -> str:
    """A one-line reason for a failed connection that says what to check: the TLS verification,
    a client certificate, or TLS vs plain TCP (both sides of that mismatch only show up as a
    closed connection, a timeout or garbage)."""
    chain = _causes(error)
    verify = next((e for e in chain if isinstance(e, ssl.SSLCertVerificationError)), None)
    if verify is not None:
        reason = verify.verify_message or str(verify)
        if "mismatch" in reason.lower():
            return (f"TLS certificate verification failed: {reason} (a node's certificate must name the host "
                    f"or IP the cluster announces; tls_check_hostname=0 skips only that check)")
        trusted = f"tls_ca_file {cfg.tls_ca_file}" if cfg.tls_ca_file else "the system's CAs (set tls_ca_file)"
        return f"TLS certificate verification failed: {reason}; is the cluster's certificate signed by {trusted}?"
    tls_error = next((e for e in chain if isinstance(e, ssl.SSLError)), None)
    text = " ".join(str(e) for e in chain)
    if tls_error is not None:
        reason = tls_error.reason or str(tls_error)
        if "ALERT" in reason or "CERTIFICATE" in reason:
            return (f"TLS handshake refused ({reason}): the nodes may require a client certificate "
                    f"signed by a CA they trust (tls_cert_file, tls_key_file)")
        return f"TLS handshake failed ({reason}): does the cluster speak TLS? (plain TCP: redis-cluster://)"
    if cfg.tls and "handshake" in text and "timed out" in text:
        return (f"no TLS handshake answer within {min(cfg.timeout_seconds, 5.0):g} s: the nodes may speak plain "
                f"TCP (then use redis-cluster://)")
    if "Connection closed by server" in text or "Protocol error" in text:
        if cfg.tls:  # a TLS server refusing a client certificate may just close (no alert)
            given = "not trust tls_cert_file" if cfg.tls_cert_file else \
                "require a client certificate (tls_cert_file, tls_key_file)"
            return (f"a node closed the connection after the TLS handshake: it may {given} (or a TLS "
                    f"proxy in front of it cannot reach it)")
        return ("a node closed the connection (or did not answer in RESP) as a TLS server does to plain TCP: if "
                "the cluster speaks TLS, use rediss-cluster://")
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _auth_refused(cfg: ClusterConfig, reason: str) -> StoreError:
    """The cluster refused us: with no password given, say it needs one and how to give it (its
    own reply, e.g. "HELLO must be called with the client already authenticated", says neither)."""
    if cfg.password is None:
        return StoreError(f"{cfg.describe()} needs a password and none was given: add ?password_file=PATH (a file "
                          f"holding it) or ?password_env=VAR to the URL, or set ${DEFAULT_PASSWORD_ENV}")
    return StoreError(f"{cfg.describe()} refused the password ({reason}); check password_file / password_env")


def _read_password(path: str | None, env: str | None) -> str | None:
    if path:
        try:
            return Path(path).read_text().rstrip("\r\n")
        except OSError as e:
            raise StoreError(f"cannot read the cluster password file {path}: {e.strerror}") from None
    if env:
        if env not in os.environ:
            raise StoreError(f"environment variable {env} (password_env) is not set")
        return os.environ[env]
    return os.environ.get(DEFAULT_PASSWORD_ENV) or None


# ---- keys -------------------------------------------------------------------

class _Keys:
    def __init__(self, ns: str):
        self.ns = ns
        self.manifest = f"{{{ns}}}:manifest"
        self.counters = f"{{{ns}}}:counters"
        self.pending = f"{{{ns}}}:pending"

    def lease(self, table_id: int) -> str:
        return f"{{{self.ns}}}:lease:{table_id}"

    def row(self, table_id: int, token_id: int) -> bytes:
        return f"{self.ns}:r:{table_id}:{token_id}".encode()

    def rows(self, table_id: int, token_ids) -> list[bytes]:
        prefix = f"{self.ns}:r:{table_id}:"
        return [f"{prefix}{t}".encode() for t in token_ids]

    def artifact(self, table_id: int, index: int, chunk: int) -> bytes:
        return f"{self.ns}:a:{table_id}:{index}:{chunk}".encode()


# ---- the node-parallel pipelined executor ----------------------------------

class _Failure:
    def __init__(self, node: str, reason: str):
        self.node = node
        self.reason = reason


class _Nodes:
    """Runs one command per key on the nodes that serve the keys' slots: pipelined, a bounded
    number of keys per round trip, every round trip in parallel; retries what failed (after a
    slot map refresh) until `retry_seconds` have passed."""

    def __init__(self, rc: RedisCluster, cfg: ClusterConfig, workers: int):
        self.rc = rc
        self.cfg = cfg
        self.pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lutstore-cluster")
        self._refresh_lock = threading.Lock()
        self._refreshed_at = 0.0

    def node_for(self, key: bytes, replicas: bool):
        strategy = LoadBalancingStrategy.ROUND_ROBIN if replicas else None
        return self.rc.nodes_manager.get_node_from_slot(key_slot(key), load_balancing_strategy=strategy)

    def refresh_slots(self) -> None:
        with self._refresh_lock:
            if time.monotonic() - self._refreshed_at < 0.2:
                return
            try:
                self.rc.nodes_manager.initialize()
            except (redis.RedisError, RedisClusterException) as e:
                log.info("cluster slot map refresh failed: %s", e)
            self._refreshed_at = time.monotonic()

    def slots_of(self, node_name: str) -> str:
        """The slot ranges `node_name` serves as primary, e.g. '5461-10922'."""
        slots = sorted(s for s, nodes in self.rc.nodes_manager.slots_cache.items() if nodes and nodes[0].name == node_name)
        ranges, start = [], None
        for i, s in enumerate(slots):
            if start is None:
                start = s
            if i + 1 == len(slots) or slots[i + 1] != s + 1:
                ranges.append(f"{start}-{s}" if s != start else f"{s}")
                start = None
        return ",".join(ranges) or "none"

    def run(self, keys: list[bytes], command: Callable[[object, int], None], per_round: int, what: str,
            replicas: bool = False) -> list:
        results: list = [None] * len(keys)
        todo = list(range(len(keys)))
        deadline = time.monotonic() + self.cfg.retry_seconds
        delay = 0.05
        while True:
            by_node: dict[str, tuple[object, list[int]]] = {}
            for i in todo:
                try:
                    node = self.node_for(keys[i], replicas)
                except (redis.RedisError, RedisClusterException) as e:  # slot not covered by any node
                    node = None
                    reason = str(e)
                name = node.name if node is not None else f"(no node: {reason})"
                by_node.setdefault(name, (node, []))[1].append(i)
            tasks = []
            for name, (node, idxs) in by_node.items():
                for start in range(0, len(idxs), per_round):
                    tasks.append((name, node, idxs[start : start + per_round]))
            failed: list[int] = []
            failures: dict[str, _Failure] = {}
            # Every round trip but the first goes to the pool; this thread does the first one itself
            # (a small batch is often one round trip: no thread hop at all).
            running = [(t, self.pool.submit(self._round, t[1], keys, t[2], command)) for t in tasks[1:]]
            done = [(tasks[0], self._round(tasks[0][1], keys, tasks[0][2], command))] if tasks else []
            done += [(t, fut.result()) for t, fut in running]
            for (name, _node, idxs), (values, retry, reason) in done:
                for i, value in zip(idxs, values):
                    results[i] = value
                if retry:
                    failed += retry
                    failures.setdefault(name, _Failure(name, reason))
            if not failed:
                return results
            if time.monotonic() >= deadline:
                parts = [f"cluster node {f.node} (slots {self.slots_of(f.node)}): {f.reason}" for f in failures.values()]
                raise StoreUnavailable(f"{what}: {len(failed)} of {len(keys)} keys unreachable after "
                                       f"{self.cfg.retry_seconds:g} s; " + "; ".join(parts))
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
            self.refresh_slots()
            todo = failed

    def _round(self, node, keys: list[bytes], idxs: list[int], command) -> tuple[list, list[int], str]:
        """One pipelined round trip: (replies in idxs order, indices to retry, why they failed)."""
        values: list = [None] * len(idxs)
        if node is None:
            return values, list(idxs), "no node serves these slots"
        try:
            pipe = self.rc.get_redis_connection(node).pipeline(transaction=False)
            for i in idxs:
                command(pipe, i)
            replies = pipe.execute(raise_on_error=False)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            return values, list(idxs), f"unreachable ({type(e).__name__}: {e})"
        except redis.AuthenticationError as e:
            raise StoreError(f"cluster node {node.name} refused the credentials: {e}") from None
        retry, reason = [], ""
        for k, (i, reply) in enumerate(zip(idxs, replies)):
            if isinstance(reply, Exception):
                text = str(reply)
                if isinstance(reply, (redis.ConnectionError, redis.TimeoutError)) or text.split(" ", 1)[0] in _RETRYABLE_REPLIES \
                        or type(reply).__name__ in ("MovedError", "AskError", "TryAgainError", "ClusterDownError"):
                    retry.append(i)
                    reason = reason or f"replied {text[:120]}"
                    continue
                raise StoreError(f"cluster node {node.name} refused a command: {text}")
            values[k] = reply
        return values, retry, reason

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class ClusterStore(StoreBase):
    """Tables in a Valkey / Redis Cluster. Stateless apart from the cached manifest: any number of
    daemons (mode "secondary") and one or more ingests (mode "primary") may share a cluster."""

    _called = "store"

    def __init__(self, cfg: ClusterConfig, rc: RedisCluster, mode: str):
        self.cfg = cfg
        self.path = cfg.describe()
        self.mode = mode
        self._rc = rc
        self._keys = _Keys(cfg.namespace)
        self._nodes = _Nodes(rc, cfg, workers=max(8, 4 * len(rc.get_primaries())))
        self._lock = threading.Lock()
        self._by_name: dict[str, dict[int, TableMeta]] = {}
        self._publish = rc.register_script(_PUBLISH)
        self._unpublish = rc.register_script(_UNPUBLISH)

    @classmethod
    def open(cls, url: str, mode: Literal["primary", "secondary"] = "primary", create: bool = False) -> ClusterStore:
        if mode not in ("primary", "secondary"):
            raise ValueError(f"mode must be 'primary' or 'secondary', not {mode!r}")
        cfg = ClusterConfig.from_url(url)
        kwargs: dict = dict(password=cfg.password, username=cfg.username, socket_timeout=cfg.timeout_seconds,
                            socket_connect_timeout=min(cfg.timeout_seconds, 5.0), require_full_coverage=False,
                            load_balancing_strategy=LoadBalancingStrategy.ROUND_ROBIN if cfg.read_from_replicas else None)
        if cfg.tls:
            # Verification is always on (ssl_cert_reqs "required"); the host name check can be turned off.
            kwargs.update(ssl=True, ssl_ca_certs=cfg.tls_ca_file, ssl_certfile=cfg.tls_cert_file,
                          ssl_keyfile=cfg.tls_key_file, ssl_cert_reqs="required",
                          ssl_check_hostname=cfg.tls_check_hostname)
            if not cfg.tls_check_hostname:
                log.warning("tls_check_hostname=0: cluster certificates are verified against the CA but not "
                            "against the host names")
        try:
            rc = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cfg.seeds], **kwargs)
        except redis.AuthenticationError as e:
            raise _auth_refused(cfg, str(e)) from None
        except (redis.RedisError, RedisClusterException, OSError) as e:
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            tls_failed = any(isinstance(c, ssl.SSLError) for c in _causes(e))  # "authority key ..." is no password
            if not tls_failed and ("auth" in text.lower() or "password" in text.lower()):
                raise _auth_refused(cfg, text) from None
            raise StoreError(f"cannot reach {cfg.describe()}: {_connect_failure(e, cfg)}") from None
        store = cls(cfg, rc, mode)
        try:
            store.refresh()
        except BaseException:
            store.close()
            raise
        return store

    # ---- reading -------------------------------------------------------

    def _hgetall(self, key: str) -> dict[bytes, bytes]:
        deadline = time.monotonic() + self.cfg.retry_seconds
        while True:
            try:
                return self._rc.hgetall(key)
            except redis.AuthenticationError as e:
                raise StoreError(f"{self.cfg.describe()} refused the password: {e}") from None
            except (redis.RedisError, RedisClusterException) as e:
                if time.monotonic() >= deadline:
                    slot = key_slot(key.encode())
                    raise StoreUnavailable(f"cannot read {key} (slot {slot}) from {self.cfg.describe()}: {e}") from None
                time.sleep(0.1)

    def refresh(self) -> None:
        """Read the manifest again: versions published or dropped meanwhile by any ingest."""
        by_name: dict[str, dict[int, TableMeta]] = {}
        for value in self._hgetall(self._keys.manifest).values():
            meta = TableMeta.from_json(value)
            by_name.setdefault(meta.name, {})[meta.version] = meta
        with self._lock:
            self._by_name = by_name

    def _per_round(self, meta: TableMeta) -> int:
        row = max(1, meta.stored_bytes // max(meta.vocab_size, 1))
        return max(1, PIPELINE_BYTES // row)

    def get_values(self, meta: TableMeta, token_ids: list[int]) -> list[bytes | None]:
        """Raw stored values of token_ids (None where missing); StoreUnavailable if a node is down."""
        keys = self._keys.rows(meta.table_id, token_ids)
        return self._nodes.run(keys, lambda pipe, i: pipe.get(keys[i]), self._per_round(meta),
                               f"reading {meta.name} v{meta.version}", replicas=self.cfg.read_from_replicas)

    def iter_rows(self, meta: TableMeta) -> Iterator[tuple[int, bytes]]:
        step = max(64, min(4096, self._per_round(meta)))
        for start in range(0, meta.vocab_size, step):
            ids = list(range(start, min(start + step, meta.vocab_size)))
            for token, value in zip(ids, self.get_values(meta, ids)):
                if value is not None:
                    yield token, value

    def iter_artifact(self, meta: TableMeta, name: str) -> Iterator[bytes]:
        art = meta.artifact(name)
        for chunk in range(art.chunks):
            key = self._keys.artifact(meta.table_id, art.index, chunk)
            (data,) = self._nodes.run([key], lambda pipe, i: pipe.get(key), 1, f"reading artifact {name!r}")
            if data is None:
                raise StoreError(f"artifact {name!r} of {meta.name} v{meta.version} is missing chunk {chunk}")
            yield data

    # ---- writing -------------------------------------------------------

    def begin_table(self, name: str, fmt: RowFormat, vocab_size: int, source_form: str) -> ClusterTableWriter:
        self._require_primary("writing a table")
        check_new_table(name, vocab_size)
        self.remove_leftovers()
        try:
            table_id = int(self._rc.hincrby(self._keys.counters, "next_table_id", 1))
            version = int(self._rc.hget(self._keys.counters, f"v:{name}") or 0) + 1
            self._rc.set(self._keys.lease(table_id), b"1", px=int(self.cfg.lease_seconds * 1000))
            self._set_pending(table_id, name, vocab_size, artifacts=0, state="writing")
        except (redis.RedisError, RedisClusterException) as e:
            raise StoreUnavailable(f"cannot start a table in {self.cfg.describe()}: {e}") from None
        return ClusterTableWriter(self, table_id, name, version, fmt, vocab_size, source_form)

    def _set_pending(self, table_id: int, name: str, vocab_size: int, artifacts: int, state: str) -> None:
        marker = {"name": name, "vocab_size": vocab_size, "artifacts": artifacts, "state": state,
                  "host": socket.gethostname(), "pid": os.getpid(), "since_unix_ms": int(time.time() * 1000)}
        self._rc.hset(self._keys.pending, str(table_id), json.dumps(marker, sort_keys=True))

    def remove_leftovers(self) -> list[int]:
        """Delete what killed ingests and drops left (pending markers without a live lease)."""
        removed = []
        for tid_raw, raw in self._hgetall(self._keys.pending).items():
            table_id = int(tid_raw)
            if self._rc.exists(self._keys.lease(table_id)):
                continue  # an ingest still running
            marker = json.loads(raw)
            log.info("removing leftovers of table id %d (%s %s, pid %s on %s)", table_id, marker.get("state"),
                     marker.get("name"), marker.get("pid"), marker.get("host"))
            self._delete_table_keys(table_id, marker["vocab_size"], marker.get("artifacts", 0))
            self._rc.hdel(self._keys.pending, str(table_id))
            removed.append(table_id)
        return removed

    def _delete_table_keys(self, table_id: int, vocab_size: int, artifacts: int) -> None:
        step = 16384
        for start in range(0, vocab_size, step):
            keys = self._keys.rows(table_id, range(start, min(start + step, vocab_size)))
            self._nodes.run(keys, lambda pipe, i, keys=keys: pipe.unlink(keys[i]), 1024, "deleting rows")
        for index in range(artifacts):
            chunk = 0
            while True:  # chunks are written in order: delete until the first missing one
                key = self._keys.artifact(table_id, index, chunk)
                (n,) = self._nodes.run([key], lambda pipe, i: pipe.unlink(key), 1, "deleting an artifact")
                if not n:
                    break
                chunk += 1

    def write(self, keys: list[bytes], values: list[bytes], what: str) -> None:
        row = max(1, sum(len(v) for v in values[:16]) // max(1, min(16, len(values))))
        self._nodes.run(keys, lambda pipe, i: pipe.set(keys[i], values[i]), max(1, PIPELINE_BYTES // row), what)

    def wait_replicated(self, timeout: float = 10.0) -> bool:
        """Wait until each master's online replicas have every write it took so far, so a version is
        published only once a failover cannot lose its rows. Per master: one small write and WAIT on
        the same connection (WAIT counts from that connection's last write, which comes after every
        row written so far). False, with a warning, if a replica lags past `timeout`."""
        ok = True
        try:
            for node in self._rc.get_primaries():
                client = self._rc.get_redis_connection(node)
                replicas = sum(1 for k, v in client.info("replication").items()
                               if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online")
                if not replicas:
                    continue
                key = next(k for k in (f"{self._keys.ns}:sync:{i}".encode() for i in range(100_000))
                           if self._nodes.node_for(k, False).name == node.name)
                pipe = client.pipeline(transaction=False)
                pipe.set(key, b"1", px=60_000)
                pipe.execute_command("WAIT", replicas, int(timeout * 1000))
                acked = int(pipe.execute()[1])
                if acked < replicas:
                    log.warning("only %d of %d replicas of %s acknowledged the rows within %.0f s; publishing anyway",
                                acked, replicas, node.name, timeout)
                    ok = False
        except (redis.RedisError, RedisClusterException, StopIteration) as e:
            log.warning("cannot wait for the replicas (%s); publishing without waiting", e)
            return False
        return ok

    def drop(self, name: str, version: int) -> list[str]:
        """Unpublish one version at once (with a pending marker), then delete its rows and artifacts.
        Returns what stayed behind: nothing (a cluster has no damaged ranges to leave in place)."""
        self._check_drop(version)
        self.refresh()
        meta = self.resolve(name, version)
        marker = json.dumps({"name": name, "vocab_size": meta.vocab_size, "artifacts": len(meta.artifacts),
                             "state": "dropping", "host": socket.gethostname(), "pid": os.getpid(),
                             "since_unix_ms": int(time.time() * 1000)}, sort_keys=True)
        self._unpublish(keys=[self._keys.manifest, self._keys.pending], args=[str(meta.table_id), marker])
        with self._lock:
            versions = self._by_name.get(name, {})
            versions.pop(version, None)
            if not versions:
                self._by_name.pop(name, None)
        self._delete_table_keys(meta.table_id, meta.vocab_size, len(meta.artifacts))
        self._rc.hdel(self._keys.pending, str(meta.table_id))
        self.remove_leftovers()
        log.info("dropped %s v%d (table id %d)", name, version, meta.table_id)
        return []

    def close(self) -> None:
        self._nodes.close()
        self._rc.close()

    def __enter__(self) -> ClusterStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ClusterTableWriter(TableWriterBase):
    """Writes one new version's rows straight into the cluster (one chunk in flight while the
    caller computes the next: bounded RAM); commit() publishes the manifest entry in one step."""

    def __init__(self, store: ClusterStore, table_id: int, name: str, version: int, fmt: RowFormat,
                 vocab_size: int, source_form: str):
        super().__init__(table_id, name, version, fmt, vocab_size, source_form)
        self._store = store
        self._writing: futures.Future | None = None
        self._writer = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lutstore-cluster-ingest")
        self._stop_lease = threading.Event()
        self._lease = threading.Thread(target=self._keep_lease, name="lutstore-lease", daemon=True)
        self._lease.start()

    def _keep_lease(self) -> None:
        cfg = self._store.cfg
        key = self._store._keys.lease(self.table_id)
        while not self._stop_lease.wait(cfg.lease_seconds / 3):
            try:
                self._store._rc.set(key, b"1", px=int(cfg.lease_seconds * 1000))
            except (redis.RedisError, RedisClusterException) as e:
                log.warning("cannot renew the ingest lease of table id %d: %s", self.table_id, e)

    def _wait_writing(self) -> None:
        if self._writing is not None:
            writing, self._writing = self._writing, None
            writing.result()

    def _write_rows(self, first: int, values: list[bytes]) -> None:
        keys = self._store._keys.rows(self.table_id, range(first, first + len(values)))
        self._wait_writing()  # at most one chunk in flight
        self._writing = self._writer.submit(self._store.write, keys, list(values),
                                            f"writing rows {first}..{first + len(values) - 1} of {self.name}")

    def _artifact_writer(self, name: str, index: int) -> Callable[[int, bytes], None]:
        # Name the artifact in the pending marker first, so a killed ingest's chunks are found.
        self._store._set_pending(self.table_id, self.name, self.vocab_size, index + 1, "writing")

        def put(chunk: int, data: bytes) -> None:
            self._store.write([self._store._keys.artifact(self.table_id, index, chunk)], [data],
                              f"writing artifact {name!r}")
        return put

    def commit(self, fingerprint_extra: bytes = b"") -> TableMeta:
        check_complete(self.name, self._done, self._next_token, self.vocab_size)
        store = self._store
        try:
            self._wait_writing()
            store.wait_replicated()  # rows on the replicas too before the version is visible
            fingerprint = self.fingerprint(fingerprint_extra)
            created = int(time.time() * 1000)
            while True:
                meta = self._table_meta(fingerprint, created)
                k = store._keys
                got = int(store._publish(keys=[k.manifest, k.counters, k.pending, k.lease(self.table_id)],
                                         args=[str(self.table_id), self.name, str(self.version), meta.to_json()]))
                if got == 0:
                    break
                if got < 0:
                    raise StoreError(f"ingest of {self.name!r} lost its lease (stalled over "
                                     f"{store.cfg.lease_seconds:g} s); its rows were treated as leftovers")
                self.version = got + 1  # another ingest published this version meanwhile
        except BaseException:
            self.abort()
            raise
        self._finish()
        with store._lock:
            store._by_name.setdefault(meta.name, {})[meta.version] = meta
        log.info("committed %s v%d (table id %d, %d rows, %d bytes) to %s", meta.name, meta.version, meta.table_id,
                 meta.vocab_size, meta.stored_bytes, store.cfg.describe())
        return meta

    def _finish(self) -> None:
        self._done = True
        self._stop_lease.set()
        self._writer.shutdown(wait=True)

    def abort(self) -> None:
        """Delete what was written; if the cluster cannot be reached, the expired lease leaves it to
        the next ingest or drop."""
        if self._done:
            return
        self._finish()
        store = self._store
        try:
            if self._writing is not None:
                self._writing.exception()
            store._delete_table_keys(self.table_id, self._next_token, len(self._artifacts) + 1)
            store._rc.hdel(store._keys.pending, str(self.table_id))
            store._rc.delete(store._keys.lease(self.table_id))
        except (StoreError, redis.RedisError, RedisClusterException) as e:
            log.warning("abort of %s (table id %d) could not clean up now (%s); the next ingest or drop will",
                        self.name, self.table_id, e)
