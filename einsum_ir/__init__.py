"""einsum-ir: attention variants as cascades of extended Einsums.

The IR layer: ranks, tensors, Einsums and cascades; the spec language (`parse`, `load`,
`str(cascade)`); the Python builder; validation; the dependency graph; the reference
interpreter; and the variant catalog. Upper layers (cost model, lowering, codegen) are
reached through the facade functions below, which import them lazily.
"""
from einsum_ir import variants
from einsum_ir.errors import BindError, SpecError
from einsum_ir.interpreter import interpret
from einsum_ir.ir import Cascade, Einsum
from einsum_ir.parser import load, parse

__all__ = ["BindError", "Cascade", "Einsum", "SpecError", "interpret", "load", "parse", "variants"]
