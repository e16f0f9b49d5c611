"""Cascades as PyTorch custom ops, so compiled kernels drop into models and training loops.

`torch.ops.einsum_ir.cascade(spec, tensors, scalars)` runs a single-output cascade given as
spec text: `tensors` in the order of its `input` line, `scalars` in the order of its runtime
`param` lines. It is a `torch.library` custom op with a fake (meta) implementation, so
torch.compile traces it as one opaque node with no graph break.

The op returns the output and the O(N) values the fused backward reads (for softmax the row
max and denominator, in fp32): the training forward of `ei.grad` (codegen/autograd.py). Its
backward, `einsum_ir::cascade_backward` (itself an opaque op, so AOTAutograd traces it), runs
the fused backward kernels. A cascade with no derivable backward returns the output alone and
recomputes it through the reference interpreter under autograd for the gradients (exact, O(N^2)
memory), with the reason logged at WARNING once.

`attention(q, k, v, ...)` is the SDPA-shaped entry point the torch.compile backend and the
Hugging Face hook call: it builds the cascade from an `AttentionPattern`, reshapes grouped
query heads into (G, R) ranks and mask tensors into the ranks they carry.
"""
from __future__ import annotations

import logging
import math
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

import torch

from einsum_ir.codegen.autograd import Training, recompute_gradients, run_backward, training_forward
from einsum_ir.errors import BindError, LoweringError
from einsum_ir.frontends.attention import AttentionPattern, is_default_scale
from einsum_ir.ir import Cascade
from einsum_ir.parser import parse

if TYPE_CHECKING:
    from einsum_ir.codegen.api import AutoKernel

log = logging.getLogger("einsum_ir")


@lru_cache(maxsize=None)
def cascade_of(spec: str) -> Cascade:
    """The parsed cascade of `spec` (parsed once per distinct text)."""
    return parse(spec, file="<custom op>")


@lru_cache(maxsize=None)
def _kernel(spec: str) -> "AutoKernel":
    """The compiled forward for `spec` (backend "auto"), built once per distinct text; its
    `.training` is the fused backward's."""
    from einsum_ir.codegen.api import AutoKernel

    return AutoKernel(cascade_of(spec))


@lru_cache(maxsize=None)
def _training(spec: str) -> Training | None:
    """The training forward and fused backward of `spec` (backend "auto" per cascade), or None
    when no backward is derived (the reason logged at WARNING, once per spec)."""
    t = _kernel(spec).training
    try:
        t.gradient
    except LoweringError as err:
        log.warning("no fused backward for this cascade; its gradients recompute it through the "
                    "reference interpreter (O(N^2) memory): %s", err)
        return None
    return t


def _arguments(c: Cascade, tensors: Sequence[torch.Tensor], scalars: Sequence[float]) -> dict:
    """Keyword arguments for a kernel or the interpreter from the op's positional lists."""
    runtime = [p for p in c.params if p.type is not None]
    if len(tensors) != len(c.inputs) or len(scalars) != len(runtime):
        raise BindError(f"the cascade takes tensors ({', '.join(c.input_names)}) and scalars "
                        f"({', '.join(p.name for p in runtime)}); got {len(tensors)} tensor(s) and "
                        f"{len(scalars)} scalar(s)")
    args = dict(zip(c.input_names, tensors))
    args.update({p.name: int(s) if p.type == "int" else float(s) for p, s in zip(runtime, scalars)})
    return args


def _shape(c: Cascade, name: str, tensors: Sequence[torch.Tensor], inputs: Cascade) -> list:
    """A tensor's shape from the inputs' (possibly symbolic) sizes, without running."""
    extent = {}
    for decl, t in zip(inputs.inputs, tensors):
        for idx, size in zip(decl.indices, t.shape):
            extent[idx.upper()] = size
    ranks = c.tensors[name].ranks
    missing = [r for r in ranks if r not in extent]
    if missing:
        raise BindError(f"output {name} has rank(s) {', '.join(missing)} that no input binds")
    return [extent[r] for r in ranks]


def _result_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The interpreter's rule: the output takes the dtype of the first floating input."""
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


@torch.library.custom_op("einsum_ir::cascade", mutates_args=())
def cascade_op(spec: str, tensors: list[torch.Tensor], scalars: list[float]) -> list[torch.Tensor]:
    """[the output, then the values saved for the fused backward (none without one)]."""
    c = _single_output(spec)
    args = _arguments(c, tensors, scalars)
    t = _training(spec)
    with torch.no_grad():
        if t is None:
            return [_kernel(spec)(**args)]
        outputs, saved = training_forward(t, args)
    return [*outputs, *saved.values()]


