"""Kernels derived from a kernel's cascade, compiled by the kernel's own backend: the training
forward and fused backward (codegen/autograd.py), the partial-state kernel (codegen/partial.py)
and the split-KV kernel with its combine (codegen/combine.py). Each kernel class says how it
compiles another cascade (`same_backend`); the rest is here."""
from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

from einsum_ir.codegen.autograd import Training, wants_grad
from einsum_ir.codegen.combine import SplitKernels
from einsum_ir.codegen.partial import Partials, PartialState
from einsum_ir.errors import LoweringError
from einsum_ir.ir import Cascade


class DerivedKernels:
    cascade: Cascade
    fp32: frozenset = frozenset()
    backend: str
    # splits of the keys per call: None lets the cost model choose (split-KV for short queries
    # on a GPU, lowering/split_kv.py), 1 is the ordinary kernel, more forces that many
    split_kv: int | None = None

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

    @cached_property
    def split_kernels(self) -> SplitKernels:
        return SplitKernels(self.cascade, self.same_backend, self.backend)

    def splits_for(self, args: dict) -> int:
        """The split count of a call: forced (`split_kv`), else the cost model's for its shapes
        on its device; 1 for a training call (its backward reads the ordinary forward's saved
        values) and wherever the cascade has no partial states."""
        if self.fp32 or wants_grad(args):
            return 1
        if self.split_kv is not None:
            return max(1, int(self.split_kv))
        import torch

        from einsum_ir.codegen.dispatch import table_device
        from einsum_ir.lowering.split_kv import split_choice
        from einsum_ir.params import bind_shapes

        first = next((v for v in args.values() if isinstance(v, torch.Tensor)), None)
        if first is None or first.device.type != "cuda":
            return 1  # the CPU path runs every program at once: nothing to fill
        extents = bind_shapes(self.cascade, dict(args))[1]
        key = (table_device(first.device), tuple(sorted(extents.items())))
        cache = self.__dict__.setdefault("_split_choices", {})
        if key not in cache:
            try:
                cache[key] = split_choice(self.cascade, extents, key[0]).splits
            except (LoweringError, KeyError):
                cache[key] = 1
        return cache[key]

    def run_split(self, args: dict, splits: int):
        """The call through `splits` split-KV programs per grid point and the combine."""
        from einsum_ir.params import bind_shapes

        keys = bind_shapes(self.cascade, dict(args))[1][self.split_kernels.split.key_rank]
        return self.split_kernels(args, splits, keys)
