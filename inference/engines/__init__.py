"""Adapters that run MoLE models inside other engines (vLLM, transformers), with rows from lutstore."""
