"""Test-session setup, kept minimal.

- On a machine without a GPU, generated Triton kernels run in Triton's interpreter on CPU
  tensors, which needs TRITON_INTERPRET=1 before anything imports triton (torch may import it
  early). With a GPU it stays unset so kernels compile for it.
- The einsum-ir cache must not write into the user's home cache, but its AOT compiles take
  minutes to rebuild, so it lives in a stable per-checkout folder (gitignored with
  .pytest_cache) unless EINSUM_IR_CACHE_DIR is set already. Tests that need an empty cache
  point it at their own tmp_path.
"""
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("EINSUM_IR_CACHE_DIR",
                      str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "einsum_ir"))
