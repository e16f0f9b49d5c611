"""Code generation and runtime: the Triton and CPU emitters, kernel cache and dispatch, and the
PyTorch integrations (custom op, torch.compile backend, Hugging Face attention)."""
