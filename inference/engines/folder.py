"""Write a model folder that vLLM (or transformers) can serve, from nothing but a daemon's address.

    vllm serve "$(python -m inference.engines.folder --lut-addr 127.0.0.1:50051)"

The folder holds the table's own artifacts (fetched once into the fingerprint-named cache,
inference.backbone.ensure_backbone): config.json with a `lutstore` key naming the daemon,
the table and its version, the backbone weights as model.safetensors (official tensor
names, no experts, no moe_table) and the tokenizer files. Only the folder's path goes to
stdout, so the command nests in another.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from inference.connection import DEFAULT_CACHE_MB, DEFAULT_RETRY_SECONDS, LutstoreSettings
from lutstore.errors import LutError, UserError
from lutstore.paths import default_cache_dir

WEIGHTS = "model.safetensors"   # the name vLLM and transformers look for


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)          # the cache and the folder usually share a disk: no second copy
    except OSError:
        shutil.copyfile(src, dest)


def write_folder(settings: LutstoreSettings, dest: Path | None = None, cache_dir: Path | None = None) -> Path:
    """The servable folder of the table settings name (pinned to the version it has now)."""
    from inference.backbone import MARKER, ensure_backbone, pick_table
    from lutstore.client import LutClient

    settings.say_if_unreachable("lutstore-folder")
    with LutClient(settings.addr, timeout=settings.timeout, retries=settings.retries(),
                   retry_seconds=settings.retry_seconds, **settings.client_options()) as client:
        info = pick_table(client, settings.table, settings.version)
        backbone = ensure_backbone(client, info, cache_dir)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    dest = Path(dest) if dest else root / "models" / f"{info.name}-v{info.version}-{info.fingerprint[:12]}"
    pinned = LutstoreSettings(**{**vars(settings), "table": info.name, "version": int(info.version)})
    config = json.loads((backbone / "config.json").read_text())
    config["lutstore"] = pinned.to_mapping()
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for art in info.artifacts:
            if art.name == "config.json":
                continue
            _link_or_copy(backbone / art.name, staging / (WEIGHTS if art.name == "backbone.safetensors" else art.name))
        (staging / MARKER).write_text(json.dumps({"table": info.name, "version": int(info.version),
                                                  "fingerprint": info.fingerprint}))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m inference.engines.folder",
        description="Write a model folder (config.json with the daemon's address, backbone weights, tokenizer) "
                    "for a table a lutstore daemon serves, and print its path: "
                    "vllm serve \"$(python -m inference.engines.folder --lut-addr HOST:PORT)\".")
    p.add_argument("--lut-addr", required=True, help="the daemon, host:port (or h1:p,h2:p for replicas)")
    p.add_argument("--table", help="table name (default: the only table the daemon serves)")
    p.add_argument("--version", type=int, default=0, help="table version (default: the latest, pinned in the folder)")
    p.add_argument("--dest", type=Path, help="where to write the folder (default: "
                                             "$LUTSTORE_CACHE/models/<table>-v<version>-<fingerprint>)")
    p.add_argument("--lut-cache-mb", type=float, default=DEFAULT_CACHE_MB,
                   help="row cache of each engine worker, in MiB (written into the config)")
    p.add_argument("--retry-seconds", type=float, default=DEFAULT_RETRY_SECONDS,
                   help="how long an unreachable daemon is retried (here and by the engine)")
    p.add_argument("--tls-ca", type=Path, help="PEM CA certificate: TLS, trusting this CA (written into the config)")
    p.add_argument("--auth-token-file", type=Path, help="file holding the daemon's bearer token (its path is "
                                                         "written into the config, never the token)")
    args = p.parse_args(argv)
    try:
        settings = LutstoreSettings(addr=args.lut_addr, table=args.table, version=args.version,
                                    cache_mb=args.lut_cache_mb, retry_seconds=args.retry_seconds,
                                    tls_ca=args.tls_ca.resolve() if args.tls_ca else None,
                                    token_file=args.auth_token_file.resolve() if args.auth_token_file else None)
        folder = write_folder(settings, args.dest)
    except (UserError, LutError) as e:
        p.error(str(e))
    print(folder.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
