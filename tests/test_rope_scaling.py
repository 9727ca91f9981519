"""rope_scaling (config.json) applied as the official MoLE code applies it (transformers 4.38.2's Llama).

tests/golden/rope_logits.npz holds logits the official implementation computed, at recording,
for the two checkpoints `rope_checkpoints` makes (the factory's train form, fp32, plus a
`rope_scaling` in config.json), on two 24-token sequences:
  - linear:  {"type": "linear", "factor": 2.0}: positions divided by 2;
  - dynamic: {"type": "dynamic", "factor": 2.0} with max_position_embeddings 16: a sequence
             longer than 16 tokens gets a larger rotary base (NTK), computed from its length.
`<name>` is one full forward of the 24 tokens; `<name>_steps` a prefill of 12 tokens, then one
token at a time with the KV cache (dynamic: each step's base comes from that step's length,
keys cached earlier keep theirs), the logits of every position.
Plain rotary (scaling ignored) is off by more than 0.5 on both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_factory import load_golden, make_checkpoint, update_config

from inference.backbone import load_checkpoint
from inference.model import ModelArgs
from lutstore.errors import UserError

BOUND = 1e-5     # CPU kernels reorder fp32 sums; measured <= 3e-6 here
SHAPE = dict(vocab=128, layers=2, experts=4, hidden=64, intermediate=64, heads=2)
pytestmark = pytest.mark.usefixtures("single_threaded_torch")   # recorded numbers: one reduction order
PREFILL = 12
SCALINGS = {   # name: (rope_scaling, max_position_embeddings)
    "linear": ({"type": "linear", "factor": 2.0}, 256),
    "dynamic": ({"type": "dynamic", "factor": 2.0}, 16),
}


def rope_checkpoint(dest: Path, rope_scaling: dict, max_positions: int) -> Path:
    ckpt = make_checkpoint(dest, form="train", seed=5, **SHAPE)
    update_config(ckpt, rope_scaling=rope_scaling, max_position_embeddings=max_positions)
    return ckpt


def rope_checkpoints(root: Path) -> dict[str, Path]:
    return {name: rope_checkpoint(root / name, *spec) for name, spec in SCALINGS.items()}


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    return load_golden("rope_logits")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return rope_checkpoints(tmp_path_factory.mktemp("rope"))


def _reference(ckpt: Path):
    backbone, table = load_checkpoint(ckpt)
    assert table is None and backbone.model.form == "train"
    return backbone.model


@pytest.mark.parametrize("name", list(SCALINGS))
def test_reference_full_forward(name, checkpoints, golden) -> None:
    ids = torch.from_numpy(golden["tokens"])
    with torch.no_grad():
        logits = _reference(checkpoints[name])(ids)
    np.testing.assert_allclose(logits.numpy(), golden[name], rtol=0, atol=BOUND)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_reference_static_cache_decode(name, checkpoints, golden) -> None:
    ids = torch.from_numpy(golden["tokens"])
    model = _reference(checkpoints[name])
    model.setup_caches(ids.shape[0], ids.shape[1])
    with torch.no_grad():
        steps = [model(ids[:, :PREFILL], input_pos=torch.arange(PREFILL))]
        steps += [model(ids[:, p:p + 1], input_pos=torch.tensor([p])) for p in range(PREFILL, ids.shape[1])]
    np.testing.assert_allclose(torch.cat(steps, 1).numpy(), golden[f"{name}_steps"], rtol=0, atol=BOUND)


def test_reference_slot_decode_rows_at_different_positions(checkpoints, golden) -> None:
    """Continuous batching: row 1 runs 4 positions behind row 0 in the same forwards, so with
    dynamic scaling one row is past max_position_embeddings (scaled base) while the other is not."""
    ids = torch.from_numpy(golden["tokens"])
    model = _reference(checkpoints["dynamic"])
    model.setup_caches(2, ids.shape[1])
    n, lag = ids.shape[1], 4
    out = torch.zeros(2, n, golden["dynamic"].shape[-1])
    with torch.no_grad():
        for row in (0, 1):
            out[row, :PREFILL] = model(ids[row:row + 1, :PREFILL], input_pos=torch.arange(PREFILL)[None],
                                       slots=torch.tensor([row]))[0]
        for p in range(PREFILL, n + lag):
            rows = [r for r, q in ((0, p), (1, p - lag)) if PREFILL <= q < n]
            pos = torch.tensor([[p if r == 0 else p - lag] for r in rows])
            logits = model(ids[rows].gather(1, pos), input_pos=pos, slots=torch.tensor(rows))
            for i, r in enumerate(rows):
                out[r, int(pos[i, 0])] = logits[i, 0]
    np.testing.assert_allclose(out.numpy(), golden["dynamic_steps"], rtol=0, atol=BOUND)


def _hf(ckpt: Path):
    from inference.engines.hf_mole import MoleForCausalLM

    return MoleForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(SCALINGS))
def test_hf_full_forward_equals_official_and_reference(name, checkpoints, golden) -> None:
    ids = torch.from_numpy(golden["tokens"])
    with torch.no_grad():
        hf = _hf(checkpoints[name])(input_ids=ids, use_cache=False).logits
        ref = _reference(checkpoints[name])(ids)
    np.testing.assert_allclose(hf.numpy(), golden[name], rtol=0, atol=BOUND)
    np.testing.assert_allclose(hf.numpy(), ref.numpy(), rtol=0, atol=BOUND)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_hf_decode_with_cache(name, checkpoints, golden) -> None:
    ids = torch.from_numpy(golden["tokens"])
    model = _hf(checkpoints[name])
    with torch.no_grad():
        out = model(input_ids=ids[:, :PREFILL], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for p in range(PREFILL, ids.shape[1]):
            out = model(input_ids=ids[:, p:p + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    np.testing.assert_allclose(torch.cat(steps, 1).numpy(), golden[f"{name}_steps"], rtol=0, atol=BOUND)


def test_hf_saved_folder_keeps_the_scaling(checkpoints, golden, tmp_path) -> None:
    """save_pretrained writes transformers 5's `rope_parameters`; inference.model reads it back."""
    _hf(checkpoints["linear"]).save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and "type" not in config["rope_parameters"]
    backbone, table = load_checkpoint(tmp_path / "saved")
    assert backbone.args.rope_scaling == {"type": "linear", "factor": 2.0}
    ids = torch.from_numpy(golden["tokens"])
    with torch.no_grad():
        logits = backbone.model(ids, lut_rows=table[ids])
    np.testing.assert_allclose(logits.numpy(), golden["linear"], rtol=0, atol=BOUND)


