"""inference.engines.step_rows: a step's rows wait through a daemon outage, then arrive right."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import torch

from ckpt_factory import make_checkpoint
from inference.connection import LutstoreSettings, open_table
from inference.engines.step_rows import StepRows
from inference.lut import InProcessTable
from lutstore.client import LutClient
from lutstore.ingest import ingest_checkpoint
from testing.daemon import Daemon


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Waiting(logging.Handler):
    """Sets an event when StepRows says a step waits."""

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "did not arrive" in record.getMessage():
            self.event.set()


def test_a_step_waits_through_a_daemon_restart_and_gets_the_right_rows(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "m", form="train", vocab=40)
    ingest_checkpoint(ckpt, tmp_path / "db", name="m", encoding="fp32", progress=False)
    port = free_port()
    daemon = Daemon(tmp_path / "db", "--port", str(port))
    waiting = _Waiting()
    logging.getLogger("inference.engines.step_rows").addHandler(waiting)
    opened = open_table(LutstoreSettings(addr=f"127.0.0.1:{port}", table="m", cache_mb=0, retry_seconds=1))
    try:
        with LutClient(daemon.address) as client:
            table = InProcessTable.from_client(client, "m").table
        ids = torch.tensor([5, 7, 5, 39])
        assert torch.equal(StepRows(opened.source, ids).layer(1), table[ids, 1])
        daemon.proc.kill()
        daemon.proc.wait(30)
        got: dict = {}

        def step() -> None:
            try:
                rows = StepRows(opened.source, torch.tensor([3, 1, 4, 1, 5]))
                got["rows"] = [rows.layer(l) for l in range(2)]
            except BaseException as e:   # the test fails below with it
                got["error"] = e

        thread = threading.Thread(target=step)
        thread.start()
        assert waiting.event.wait(120), "the step did not wait for its rows"
        assert thread.is_alive() and not got
        daemon = Daemon(tmp_path / "db", "--port", str(port))
        thread.join(120)
        assert not thread.is_alive() and "error" not in got, got
        want = torch.tensor([3, 1, 4, 1, 5])
        for l in range(2):
            assert torch.equal(got["rows"][l], table[want, l])
    finally:
        logging.getLogger("inference.engines.step_rows").removeHandler(waiting)
        opened.close()
        daemon.stop()
