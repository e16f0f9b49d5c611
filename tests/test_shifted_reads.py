"""A read at a shifted index (`K[b,h,m+1,e]`) is absent past the tensor's extent, in the
interpreter and in every kernel: the lowering states it as a predicate (strategy.bounded_shifts),
so the last key, whose neighbour does not exist, is no key at all (not one whose neighbour is 0)."""
from __future__ import annotations

import pytest
import torch

import einsum_ir as ei
from einsum_ir.lowering.strategy import bounded_shifts
from einsum_ir.printer import print_einsum
from support import KERNEL_DEVICE, TOLERANCE, on_kernel_device

PAIRED = """dims B H P M E F
param scale = 1/sqrt(E)
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
KP[b,h,m,e] = K[b,h,m,e] + K[b,h,m+1,e]
S[b,h,p,m]  = Q[b,h,p,e] * KP[b,h,m,e] * scale
GM[b,h,p]   = max[m] S[b,h,p,m]
SN[b,h,p,m] = exp(S[b,h,p,m] - GM[b,h,p])
SD[b,h,p]   = SN[b,h,p,m]
O[b,h,p,f]  = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p]
output O
"""


def _inputs(M: int) -> dict:
    g = torch.Generator().manual_seed(M)
    return dict(Q=torch.randn(1, 2, 5, 8, generator=g), K=torch.randn(1, 2, M, 8, generator=g),
                V=torch.randn(1, 2, M, 4, generator=g))


def _formula(Q, K, V):
    """Softmax over the M - 1 keys that have a right neighbour."""
    kp = K[..., :-1, :] + K[..., 1:, :]
    return torch.softmax(Q @ kp.transpose(-1, -2) / Q.shape[-1] ** 0.5, -1) @ V[..., :-1, :]


def test_the_bound_is_a_predicate_of_the_reader():
    c = bounded_shifts(ei.parse(PAIRED))
    assert print_einsum(c.einsum("KP")).endswith("where m + 1 < M")
    assert bounded_shifts(c) == c  # stated once


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("M", [8, 9, 70])
def test_kernels_drop_the_key_without_a_neighbour(backend, M):
    if backend == "triton":
        pytest.importorskip("triton")
    c = ei.parse(PAIRED)
    args = _inputs(M)
    want = _formula(**args)
    torch.testing.assert_close(ei.interpret(c, **args), want, atol=1e-5, rtol=1e-5)
    run = on_kernel_device(args) if backend == "triton" else args
    got = ei.compile(c, backend=backend)(**run).cpu()
    tol = TOLERANCE if backend == "triton" and KERNEL_DEVICE == "cuda" else 1e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
