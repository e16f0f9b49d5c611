"""The cascade's dependency graph (networkx): tensors as nodes, reads as edges.

An edge `A -> B` means an Einsum writing B reads A. A read of an iterative tensor at the
previous step (`RD[m1]` inside the recurrence that writes `RD[m1+1]`) is marked `carried`:
it is the loop-carried dependency of a recurrence and is not a cycle.

networkx is imported by the functions that build or walk a graph, not with the module: it
takes a quarter of a second, which `import einsum_ir` need not spend.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from einsum_ir.ir import Access, Cascade, Einsum, Index, accesses, index_vars

if TYPE_CHECKING:
    import networkx as nx


def recurrence_position(e: Einsum) -> int | None:
    """Position of the `x+1` index on a recurrence's left side."""
    var = e.recurrence_var
    if var is None:
        return None
    return next(i for i, idx in enumerate(e.target.indices) if var in _vars(idx))


def _vars(expr) -> set[str]:
    return set(index_vars(expr))


def is_carried_read(c: Cascade, access: Access) -> bool:
    """True when `access` reads an iterative tensor at the step before the one being written."""
    for writer in c.writers(access.tensor):
        pos = recurrence_position(writer)
        if pos is not None and pos < len(access.indices):
            idx = access.indices[pos]
            return isinstance(idx, Index) and idx.name == writer.recurrence_var
    return False


def einsum_reads(e: Einsum) -> list[Access]:
    """Every tensor access of an Einsum: its right side, its predicate."""
    return e.reads


def dependency_graph(c: Cascade) -> nx.DiGraph:
    import networkx as nx

    g = nx.DiGraph()
    for d in c.inputs:
        g.add_node(d.name, role="input")
    for i in c.inits:
        g.add_node(i.target.tensor, role="intermediate")
    for e in c.einsums:
        g.add_node(e.name, role="intermediate")
    for o in c.outputs:
        if o.name in g:
            g.nodes[o.name]["role"] = "output"
    for e in c.einsums:
        for a in einsum_reads(e):
            carried = is_carried_read(c, a)
            if g.has_edge(a.tensor, e.name):
                g.edges[a.tensor, e.name]["carried"] &= carried
            else:
                g.add_edge(a.tensor, e.name, carried=carried)
    return g


def acyclic_view(g: nx.DiGraph) -> nx.DiGraph:
    """The graph without carried edges: what must be a DAG. A copy, not a filtered view: a
    view filters every edge on every visit, which made cycle finding on a 10,000-Einsum spec
    take seconds."""
    import networkx as nx

    dag = nx.DiGraph()
    dag.add_nodes_from(g.nodes(data=True))
    dag.add_edges_from((a, b, data) for a, b, data in g.edges(data=True) if not data["carried"])
    return dag


def topological_einsums(c: Cascade, graph: nx.DiGraph | None = None) -> list[Einsum]:
    """Einsums in an order where every tensor is written before it is read (within a step)."""
    import networkx as nx

    graph = dependency_graph(c) if graph is None else graph
    first: dict[str, int] = {}  # where each tensor is first written (inputs: -1, first of all)
    for i, e in enumerate(c.einsums):
        first.setdefault(e.name, i)
    order = {name: i for i, name in enumerate(nx.lexicographical_topological_sort(
        acyclic_view(graph), key=lambda n: f"{first.get(n, -1) + 1:09d}"))}
    return sorted(c.einsums, key=lambda e: order[e.name])


@dataclass(frozen=True)
class CascadeGraph:
    """A cascade's derived dependency facts, computed once (`cascade_graph`) and passed on:
    the graph, an order in which every tensor is written before it is read, and per tensor
    the Einsums that read it and its ancestors and descendants (not counting carried reads)."""

    cascade: Cascade
    graph: nx.DiGraph
    order: tuple[Einsum, ...]
    readers: Mapping[str, tuple[str, ...]]
    ancestors: Mapping[str, frozenset[str]]
    descendants: Mapping[str, frozenset[str]]


def cascade_graph(c: Cascade) -> CascadeGraph:
    import networkx as nx

    g = dependency_graph(c)
    dag = acyclic_view(g)
    readers: dict[str, list[str]] = {}
    for e in c.einsums:
        for a in einsum_reads(e):
            names = readers.setdefault(a.tensor, [])
            if e.name not in names:
                names.append(e.name)
    return CascadeGraph(c, g, tuple(topological_einsums(c, g)), {k: tuple(v) for k, v in readers.items()},
                        {n: frozenset(nx.ancestors(dag, n)) for n in g.nodes},
                        {n: frozenset(nx.descendants(dag, n)) for n in g.nodes})
