"""Kernels derived from a kernel's cascade, compiled by the kernel's own backend: the training
forward and fused backward (codegen/autograd.py) and the partial-state kernel (codegen/partial.py).
Each kernel class says how it compiles another cascade (`same_backend`); the rest is here."""
from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

from einsum_ir.codegen.autograd import Training
from einsum_ir.codegen.partial import Partials, PartialState
from einsum_ir.ir import Cascade


class DerivedKernels:
    cascade: Cascade

    def same_backend(self, cascade: Cascade, fp32: frozenset = frozenset()) -> Callable:
        """A kernel of `cascade` on this kernel's backend (and tiles), holding `fp32` in fp32."""
        raise NotImplementedError

    @cached_property
    def training(self) -> Training:
        """The training forward and the fused backward, on this backend."""
        return Training(self.cascade, self.same_backend)

    @cached_property
    def partials(self) -> Partials:
        return Partials(self.cascade, self.same_backend)

    def partial(self, keys: tuple[int, int], **args) -> PartialState:
        """The state over keys keys[0] <= k < keys[1]; `finalize()` it, or `ei.merge` several."""
        return self.partials(keys, args)
