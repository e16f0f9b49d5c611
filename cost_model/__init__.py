"""Cost model: pass analysis, op and byte counts, device table, rooflines, sparse-tile simulator.

Reads cascades from `einsum_ir` only; nothing here is specific to one variant.
"""