def _single_output(spec: str) -> Cascade:
    c = cascade_of(spec)
    if len(c.outputs) != 1:
        raise BindError(f"the custom op runs single-output cascades; this one has {c.output_names}")
    return c


@cascade_op.register_fake
def _(spec: str, tensors: list[torch.Tensor], scalars: list[float]) -> list[torch.Tensor]:
    c = _single_output(spec)
    dtype = _result_dtype(tensors)
    out = [tensors[0].new_empty(_shape(c, c.outputs[0].name, tensors, c), dtype=dtype)]
    t = _training(spec)
    if t is not None:
        g = t.gradient
        out += [tensors[0].new_empty(_shape(g.forward, n, tensors, c), dtype=torch.promote_types(dtype, torch.float32))
                for n in g.saved]
    return out


@torch.library.custom_op("einsum_ir::cascade_backward", mutates_args=())
def cascade_backward_op(spec: str, tensors: list[torch.Tensor], scalars: list[float],
                        results: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:
    """Gradients for every input (zeros for integer and boolean ones): the fused backward from
    the forward's `results` (output and saved values), else by recomputation."""
    c = cascade_of(spec)
    args = _arguments(c, tensors, scalars)
    t = _training(spec)
    if t is None:
        found = recompute_gradients(c, args, (grad,))
    else:
        with torch.no_grad():
            found = run_backward(t, args, tuple(results[:1]), dict(zip(t.gradient.saved, results[1:])), (grad,))
    # A custom op's outputs may not alias its inputs (a gradient can be `grad` itself).
    return [found[n].clone() if n in found else torch.zeros_like(x) for n, x in zip(c.input_names, tensors)]


@cascade_backward_op.register_fake
def _(spec: str, tensors: list[torch.Tensor], scalars: list[float],
      results: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:
    return [torch.empty_like(t) for t in tensors]


def _setup_context(ctx, inputs, output) -> None:
    spec, tensors, scalars = inputs
    ctx.spec, ctx.scalars, ctx.n_tensors = spec, scalars, len(tensors)
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*tensors, *output)


def _backward(ctx, grads: list[torch.Tensor]):
    stored = ctx.saved_tensors
    tensors, results = stored[:ctx.n_tensors], stored[ctx.n_tensors:]
    found = cascade_backward_op(ctx.spec, list(tensors), ctx.scalars, list(results), grads[0].contiguous())
    # torch.library matches this against the inputs' pytree, in which a list of floats is
    # one leaf but an empty list (vacuously a list of tensors) is a node.
    no_grad_scalars = None if ctx.scalars else []
    return None, [g if t.is_floating_point() else None for g, t in zip(found, tensors)], no_grad_scalars


cascade_op.register_autograd(_backward, setup_context=_setup_context)


def run(cascade: Cascade | str, **args) -> torch.Tensor:
    """Run a single-output cascade through the custom op, with arguments by name.

    `ei.interpret`'s calling convention (tensors and runtime params by name), but traceable by
    torch.compile and differentiable by the op's backward.
    """
    spec = cascade if isinstance(cascade, str) else str(cascade)
    c = cascade_of(spec)
    missing = [n for n in c.input_names if n not in args]
    if missing:
        raise BindError(f"missing input tensor(s) {', '.join(missing)}")
    tensors = [args.pop(n) for n in c.input_names]
    scalars = [float(args.pop(p.name)) for p in c.params if p.type is not None and p.name in args]
    if args:
        raise BindError(f"unexpected argument(s) {', '.join(args)}; tiles and derived params "
                        "cannot be passed through the custom op")
    return cascade_op(spec, tensors, scalars)[0]


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
              attn_mask: torch.Tensor | None = None, is_causal: bool = False,
              scale: float | None = None, window: int | None = None,
              softcap: float | None = None, enable_gqa: bool = False,
              offset: int | None = None, key_start: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention through the custom op, with SDPA's layout and meaning.

    query (B, H, P, E), key (B, Hkv, M, E), value (B, Hkv, M, F) -> (B, H, P, F).
    `is_causal` is top-left aligned (m <= p), as in SDPA. `window` keeps p - m < window
    (a sliding window, as in Mistral and Hugging Face). `softcap` applies
    cap * tanh(s / cap) to the scaled scores before the mask. A boolean `attn_mask` marks
    the points that take part; a float one is added to the scores. GQA with
    `enable_gqa=True` when H is a multiple of Hkv.

    After a KV cache: `offset=D` places query p at key position p + D, so causality is
    m <= p + D and the window p + D - m < window; `key_start` (B,) integers drop the keys
    m < key_start[b] (left padding). Both become loop bounds, not a mask read per tile.
    """
    b, h, p, e = query.shape
    h_kv = key.shape[1]
    gqa = h != h_kv
    if gqa and not (enable_gqa and h % h_kv == 0):
        raise ValueError(f"{h} query heads and {h_kv} key/value heads need enable_gqa=True and "
                         "a whole number of query heads per key/value head")
    pattern = dict(causal=is_causal, window=window is not None, softcap=softcap is not None,
                   gqa=gqa, default_scale=is_default_scale(scale, e), offset=offset is not None,
                   key_start=key_start is not None)
    q = query.reshape(b, h_kv, h // h_kv, p, e) if gqa else query
    tensors = [q, key, value]
    if attn_mask is not None:
        mask, ranks = _mask_operand(attn_mask, h_kv if gqa else None)
        pattern.update(mask="bool" if mask.dtype == torch.bool else "float", mask_ranks=ranks)
        tensors.append(mask)
    if key_start is not None:
        tensors.append(key_start.to(torch.int32))
    pat = AttentionPattern(**pattern)
    # Under torch.compile the spec is traced into a constant once; dynamo would only warn about
    # the cache wrapper.
    spec, runtime = ((pat.spec(), pat.runtime_params) if torch.compiler.is_compiling()
                     else _written(pat))
    scalars = {"scale": scale, "W": window, "cap": softcap, "D": offset}
    out = attention_call(spec, tensors, [float(scalars[n]) for n in runtime])
    return out.reshape(b, h, p, value.shape[-1]) if gqa else out


@lru_cache(maxsize=None)
def _written(pattern: AttentionPattern) -> tuple[str, tuple[str, ...]]:
    """A pattern's spec and runtime params, written once: a decode step calls every layer's
    attention with the same pattern."""
    return pattern.spec(), tuple(pattern.runtime_params)


def attention_call(spec: str, tensors: list[torch.Tensor], scalars: list[float]) -> torch.Tensor:
    """The output of a single-output cascade: through the custom op where autograd or
    torch.compile needs it, else the kernel itself. Inference saves no statistics for a
    backward, and a short query (a decode step) splits the keys across programs on a GPU."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return cascade_op(spec, tensors, scalars)[0]
    return _kernel(spec)(**_arguments(_single_output(spec), tensors, scalars))


def _mask_operand(mask: torch.Tensor, groups: int | None) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The mask with its broadcast dims squeezed away, and the ranks it keeps.

    Broadcasting to (B, H, P, M) follows SDPA. Under GQA (`groups` key/value heads) a head
    dim is split into (G, R) so the cascade can read it as Msk[b, g, r, p, m].
    """
    if mask.dim() > 4:
        raise ValueError(f"attn_mask has {mask.dim()} dims; at most 4 (B, H, P, M) broadcast")
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    keep = [k for k in range(4) if mask.shape[k] != 1]
    ranks = tuple("BHPM"[k] for k in keep)
    shape = []
    for k in keep:
        if k == 1 and groups is not None:
            shape += [groups, mask.shape[1] // groups]
        else:
            shape.append(mask.shape[k])
    return mask.reshape(shape), ranks


def reference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                        attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                        scale: float | None = None, window: int | None = None,
                        softcap: float | None = None) -> torch.Tensor:
    """The same attention in plain PyTorch ops (tests and examples compare against it)."""
    reps = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(reps, dim=1), value.repeat_interleave(reps, dim=1)
    s = query @ key.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(query.shape[-1]))
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    p, m = torch.arange(s.shape[-2]), torch.arange(s.shape[-1])
    keep = torch.ones(s.shape[-2:], dtype=torch.bool)
    if is_causal:
        keep &= m[None, :] <= p[:, None]
    if window is not None:
        keep &= p[:, None] - m[None, :] < window
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = keep & attn_mask
    elif attn_mask is not None:
        s = s + attn_mask
    s = s.masked_fill(~keep, -math.inf)
    return torch.softmax(s, dim=-1).nan_to_num() @ value
