"""Generation speed of the 10.7M-parameter Shakespeare shape (6 layers, 384 wide, 6 heads, context
256, char vocab 65), through the library's own `generate` path: prefill tokens/s, then decode
tokens/s at batch 1 and aggregate at batch 16, with and without the KV cache.

Weights are random (speed does not depend on them) unless --model names a trained model.
Variants: fp32 weights, and int8 weights (`quantize_int8`, PyTorch dynamic quantization).
Prints human-readable lines, then one JSON line.

    python benchmarks/generate.py [--new-tokens 200] [--model shakespeare-char] [--variants fp32,int8]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from quillgpt.checkpoint import load_model
from quillgpt.config import GPTConfig
from quillgpt.generate import SamplingParams, generate
from quillgpt.model import GPT, KVCache, quantize_int8
from quillgpt.tokenizer import CharTokenizer

SHAPE = GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384)
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # its 65 characters
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.inference_mode()
def prefill_tokens_per_s(model: GPT, length: int, repeats: int = 5) -> float:
    idx = torch.randint(0, model.config.vocab_size, (1, length))
    cache = KVCache.allocate(model.config, 1)
    model(idx, cache=cache, last_only=True)  # warm-up
    return length * repeats / sum(timed(lambda: model(idx, cache=cache, last_only=True)) for _ in range(repeats))


def decode_tokens_per_s(model, tokenizer, batch: int, new_tokens: int, use_cache: bool) -> float:
    prompts = [TEXT[i % 7 : i % 7 + 16] for i in range(batch)]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.8, seed=0)
    generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=4), use_cache=use_cache)  # warm-up
    seconds = timed(lambda: generate(model, tokenizer, prompts, params, use_cache=use_cache, max_batch=batch))
    return batch * new_tokens / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a trained model instead of random weights")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--uncached-tokens", type=int, default=50, help="new tokens for the slow no-cache runs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--variants", default="fp32,int8", help="fp32 weights, int8 weights (quantize_int8)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        loaded = load_model(args.model)
        base, tokenizer = loaded.model, loaded.tokenizer
    else:
        torch.manual_seed(0)
        base, tokenizer = GPT(SHAPE).eval(), CharTokenizer(SHAKESPEARE_CHARS)
    print(
        f"model: {base.num_params() / 1e6:.2f}M parameters, context {base.config.block_size}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    report = {}
    for variant in args.variants.split(","):
        model = quantize_int8(copy.deepcopy(base)) if variant == "int8" else base
        results = {"prefill_tokens_per_s": prefill_tokens_per_s(model, 200)}
        print(f"[{variant}] prefill (200-token prompt):       {results['prefill_tokens_per_s']:9,.0f} tokens/s")
        for batch in (1, 16):
            for use_cache in (True, False):
                if not use_cache and variant != "fp32":
                    continue
                n = args.new_tokens if use_cache else args.uncached_tokens
                rate = decode_tokens_per_s(model, tokenizer, batch, n, use_cache)
                results[f"decode_b{batch}_{'cache' if use_cache else 'nocache'}_tokens_per_s"] = rate
                label = f"decode batch {batch:2d}, {'with' if use_cache else 'without'} cache:"
                print(f"[{variant}] {label:34}{rate:9,.0f} tokens/s{' (aggregate)' if batch > 1 else ''}")
        report[variant] = results
    for variant, r in report.items():
        print(
            f"[{variant}] targets: batch-1 decode >= 400 tokens/s: {r['decode_b1_cache_tokens_per_s']:,.0f}; "
            f"batch-16 aggregate >= 3,000 tokens/s: {r['decode_b16_cache_tokens_per_s']:,.0f}"
        )
    print(json.dumps({"benchmark": "generate", "threads": torch.get_num_threads(), "results": report}))


if __name__ == "__main__":
    main()
