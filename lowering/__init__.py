"""Lowering: cascade-to-cascade rewrites (partitioning, online max, division deferral,
contraction fusion) and kernel plans (prologue / stream / carried / epilogue)."""
