"""`ei.compile(cascade, backend=...)`: the entry point of code generation."""
from __future__ import annotations

from einsum_ir.errors import LoweringError
from einsum_ir.ir import Cascade

BACKENDS = ("auto", "triton", "reference", "cpu")


class AutoKernel:
    """backend="auto": the Triton kernel when the inputs are CUDA tensors and a fused lowering
    exists, else the reference interpreter (`why_not_fused` says why)."""

    backend = "auto"

    def __init__(self, cascade: Cascade):
        from codegen.kernel import ReferenceKernel

        self.cascade = cascade
        self.reference = ReferenceKernel(cascade)
        try:
            from codegen.kernel import TritonKernel

            self.triton = TritonKernel(cascade)
            self.why_not_fused = None
        except (LoweringError, ImportError) as err:
            self.triton = None
            self.why_not_fused = str(err)

    def __call__(self, **args):
        import torch

        cuda = any(isinstance(v, torch.Tensor) and v.is_cuda for v in args.values())
        if self.triton is not None and cuda:
            return self.triton(**args)
        return self.reference(**args)

    def source(self, shapes=None, device="h100") -> str:
        if self.triton is None:
            raise LoweringError(self.why_not_fused)
        return self.triton.source(shapes, device)

    def resource_usage(self, shapes, dtype="bf16", target="sm_90"):
        if self.triton is None:
            raise LoweringError(self.why_not_fused)
        return self.triton.resource_usage(shapes, dtype=dtype, target=target)


def compile(cascade: Cascade, backend: str = "auto"):  # noqa: A001
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "reference":
        from codegen.kernel import ReferenceKernel

        return ReferenceKernel(cascade)
    if backend == "triton":
        from codegen.kernel import TritonKernel

        return TritonKernel(cascade)
    if backend == "cpu":
        from codegen.kernel import ReferenceKernel

        return ReferenceKernel(cascade)  # the tiled CPU emitter is a later issue
    return AutoKernel(cascade)
