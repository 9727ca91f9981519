"""The backbone (config, tokenizer, non-expert weights) of a served table.

The daemon stores it with the table; a client fetches it once into a local
cache directory named by the table's fingerprint

    $LUTSTORE_CACHE/<fingerprint>/   (default ~/.cache/lutstore/<fingerprint>/)

and checks it on every start: each artifact's sha256 must equal the one the
table lists, so rows of one table are never combined with another backbone.
Also here: loading a local checkpoint folder (train or rep form) for
in-process evaluation without a daemon.
"""

from __future__ import annotations

import hashlib
import json
import math
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from inference.model import ModelArgs, Transformer
from lutstore.paths import default_cache_dir
from lutstore.errors import LutError, UserError

log = logging.getLogger(__name__)

FINGERPRINT = re.compile(r"[0-9a-f]{64}")   # a table fingerprint is a sha256 hex digest (store.table_fingerprint)
MARKER = "lutstore-table.json"   # which table (fingerprint) a cached folder belongs to
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class BackboneMismatch(UserError):
    """A backbone folder that does not belong to the table."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify_backbone(folder: Path, info) -> None:
    """Raise BackboneMismatch unless every artifact of the table is in folder with its sha256."""
    marker = folder / MARKER
    if marker.is_file():
        recorded = json.loads(marker.read_text()).get("fingerprint")
        if recorded != info.fingerprint:
            raise BackboneMismatch(f"backbone in {folder} belongs to fingerprint {recorded}, but table "
                                   f"{info.name!r} v{info.version} has fingerprint {info.fingerprint}; refusing to mix them")
    for art in info.artifacts:
        path = folder / art.name
        if not path.is_file():
            raise BackboneMismatch(f"backbone in {folder} lacks {art.name} of table {info.name!r} v{info.version}")
        if path.stat().st_size != art.size or sha256_of(path) != art.sha256:
            raise BackboneMismatch(f"{path} does not match table {info.name!r} v{info.version} "
                                   f"(fingerprint {info.fingerprint}): its sha256 differs; refusing to mix them")


def ensure_backbone(client, info, cache_dir: Path | None = None) -> Path:
    """The verified local folder of the table's artifacts, fetching them if absent or damaged."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    # The fingerprint comes from the daemon and names a folder we may delete (rmtree below): anything
    # but a sha256 digest ("/home/me", "../..") would point that at a folder outside the cache.
    if not FINGERPRINT.fullmatch(info.fingerprint):
        raise BackboneMismatch(f"table {info.name!r} v{info.version}: the daemon sent fingerprint "
                               f"{info.fingerprint[:80]!r}, not a sha256 digest; refusing to use it as a cache folder name")
    dest = root / info.fingerprint
    if dest.is_dir():
        try:
            verify_backbone(dest, info)
            log.info("backbone of %s v%d from cache %s", info.name, info.version, dest)
            return dest
        except BackboneMismatch as e:
            log.warning("cached backbone is damaged, fetching it again: %s", e)
            shutil.rmtree(dest)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".partial-{info.fingerprint[:16]}-", dir=root))
    try:
        client.fetch_artifacts(info.name, staging, info.version)
        (staging / MARKER).write_text(json.dumps({"table": info.name, "version": info.version,
                                                  "fingerprint": info.fingerprint}))
        verify_backbone(staging, info)
        try:
            os.replace(staging, dest)   # atomic: a folder named by the fingerprint is always complete
        except OSError:
            if not dest.is_dir():       # another process won the race: theirs is as good
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("fetched backbone of %s v%d into %s", info.name, info.version, dest)
    return dest


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    if name is None:
        return torch.float32     # as the official loader: upcast to fp32 to run
    if name not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(sorted(DTYPES))}, not {name!r}")
    if device == "cpu" and DTYPES[name] is torch.float16:
        log.warning("float16 on CPU is slow and not always supported; consider bfloat16 or float32")
    return DTYPES[name]


