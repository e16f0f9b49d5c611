"""Test-session setup, kept minimal: on a machine without a GPU, generated Triton kernels run
in Triton's interpreter on CPU tensors, which needs TRITON_INTERPRET=1 before anything imports
triton (torch may import it early). With a GPU it stays unset so kernels compile for it."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
