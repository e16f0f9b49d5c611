"""Frontends: attention found in other people's code, turned into cascades.

- `attention`: captured softmax attention as an `AttentionPattern` (scale, causal/window
  predicates, softcap, mask, GQA) and the cascade written from it;
- `fx`: finds attention in a torch.fx graph (for the torch.compile backend in codegen);
- `mlir_import`: raises torch-mlir's linalg-on-tensors into a cascade (torch-mlir is an
  optional extra, imported lazily);
- `mlir_export`: a cascade as linalg.generic text (`to_mlir`), which torch-mlir's parser reads.
"""
