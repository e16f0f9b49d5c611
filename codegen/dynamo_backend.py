"""The torch.compile backend: `torch.compile(model, backend="einsum_ir")`.

Dynamo hands the backend an FX graph. `einsum_ir.frontends.fx.find_attention` finds the
attention in it (SDPA calls and explicit matmul -> softmax -> matmul chains, with masks built
from index arithmetic turned into causal/window predicates). Each match is replaced by one call
to `codegen.torch_op.attention`, i.e. the cascade custom op, and the graph then goes to
Inductor (or to the backend named by `options={"inner": ...}`, e.g. "aot_eager", which skips
Inductor's C++ compile and is what the fast tests use).

Every site is logged on the "einsum_ir.dynamo" logger: what was replaced, by which pattern
(and catalog variant), and why anything else was left. `sites` keeps the same records.

The backend is found by name through the `torch_dynamo_backends` entry point of the installed
package; `register()` does the same by hand (for a source checkout).
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx

from einsum_ir.codegen.torch_op import attention
from einsum_ir.frontends.fx import Site, find_attention

NAME = "einsum_ir"
log = logging.getLogger("einsum_ir.dynamo")

# Every attention candidate seen by the backend since the last `sites.clear()`, in order.
sites: list[Site] = []


def einsum_ir_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None,
                      **_) -> object:
    """Replace attention in `gm` by cascade kernels, then compile the rest with Inductor."""
    rewrite(gm)
    inner = (options or {}).get("inner", "inductor")
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    return torch._dynamo.lookup_backend(inner)(gm, example_inputs)


def rewrite(gm: fx.GraphModule) -> list[Site]:
    """Replace every matched attention site in `gm` in place; return all candidates."""
    found = find_attention(gm.graph)
    for site in found:
        if site.replaced:
            _replace(gm.graph, site)
        log.info("%s", site.describe())
    sites.extend(found)
    gm.graph.eliminate_dead_code()  # the old scores, softmax and mask-building nodes
    gm.graph.lint()
    gm.recompile()
    return found


def _replace(graph: fx.Graph, site: Site) -> None:
    pattern = site.pattern
    with graph.inserting_before(site.anchor):
        mask = site.mask
        if mask is not None and site.invert_mask:  # masked_fill drops True points; SDPA keeps them
            mask = graph.call_function(torch.logical_not, (mask,))
        new = graph.call_function(attention, (site.query, site.key, site.value), {
            "attn_mask": mask, "is_causal": pattern.causal, "scale": site.scalars["scale"],
            "window": site.scalars["window"], "softcap": site.scalars["softcap"],
            "enable_gqa": pattern.gqa,
        })
    new.meta.update(site.anchor.meta)
    site.anchor.replace_all_uses_with(new)
    graph.erase_node(site.anchor)


def register(name: str = NAME) -> None:
    """Make `backend=name` work without the installed entry point (idempotent)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if name not in _BACKENDS and name not in torch._dynamo.list_backends(exclude_tags=()):
        register_backend(compiler_fn=einsum_ir_backend, name=name)
