"""Hugging Face transformers: `attn_implementation="einsum_ir"` through the attention interface.

`register()` adds two functions under one name:
- an attention function (`AttentionInterface`), which runs the model's attention through the
  cascade custom op, honouring scaling, causality, the sliding window, logit softcapping and
  grouped-query heads (key/value heads are never repeated);
- a mask function (`AttentionMaskInterface`), which returns None when the model's mask is
  exactly the causal (optionally sliding-window) band or no mask at all, so the attention
  function uses predicates (`m <= p`, `p - m < W`) instead of a dense mask tensor.

Generation (`model.generate`, with the dynamic or the static cache) passes a dense mask at every
step: causal from the query's place after the cached keys, windowed, and left-padded per
sequence. The attention function recognizes that shape exactly (`key_interval`) and runs it as
predicates too: `m <= p + D`, `p + D - m < W`, `m >= Ks[b]`, loop bounds per sequence (the
static cache's unused tail is never visited, and a short query splits the keys across programs).
Any other mask (packed sequences, chunks) stays a dense boolean tensor, read by the cascade as a
tensor predicate, so the result is exact either way.
"""
from __future__ import annotations

import torch

from einsum_ir.codegen.torch_op import attention

NAME = "einsum_ir"


def register(name: str = NAME) -> None:
    """Make `attn_implementation=name` select einsum-ir's attention in transformers models."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, attention_mask)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      scaling: float | None = None, dropout: float = 0.0,
                      sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention-interface signature: (B, H, P, E) heads in, (B, P, H, F) out."""
    if dropout:
        raise NotImplementedError(f"einsum_ir attention has no attention dropout (got p={dropout}); "
                                  "set the config's attention dropout to 0 or call model.eval()")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # With a mask, the mask already holds causality and the window (as in transformers' SDPA
    # path); a single query attends to the whole cache.
    predicates = attention_mask is None and query.shape[2] > 1
    causal = bool(causal and predicates)
    interval = key_interval(attention_mask, sliding_window) if attention_mask is not None else None
    if interval is not None:
        key_start, offset = interval
        out = attention(query, key, value, is_causal=True, scale=scaling, window=sliding_window,
                        softcap=softcap, enable_gqa=query.shape[1] != key.shape[1], offset=offset,
                        key_start=key_start)
    else:
        out = attention(query, key, value, attn_mask=attention_mask, is_causal=causal, scale=scaling,
                        window=sliding_window if causal else None, softcap=softcap,
                        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


_last_interval: list = []  # [(mask, version, window), result]: a step's layers share one mask


def key_interval(mask: torch.Tensor, window: int | None) -> tuple[torch.Tensor, int] | None:
    """(Ks, D) when the boolean (B, 1, P, M) `mask` is exactly `m <= p + D` (and
    `p + D - m < window`) and `m >= Ks[b]`, else None: the mask of a generation step after
    D cached keys, with Ks[b] padding tokens on the left of sequence b. Checked point by point
    against the mask, so a mask of any other shape keeps its dense form."""
    key = (mask, mask._version, window)
    if _last_interval and _last_interval[0][0] is mask and _last_interval[0][1:] == key[1:]:
        return _last_interval[1]
    result = _interval(mask, window)
    _last_interval[:] = [key, result]
    return result


def _interval(mask: torch.Tensor, window: int | None) -> tuple[torch.Tensor, int] | None:
    if torch.compiler.is_compiling() or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    rows = mask[:, 0]  # (B, P, M)
    _, p_len, m_len = rows.shape
    last = rows[:, -1]
    if not bool(last.any()):
        return None
    m = torch.arange(m_len, device=mask.device)
    offset = int(torch.where(last, m, -1).max()) - (p_len - 1)  # the last query's last key
    first = torch.where(rows, m, m_len).amin(dim=(1, 2))  # each sequence's first key (padded rows see none)
    p = torch.arange(p_len, device=mask.device)[:, None]
    band = m <= p + offset
    if window is not None:
        band &= p + offset - m < window
    expected = band[None] & (m >= first[:, None, None])
    return (first.to(torch.int32), offset) if torch.equal(expected, rows) else None


def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                   kv_offset: int = 0, mask_function=None, attention_mask: torch.Tensor | None = None,
                   local_size: int | None = None, **kwargs) -> torch.Tensor | None:
    """The model's boolean mask, or None when predicates say the same thing."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    dense = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                      q_offset=q_offset, kv_offset=kv_offset,
                      mask_function=mask_function or causal_mask_function,
                      attention_mask=attention_mask, local_size=local_size, **kwargs)
    # Comparing values needs concrete tensors; under tracing the dense mask is always right.
    aligned = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0
    if torch.compiler.is_compiling() or not aligned or q_length != kv_length or dense is None:
        return dense
    p = torch.arange(q_length, device=dense.device)[:, None]
    m = torch.arange(kv_length, device=dense.device)[None, :]
    band = m <= p
    if local_size is not None:
        band &= p - m < local_size
    if bool(dense.all()) or torch.equal(dense, band.expand_as(dense)):
        return None
    return dense
