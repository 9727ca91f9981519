"""vLLM's entry point into lutstore: registers MoLE's architecture (pyproject.toml:
[project.entry-points."vllm.general_plugins"]). vLLM calls register() in every process it
starts; the string form imports the model module only when a MoLE checkpoint is loaded."""

from __future__ import annotations

ARCHITECTURE = "MoleForCausalLM"   # what official MoLE checkpoints name in config.json's architectures


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "inference.engines.vllm_mole:MoleForCausalLM")
