"""Lowering: cascade-to-cascade rewrites (partitioning, online max, division deferral,
contraction fusion) and kernel plans (prologue / key-side / stream / carried / epilogue)."""
from einsum_ir.lowering.defer import defer_division
from einsum_ir.lowering.masks import SkipPlan, skip_plan
from einsum_ir.lowering.plan import Plan, Stage, build_plan
from einsum_ir.lowering.rewrites import fuse_contractions, online, partition

__all__ = ["Plan", "SkipPlan", "Stage", "build_plan", "defer_division", "fuse_contractions",
           "online", "partition", "skip_plan"]