def test_context_is_extended_by_the_factor(checkpoints) -> None:
    model = _reference(checkpoints["dynamic"])
    assert model.args.context_length == 32
    model.setup_caches(1, 32)
    with pytest.raises(ValueError, match="context of 32"):
        model.setup_caches(1, 33)


def test_config_round_trip_and_transformers5_form() -> None:
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                num_experts=2)
    args = ModelArgs.from_config({**base, "rope_scaling": {"type": "dynamic", "factor": 4}})
    assert args.rope_scaling == {"type": "dynamic", "factor": 4.0}
    assert ModelArgs.from_config(args.to_config()).rope_scaling == args.rope_scaling
    args = ModelArgs.from_config({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}})
    assert args.rope_scaling == {"type": "linear", "factor": 2.0} and args.rope_theta == 5e5
    assert ModelArgs.from_config({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}).rope_scaling is None


@pytest.mark.parametrize("scaling, reason", [
    ({"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256}, "'yarn' is not supported"),
    ({"rope_type": "llama3", "factor": 8.0}, "'llama3' is not supported"),
    ({"type": "linear"}, "needs a numeric factor"),
    ({"type": "dynamic", "factor": "2"}, "needs a numeric factor"),
    ("linear", "must be an object"),
])
def test_other_rope_scalings_are_refused_in_one_line(scaling, reason, tmp_path) -> None:
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                num_experts=2)
    with pytest.raises(UserError, match=reason) as caught:
        ModelArgs.from_config({**base, "rope_scaling": scaling})
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("engine", ["reference", "hf"])
def test_unsupported_checkpoint_is_refused_by_both_engines(engine, tmp_path) -> None:
    ckpt = rope_checkpoint(tmp_path / "yarn", {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256}, 256)
    with pytest.raises(UserError, match="'yarn' is not supported"):
        _reference(ckpt) if engine == "reference" else _hf(ckpt)
