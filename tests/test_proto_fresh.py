"""The committed stubs in lutstore/v1/ are what `make proto` generates from the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GENERATED = ["lutstore_pb2.py", "lutstore_pb2.pyi", "lutstore_pb2_grpc.py"]


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    # The same command as the Makefile's `proto` target, into a scratch dir.
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
           f"--grpc_python_out={tmp_path}", "proto/lutstore/v1/lutstore.proto"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    stale = [name for name in GENERATED
             if (tmp_path / "lutstore" / "v1" / name).read_bytes() != (REPO / "lutstore" / "v1" / name).read_bytes()]
    assert not stale, f"lutstore/v1/{stale} differ from proto/lutstore/v1/lutstore.proto: run `make proto` and commit"
