"""Who may talk to the daemon: TLS credentials and a bearer-token check.

Defaults are safe without these (bind 127.0.0.1, read-only RPCs); on a real
network, `--tls-cert/--tls-key` encrypt and `--auth-token(-file)` authenticate.
"""

from __future__ import annotations

import collections
import hmac
import logging
import threading
import time
from pathlib import Path
from typing import Callable

import grpc

from lutstore.errors import UserError

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
# Health checks stay open so that load balancers and orchestrators can probe.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)
REJECT_LOG_SECONDS = 10.0  # at most one "rejected" warning per this many seconds (with a count of the rest)
LOGGED_METHOD_CHARS = 100  # a method name is logged this long at most (callers choose it)


def read_token(token: str | None, token_file: Path | None) -> str | None:
    """The bearer token from a flag or a file (the file keeps it out of `ps`)."""
    if token and token_file:
        raise UserError("give --auth-token or --auth-token-file, not both")
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise UserError(f"cannot read auth token file {token_file}: {e.strerror}") from e
        if not token:
            raise UserError(f"auth token file {token_file} is empty")
        warn_if_others_can_read(Path(token_file), "auth token file")
    return token or None


def warn_if_others_can_read(path: Path, what: str) -> None:
    """A secret in a file that every local user can read protects nothing from them (as ssh says of
    a private key): say so, once, at start."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o044:
        log.warning("%s %s is readable by other users (mode %03o): `chmod 600 %s`",
                    what, path, mode & 0o777, path)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from e


def server_credentials(cert: Path | None, key: Path | None) -> grpc.ServerCredentials | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise UserError("TLS needs both --tls-cert and --tls-key")
    return grpc.ssl_server_credentials([(_read(key, "TLS key"), _read(cert, "TLS certificate"))])


def channel_credentials(tls_ca: Path | None) -> grpc.ChannelCredentials | None:
    """Credentials for a TLS channel trusting `tls_ca` (None: plaintext)."""
    if not tls_ca:
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read(tls_ca, "TLS CA certificate"))


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the bearer token (works with and without TLS)."""
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


class _CallDetails(collections.namedtuple("_CallDetails", "method timeout metadata credentials wait_for_ready compression"),
                   grpc.ClientCallDetails):
    pass


class TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                             grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a channel (plaintext or TLS alike;
    gRPC's own call credentials refuse plaintext channels)."""

    def __init__(self, token: str) -> None:
        self._metadata = auth_metadata(token)

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(d.method, d.timeout, tuple(d.metadata or ()) + self._metadata, d.credentials,
                            d.wait_for_ready, getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects every RPC without `authorization: Bearer <token>` (health excepted)."""

    def __init__(self, token: str, on_reject: Callable[[str], None] | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._on_reject = on_reject
        self._log = _RateLimitedWarning(REJECT_LOG_SECONDS)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(UNAUTHENTICATED_PREFIXES):
            return continuation(handler_call_details)
        presented = dict(handler_call_details.invocation_metadata or ()).get(AUTH_HEADER, "")
        if hmac.compare_digest(presented.encode(), self._expected):
            return continuation(handler_call_details)
        self._log.warn(method)
        if self._on_reject:
            self._on_reject(method)
        return _rejecting_handler(continuation(handler_call_details))


class _RateLimitedWarning:
    """The first rejection is logged at once; later ones at most once per `seconds`, with how many
    there were (a flood of calls with made-up 4 KB method names wrote 12 MB of log)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()
        self._next_at = 0.0
        self._suppressed = 0

    def warn(self, method: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next_at:
                self._suppressed += 1
                return
            self._next_at = now + self.seconds
            suppressed, self._suppressed = self._suppressed, 0
        shown = method[:LOGGED_METHOD_CHARS] + ("..." if len(method) > LOGGED_METHOD_CHARS else "")
        if suppressed:
            log.warning("rejected unauthenticated call to %s (and %d more in the last %.0f s)", shown, suppressed,
                        self.seconds)
        else:
            log.warning("rejected unauthenticated call to %s", shown)


def _rejecting_handler(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    def abort(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")

    def abort_stream(request, context):
        abort(request, context)
        yield  # pragma: no cover  (makes this a generator, as stream handlers must be)

    deser = handler.request_deserializer if handler else None
    ser = handler.response_serializer if handler else None
    if handler is not None and handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_stream, deser, ser)
    if handler is not None and handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, deser, ser)
    if handler is not None and handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(abort_stream, deser, ser)
    return grpc.unary_unary_rpc_method_handler(abort, deser, ser)
