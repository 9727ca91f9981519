"""Security of the daemon: loopback by default, TLS with a certificate made here,
bearer token on every RPC but health checks, a read-only surface, and limits on
message size, batch size and RPCs in flight. All traffic stays on 127.0.0.1."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lutstore.cli import build_parser
from lutstore.client import LutClient, LutError
from lutstore.formats import codec
from lutstore.formats.codec import decode_rows
from lutstore.v1 import lutstore_pb2 as pb
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc

from conftest import REPO, write_table

TOKEN = "s3cret-token-for-tests"
OPENSSL = "/usr/bin/openssl"


def make_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate it signs (SAN 127.0.0.1 and localhost), and an unrelated CA."""
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([OPENSSL, *args], cwd=folder, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=lutstore test CA")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    run("req", "-x509", *ec, "-keyout", "other.key", "-out", "other-ca.pem", "-days", "2", "-subj", "/CN=someone else")
    return {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key",
            "other_ca": folder / "other-ca.pem"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def secured(db_path: Path, tmp_path: Path, certs, serve):
    """A daemon with TLS and a token (read from a file), over one small table with an artifact."""
    _, _, values = write_table(db_path, "t", vocab_size=32, seed=3, artifacts={"config.json": b'{"a": 1}'})
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    server = serve(db_path, "--tls-cert", str(certs["cert"]), "--tls-key", str(certs["key"]),
                   "--auth-token-file", str(token_file))
    return server, values


def _code(call) -> grpc.StatusCode:
    with pytest.raises(LutError) as err:
        call()
    return err.value.code


def test_tls_and_token_let_a_client_in(secured, certs, tmp_path: Path) -> None:
    server, values = secured
    with LutClient(server.address, tls_ca=certs["ca"], auth_token=TOKEN) as client:
        rows = client.get_rows("t", [5, 1, 5])
        np.testing.assert_array_equal(rows, decode_rows(client.row_format(client.info("t")), [values[i] for i in (5, 1, 5)]))
        assert [t.name for t in client.tables()] == ["t"]
        client.fetch_artifacts("t", tmp_path / "art")
        assert (tmp_path / "art" / "config.json").read_bytes() == b'{"a": 1}'
    # "localhost" is in the certificate too.
    with LutClient(f"localhost:{server.port}", tls_ca=certs["ca"], auth_token=TOKEN) as client:
        assert client.get_raw("t", [2]) == {2: values[2]}
        # A BatchGetStream session carries the token too.
        got, done = {}, threading.Event()
        session = client.session("t")
        session.submit([3, 7], on_group=lambda b, e, ids, p: got.update(zip(ids.tolist(), [bytes(r) for r in p])),
                       on_error=lambda e: (got.update(error=e), done.set()), on_done=done.set)
        assert done.wait(10) and "error" not in got
        session.close()
        fmt = client.row_format(client.info("t"))
        assert got == {t: bytes(codec.payload_of(fmt, values[t])) for t in (3, 7)}


def test_every_rpc_without_the_right_token_is_unauthenticated(secured, certs, tmp_path: Path) -> None:
    server, _ = secured
    for token in (None, "wrong", TOKEN + "x", ""):
        with LutClient(server.address, tls_ca=certs["ca"], auth_token=token, retries=0) as client:
            assert _code(client.tables) == grpc.StatusCode.UNAUTHENTICATED  # ListTables
            assert _code(lambda: client.info("t")) == grpc.StatusCode.UNAUTHENTICATED  # GetTableInfo
            assert _code(lambda: client.get_raw("t", [1], version=1)) == grpc.StatusCode.UNAUTHENTICATED  # BatchGet
            client._infos[("t", 1)] = pb.TableInfo(name="t", version=1, artifacts=[pb.ArtifactInfo(name="config.json")],
                                                   num_layers=2, num_experts=4, hidden_size=16, encoding=pb.ENCODING_FP16)
            assert _code(lambda: client.fetch_artifacts("t", tmp_path / "x", version=1)) == grpc.StatusCode.UNAUTHENTICATED
            failed, done = [], threading.Event()     # BatchGetStream
            session = client.session("t", 1)
            session.submit([1], on_group=lambda *a: None, on_error=lambda e: (failed.append(e), done.set()))
            assert done.wait(10) and failed[0].code == grpc.StatusCode.UNAUTHENTICATED
            session.close()
    creds = grpc.ssl_channel_credentials(certs["ca"].read_bytes())
    with grpc.secure_channel(server.address, creds) as channel:
        # Health stays open (load balancers probe without a token) ...
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        # ... reflection does not.
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in err.value.details()


def test_tls_refuses_plaintext_and_strangers(secured, certs) -> None:
    server, _ = secured
    with LutClient(server.address, auth_token=TOKEN, retries=0, timeout=5) as client:  # plaintext
        assert _code(client.tables) == grpc.StatusCode.UNAVAILABLE
    with LutClient(server.address, tls_ca=certs["other_ca"], auth_token=TOKEN, retries=0, timeout=5) as client:
        assert _code(client.tables) == grpc.StatusCode.UNAVAILABLE


def test_token_works_without_tls_too(db_path: Path, serve) -> None:
    _, _, values = write_table(db_path, "t", vocab_size=8)
    server = serve(db_path, "--auth-token", TOKEN)
    with LutClient(server.address, auth_token=TOKEN) as client:
        assert client.get_raw("t", [3]) == {3: values[3]}
    with LutClient(server.address, retries=0) as client:
        assert _code(lambda: client.get_raw("t", [3])) == grpc.StatusCode.UNAUTHENTICATED


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) listening on port."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.append(local.rsplit(":", 1)[0])
    return found


def test_binds_loopback_only_by_default(db_path: Path, serve) -> None:
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    assert build_parser().parse_args(["serve"]).metrics_host == "127.0.0.1"
    write_table(db_path, "t", vocab_size=8)
    server = serve(db_path)  # conftest passes no --host: the default
    addresses = _listening(server.port)
    # 127.0.0.1 (gRPC may bind it as the IPv4-mapped ::ffff:127.0.0.1), and nothing else.
    assert addresses and set(addresses) <= {"0100007F", "0000000000000000FFFF00000100007F"}, addresses


def test_read_only_surface(db_path: Path, serve) -> None:
    """No RPC writes or deletes: the service has exactly the six read RPCs, and nothing else is served.
    (BatchGetShared writes only into a segment the client handed over itself, never stored data;
    tests/test_shm.py.)"""
    write_table(db_path, "t", vocab_size=8)
    server = serve(db_path)
    assert [m.name for m in pb.DESCRIPTOR.services_by_name["LutStore"].methods] == [
        "ListTables", "GetTableInfo", "BatchGet", "BatchGetStream", "BatchGetShared", "GetArtifact"]
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        [resp] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=10))
        assert sorted(s.name for s in resp.list_services_response.service) == [
            "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "lutstore.v1.LutStore"]
        for method in ("Put", "Delete", "Drop", "Ingest", "BatchPut"):
            call = channel.unary_unary(f"/lutstore.v1.LutStore/{method}")
            with pytest.raises(grpc.RpcError) as err:
                call(b"", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_limits_on_message_size_batch_size_and_rpcs_in_flight(db_path: Path, serve) -> None:
    write_table(db_path, "t", vocab_size=64)
    server = serve(db_path, "--max-message-mb", "0.01", "--max-batch-rows", "5000", "--max-concurrent-rpcs", "2")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LutStoreStub(channel)
        # A request larger than --max-message-mb (10 KiB): refused before any handler runs.
        with pytest.raises(grpc.RpcError) as err:
            list(stub.BatchGet(pb.BatchGetRequest(table="t", token_ids=[2**31] * 4000), timeout=10))  # ~20 KB
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # More ids than --max-batch-rows: the message names the limit.
        with pytest.raises(grpc.RpcError) as err:
            list(stub.BatchGet(pb.BatchGetRequest(table="t", token_ids=[1] * 5001), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_batch_rows=5000" in err.value.details()
        # Two long-lived reflection streams fill --max-concurrent-rpcs 2: the next RPC is refused, not
        # queued. (Health Watches hold no thread and are not counted here; tests/test_hostile.py.)
        watches = []
        for _ in range(2):
            requests: queue.Queue = queue.Queue()
            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter(requests.get, None), timeout=30)
            requests.put(reflection_pb2.ServerReflectionRequest(list_services=""))
            assert next(stream).list_services_response.service
            watches.append(stream)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListTables(pb.ListTablesRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for w in watches:
            w.cancel()
        for _ in range(100):  # the server notices the cancellations a moment later
            try:
                assert stub.ListTables(pb.ListTablesRequest(), timeout=10).tables
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                time.sleep(0.05)
        else:
            pytest.fail("the server kept refusing after the watches ended")


@pytest.mark.parametrize("flags,message", [
    (["--tls-cert", "CERT"], "needs both --tls-cert and --tls-key"),
    (["--tls-cert", "MISSING", "--tls-key", "MISSING"], "cannot read TLS"),
    (["--auth-token", "a", "--auth-token-file", "TOKENFILE"], "not both"),
    (["--auth-token-file", "EMPTY"], "is empty"),
    (["--metrics-port", "70000"], "--metrics-port must be in"),
    (["--host", "0.0.0.0", "--allow-shared-memory"], "--allow-shared-memory serves same-host clients only"),
])
def test_bad_security_flags_are_one_line_errors(db_path: Path, tmp_path: Path, certs, flags, message) -> None:
    write_table(db_path, "t", vocab_size=8)
    (tmp_path / "empty").write_text("  \n")
    (tmp_path / "token").write_text("x")
    subst = {"CERT": str(certs["cert"]), "MISSING": str(tmp_path / "missing.pem"), "TOKENFILE": str(tmp_path / "token"),
             "EMPTY": str(tmp_path / "empty")}
    done = subprocess.run([sys.executable, "-m", "lutstore.cli", "serve", "--db", str(db_path), "--port", "0",
                           *[subst.get(f, f) for f in flags]], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in done.stderr, done.stderr


def test_a_token_file_other_users_can_read_is_warned_about(tmp_path: Path, caplog) -> None:
    from lutstore.security import read_token
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o644)
    with caplog.at_level("WARNING", logger="lutstore.security"):
        assert read_token(None, token_file) == TOKEN
    assert "readable by other users (mode 644)" in caplog.text and "chmod 600" in caplog.text
    caplog.clear()
    token_file.chmod(0o600)
    with caplog.at_level("WARNING", logger="lutstore.security"):
        assert read_token(None, token_file) == TOKEN
    assert caplog.text == ""


@pytest.mark.parametrize("name", ["../escape.txt", "/tmp/lutstore-escape.txt", "a/../../escape.txt"])
def test_artifact_names_cannot_leave_the_download_folder(db_path: Path, tmp_path: Path, serve, name) -> None:
    """Artifact names come from the daemon; the client writes none outside the folder it was given."""
    write_table(db_path, "t", vocab_size=8, artifacts={"config.json": b"{}", name: b"planted"})
    server = serve(db_path)
    dest = tmp_path / "dl" / "backbone"
    with LutClient(server.address) as client:
        with pytest.raises(LutError, match="escapes"):
            client.fetch_artifacts("t", dest)
    assert not (tmp_path / "dl" / "escape.txt").exists() and not Path("/tmp/lutstore-escape.txt").exists()


def test_an_api_key_file_other_users_can_read_is_warned_about(tmp_path: Path, caplog) -> None:
    from inference.serve import read_api_key
    key_file = tmp_path / "key"
    key_file.write_text("sk-local\n")
    key_file.chmod(0o640)
    with caplog.at_level("WARNING", logger="lutstore.security"):
        assert read_api_key(key_file) == "sk-local"
    assert "--api-key-file" in caplog.text and "(mode 640)" in caplog.text
    caplog.clear()
    key_file.chmod(0o600)
    with caplog.at_level("WARNING", logger="lutstore.security"):
        assert read_api_key(key_file) == "sk-local"
    assert caplog.text == ""
