"""Hooks into other libraries. Each one imports its heavy parts (codegen, the library itself)
only when called, so `import einsum_ir` stays light."""
