"""A Llama from a small config (random weights, nothing downloaded) on einsum-ir attention, two ways:

1. `torch.compile(model, backend="einsum_ir")`: the backend finds the model's attention in
   the graph (SDPA with grouped-query heads, the causal mask) and replaces it by the cascade
   kernel; Inductor compiles the rest.
2. `attn_implementation="einsum_ir"`: transformers' attention interface calls einsum-ir.

    python examples/hf_llama.py        (needs `pip install transformers`)
"""
import logging

import torch
import transformers

import einsum_ir.integrations.hf as eihf
from einsum_ir.codegen import dynamo_backend

logging.basicConfig(format="%(name)s: %(message)s")
logging.getLogger("einsum_ir.dynamo").setLevel(logging.INFO)  # say what was replaced and why
dynamo_backend.register()  # an installed package finds the backend through its entry point
eihf.register()

config = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, attn_implementation="sdpa")).eval()
ids = torch.randint(0, 256, (2, 32))

dynamo_backend.sites.clear()  # the sites this script's compile reports
with torch.no_grad():
    expected = model(ids).logits
    compiled = torch.compile(model, backend="einsum_ir")(ids).logits
print(f"backend: {sum(s.replaced for s in dynamo_backend.sites)} attention sites replaced, "
      f"max |compiled - eager| = {(compiled - expected).abs().max():.2e}")

torch.manual_seed(0)
hooked = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, attn_implementation="einsum_ir"))
with torch.no_grad():
    out = hooked.eval()(ids).logits
print(f"attention interface: max |einsum_ir - eager| = {(out - expected).abs().max():.2e}")

# Training works too: the custom op's backward recomputes through the reference interpreter.
loss = hooked.train()(ids, labels=ids).loss
loss.backward()
print(f"training step: loss {loss.item():.3f}, "
      f"|grad q_proj| = {hooked.model.layers[0].self_attn.q_proj.weight.grad.norm():.3f}")