def load_tokenizer(folder: Path):
    """tokenizers.Tokenizer from tokenizer.json, or None where the folder has none."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(path))


@dataclass
class Backbone:
    args: ModelArgs
    model: Transformer
    tokenizer: object | None
    folder: Path


def load_backbone(folder: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Backbone:
    """A lut-form Transformer with the folder's backbone.safetensors loaded."""
    from safetensors.torch import load_file

    try:
        args = ModelArgs.from_config(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the backbone's config.json in {folder}: {e}") from None
    weights = folder / "backbone.safetensors"
    if not weights.is_file():
        raise UserError(f"{folder} has no backbone.safetensors")
    model = Transformer(args, "lut")
    try:
        model.load_official_state_dict(load_file(str(weights)))
    except ValueError as e:
        raise UserError(f"backbone in {folder} does not fit its config: {e}") from None
    model = model.to(device=device, dtype=dtype).eval()
    return Backbone(args, model, load_tokenizer(folder), folder)


def load_checkpoint(path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A local official checkpoint, run in-process (no daemon).

    Train form -> (train-form Transformer, None): the experts are computed.
    Rep form   -> (lut-form Transformer, table [V, L, N, D]): moe_table is the LUT.
    Returns (Backbone, table | None).
    """
    from lutstore.ingest.checkpoint import TABLE, Checkpoint

    with Checkpoint.open(path) as ckpt:
        args = ModelArgs.from_config(ckpt.config.raw)
        model = Transformer(args, ckpt.form if ckpt.form == "train" else "lut")
        names = [n for n in ckpt.names() if n != TABLE]
        model.load_official_state_dict({n: ckpt.tensor(n).float() for n in names})
        table = None
        if ckpt.form == "rep":
            L, N, D = args.num_hidden_layers, args.num_experts, args.hidden_size
            table = ckpt.tensor(TABLE).float().reshape(args.vocab_size, L, N, D).clone()
    model = model.to(device=device, dtype=dtype).eval()
    return Backbone(args, model, load_tokenizer(Path(path)), Path(path)), table


def pick_table(client, name: str | None, version: int = 0):
    """TableInfo of `name` (default: the only table), with errors that list what exists."""
    import grpc

    tables = client.tables()
    names = sorted(t.name for t in tables)
    if name is None:
        if len(tables) != 1:
            listing = ", ".join(names) if names else "none"
            raise UserError(f"lutstore at {client.address} serves {len(tables)} tables ({listing}); choose one with --table")
        name = tables[0].name
    elif name not in names:
        raise UserError(f"no table {name!r} at {client.address}; tables: {', '.join(names) if names else 'none'}")
    try:
        return client.info(name, version)
    except LutError as e:
        if e.code == grpc.StatusCode.FAILED_PRECONDITION:
            raise UserError(f"table {name!r} at {client.address}: {e.message}") from None
        raise


@dataclass
class RemoteModel:
    """Everything a client needs to run a served table: backbone model and the row source."""

    client: object
    info: object
    backbone: Backbone
    source: object   # inference.lut.RemoteTable

    def close(self) -> None:
        self.source.close()
        self.client.close()


def open_remote(address: str, table: str | None = None, version: int = 0, device: str = "cpu",
                dtype: torch.dtype = torch.float32, cache_mb: float = 256, backbone_dir: Path | None = None,
                retry_seconds: float = 10.0, timeout: float = 30.0, tls_ca: Path | None = None,
                auth_token: str | None = None, shared_memory: bool | str = "auto") -> RemoteModel:
    """Connect, resolve the table, get and verify its backbone, load the model."""
    from inference.lut import MiB, RemoteTable
    from lutstore.client import LutClient

    # Enough retries (backoff <= 1 s each) to last the whole retry_seconds budget.
    client = LutClient(address, timeout=timeout, retries=5 + math.ceil(retry_seconds), retry_seconds=retry_seconds,
                       tls_ca=tls_ca, auth_token=auth_token, shared_memory=shared_memory)
    try:
        info = pick_table(client, table, version)
        if backbone_dir is not None:
            verify_backbone(Path(backbone_dir), info)
            folder = Path(backbone_dir)
        else:
            folder = ensure_backbone(client, info)
        backbone = load_backbone(folder, device, dtype)
        a = backbone.args
        if (a.vocab_size, a.num_hidden_layers, a.num_experts, a.hidden_size) != (
                info.vocab_size, info.num_layers, info.num_experts, info.hidden_size):
            raise BackboneMismatch(f"backbone config (V={a.vocab_size} L={a.num_hidden_layers} N={a.num_experts} "
                                   f"D={a.hidden_size}) does not fit table {info.name!r} (V={info.vocab_size} "
                                   f"L={info.num_layers} N={info.num_experts} D={info.hidden_size})")
        source = RemoteTable(client, info.name, info.version, device, cache_bytes=int(cache_mb * MiB))
    except BaseException:
        client.close()
        raise
    return RemoteModel(client, info, backbone, source)


def check_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available (use --device cpu)")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device must be cpu or cuda, not {device!r}")
    return device
