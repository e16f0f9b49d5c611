"""Hugging Face transformers: `register()` makes `attn_implementation="einsum_ir"` work.

    import einsum_ir.integrations.hf as eihf
    eihf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="einsum_ir")

The work lives in `codegen.hf`; this module only imports it when called.
"""
from __future__ import annotations

NAME = "einsum_ir"


def register(name: str = NAME) -> None:
    """Register einsum-ir's attention and mask functions with transformers under `name`."""
    from einsum_ir.codegen.hf import register as run

    run(name)
