"""Greedy generation through Hugging Face transformers: tokens per second with einsum-ir's
attention beside eager and SDPA, on a small Llama built from a config (random weights, no
download).

    python bench/generate.py                    # dynamic and static cache
    python bench/generate.py --new-tokens 128 --batch 8

The model: Llama with hidden size 512, 4 layers, 8 query heads on 2 KV heads (GQA), fp32.
A batch of prompts of different lengths, left-padded; greedy decoding. Every implementation
must produce the same tokens as eager (the script says so, or stops). With
`attn_implementation="einsum_ir"` each decode step's mask is recognized as a cache offset and
per-sequence key starts (`codegen/hf.py`), so it runs as loop bounds, never as a mask tensor.

The time of one `generate()` call after a warm-up call (the kernels compile then), best of
three; tokens per second count the new tokens of the whole batch. On a shared machine the
ratios measured in one run are the result, not the absolute numbers.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CONFIG = dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
IMPLS = ["eager", "sdpa", "einsum_ir"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=64, help="longest prompt, in tokens")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--caches", nargs="+", default=["dynamic", "static"], choices=["dynamic", "static"])
    args = ap.parse_args(argv)

    import torch
    import transformers

    import einsum_ir.integrations.hf as eihf

    eihf.register()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, CONFIG["vocab_size"], (args.batch, args.prompt), generator=g)
    mask = torch.ones_like(ids)
    for b in range(args.batch):  # prompts of different lengths: left padding
        mask[b, : (b * args.prompt) // (2 * args.batch)] = 0
    ids = ids.masked_fill(mask == 0, 0)
    print(f"Llama {CONFIG['num_hidden_layers']} layers, hidden {CONFIG['hidden_size']}, "
          f"{CONFIG['num_attention_heads']} heads on {CONFIG['num_key_value_heads']} KV heads, fp32; "
          f"batch {args.batch}, prompts up to {args.prompt} tokens (left-padded), {args.new_tokens} new tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'cache':<8} {'attention':<10} {'s / generate':>12} {'tokens/s':>9} {'vs eager':>8}  tokens")
    for cache in args.caches:
        reference, eager_time = None, None
        for impl in IMPLS:
            torch.manual_seed(0)
            config = transformers.LlamaConfig(**CONFIG, attn_implementation=impl, pad_token_id=0)
            model = transformers.LlamaForCausalLM(config).eval()

            def generate():
                with torch.no_grad():
                    return model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                          do_sample=False, cache_implementation=cache)
            out = generate()  # warm-up: kernels compile, caches allocate
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                generate()
                times.append(time.perf_counter() - t0)
            best = min(times)
            eager_time = eager_time or best
            same = "reference" if reference is None else ("same" if torch.equal(out, reference) else "DIFFER")
            reference = out if reference is None else reference
            print(f"{cache:<8} {impl:<10} {best:12.3f} {args.batch * args.new_tokens / best:9.0f} "
                  f"{eager_time / best:7.2f}x  {same}")
            if same == "DIFFER":
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
