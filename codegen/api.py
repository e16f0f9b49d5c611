"""`ei.compile(cascade, backend=...)`: the entry point of code generation.

backend="auto" dispatches every call: CUDA tensors run the generated Triton kernel (its launch
config tuned per (device, dtype, shape bucket)), CPU tensors the generated tiled PyTorch of
codegen/cpu_emit.py, and a cascade with no fused lowering the reference interpreter, with the
reason logged once on the "einsum_ir" logger and kept in `why_not_fused`.
"""
from __future__ import annotations

import logging

from einsum_ir.codegen.derived import DerivedKernels
from einsum_ir.errors import LoweringError
from einsum_ir.ir import Cascade

BACKENDS = ("auto", "triton", "reference", "cpu")

log = logging.getLogger("einsum_ir")


def _cpu_kernel(cascade: Cascade, fp32: frozenset = frozenset()):
    from einsum_ir.codegen.cpu_emit import compile_cpu

    return compile_cpu(cascade, fp32=fp32)


class AutoKernel(DerivedKernels):
    """backend="auto": per call, Triton on CUDA tensors, the CPU path on CPU tensors, the
    reference interpreter where the matching fused kernel does not exist."""

    backend = "auto"

    def __init__(self, cascade: Cascade, fp32: frozenset = frozenset()):
        from einsum_ir.codegen.kernel import ReferenceKernel

        self.cascade = cascade
        self.fp32 = frozenset(fp32)  # held in fp32 whatever the dtype: saved outputs, saved inputs
        self.reference = ReferenceKernel(cascade)
        self._why: str | None = None
        self._triton = self._cpu = None
        self._built: set[str] = set()
        self._logged = False

    # Each fused kernel is built on first need: a CPU-only user never imports Triton, and a
    # GPU user never generates the CPU path.
    def _fused(self, kind: str):
        if kind not in self._built:
            self._built.add(kind)
            try:
                if kind == "triton":
                    from einsum_ir.codegen.kernel import compile_triton

                    self._triton = compile_triton(self.cascade, self.fp32)
                else:
                    self._cpu = _cpu_kernel(self.cascade, self.fp32)
            except (LoweringError, ImportError) as err:
                self._why = self._why or str(err)
        return self._triton if kind == "triton" else self._cpu

    @property
    def why_not_fused(self) -> str | None:
        """Why a call may run on the reference interpreter: the plan's LoweringError (both fused
        backends read the same plan), else the error of a fused kernel that failed to build."""
        if self._why is None and "plan" not in self._built:
            self._built.add("plan")
            from einsum_ir.lowering.strategy import build_plan

            try:
                build_plan(self.cascade)
            except LoweringError as err:
                self._why = str(err)
        return self._why

    @property
    def triton(self):
        return self._fused("triton")

    @property
    def cpu(self):
        return self._fused("cpu")

    def kernel_for(self, args: dict):
        """The kernel a call with these arguments runs on."""
        import torch

        cuda = any(isinstance(v, torch.Tensor) and v.is_cuda for v in args.values())
        kern = self._fused("triton" if cuda else "cpu")
        if kern is not None:
            kern.split_kv = self.split_kv  # the fused kernels split as this one is told to
            return kern
        if not self._logged:
            self._logged = True
            log.info("running the cascade on the reference interpreter: %s", self.why_not_fused)
        return self.reference

    def __call__(self, **args):
        return self.kernel_for(args)(**args)

    def same_backend(self, cascade: Cascade, fp32: frozenset = frozenset()) -> "AutoKernel":
        return AutoKernel(cascade, fp32)

    def source(self, shapes=None, device="h100") -> str:
        """The generated Triton source (the CPU path's Python with device="cpu")."""
        kern = self.cpu if device == "cpu" else self.triton
        if kern is None:
            raise LoweringError(self.why_not_fused)
        return kern.source(shapes) if device == "cpu" else kern.source(shapes, device)

    def resource_usage(self, shapes, dtype="bf16", target="sm_90"):
        if self.triton is None:
            raise LoweringError(self.why_not_fused)
        return self.triton.resource_usage(shapes, dtype=dtype, target=target)


def compile(cascade: Cascade, backend: str = "auto", split_kv: int | None = None):  # noqa: A001
    """A kernel for `cascade`: "auto" (dispatch per call), or one backend that raises
    ei.LoweringError when it has no lowering for the cascade ("triton", "cpu"), or
    "reference" (the interpreter). `split_kv`: None lets the cost model split the keys per
    call (split-KV decode on a GPU, docs/partial.md), 1 never splits, n > 1 always takes n
    splits (LoweringError at the call where the cascade has no partial states)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    kern = _compile(cascade, backend)
    if backend != "reference":
        kern.split_kv = split_kv
    return kern


def _compile(cascade: Cascade, backend: str):
    from einsum_ir.lowering.strategy import bounded_shifts

    if backend != "reference":
        cascade = bounded_shifts(cascade)
    if backend == "reference":
        from einsum_ir.codegen.kernel import ReferenceKernel

        return ReferenceKernel(cascade)
    if backend == "triton":
        from einsum_ir.codegen.kernel import compile_triton

        return compile_triton(cascade)
    if backend == "cpu":
        return _cpu_kernel(cascade)
    return AutoKernel(cascade)
