"""Lowering: cascade-to-cascade rewrites (partitioning, online max, division deferral,
contraction fusion) and kernel plans (prologue / key-side / stream / carried / epilogue)."""
from lowering.defer import defer_division
from lowering.masks import SkipPlan, skip_plan
from lowering.plan import Plan, Stage, build_plan
from lowering.rewrites import fuse_contractions, online, partition

__all__ = ["Plan", "SkipPlan", "Stage", "build_plan", "defer_division", "fuse_contractions",
           "online", "partition", "skip_plan"]
