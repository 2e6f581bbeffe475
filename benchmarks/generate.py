"""Generation speed through the library's own `generate` path: prefill tokens/s, then decode tokens/s
at batch 1 and aggregate at batch 16, with and without the KV cache, for each way of holding the
weights — next to the machine's bound for batch 1.

Decoding one token reads every weight once, so batch-1 speed is bounded by memory bandwidth: the
benchmark measures this machine's read bandwidth in the same run and prints bound = bandwidth ÷
bytes of weights read per token beside each batch-1 figure (measured/bound). The fp32 bound is the
reference the targets use; bfloat16 and int8 read fewer bytes, so their own bounds are higher.

Variants (`--variants`):
  plain-fp32  the model as training leaves it (nn.Linear on MKL): the old default path
  fp32        prepare_for_inference(weights="float32"): oneDNN-packed linears, exact
  bf16        prepare_for_inference(weights="bfloat16")
  int8        prepare_for_inference(weights="int8"): int8 linear weights, a scale per row (Int8Linear)
  onnx        `quill export onnx` run by onnxruntime (OnnxDecoder; greedy, rows of equal length)
`auto` (what `quill generate`, `quill serve` and the playground use) is int8 on CPUs; the summary
names it, and whether decoding attends through the compiled kernel (`quillgpt.kernels`; with int8
and bf16 weights the KV cache is then bfloat16) or PyTorch's SDPA (`QUILL_KERNELS=0`).

Weights are random (speed does not depend on them) unless --model names a trained model; --config
builds any shape from a training config (e.g. configs/harpoon-226m.json).
Prints human-readable lines, then one JSON line.

    python benchmarks/generate.py [--model shakespeare-char | --config C] [--variants fp32,bf16]
    python benchmarks/generate.py --config configs/harpoon-226m.json --vocab-size 135 --new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from machine import cpu_info, describe, memory_read_bandwidth

from quillgpt.checkpoint import load_model
from quillgpt.config import GPTConfig, load_train_config
from quillgpt.generate import generate
from quillgpt.infer.int8 import Int8Linear
from quillgpt.infer.packed import PackedLinear
from quillgpt.infer.prepare import cpu_auto_weights, kv_cache_dtype, prepare_for_inference
from quillgpt.kernels import decode_attention_op
from quillgpt.kvcache import KVCache
from quillgpt.model import GPT
from quillgpt.sampling import SamplingParams
from quillgpt.tokenizer import CharTokenizer

SHAPE = GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384)  # nanoGPT's 10.7M
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # its 65 characters
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
WEIGHTS = {"plain-fp32": None, "fp32": "float32", "bf16": "bfloat16", "int8": "int8"}
BYTES_PER_WEIGHT = {"plain-fp32": 4, "fp32": 4, "bf16": 2, "int8": 1, "onnx": 4}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rss_mb() -> float:
    """This process's resident memory (Linux), in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def held_weight_mb(model: GPT) -> float:
    """Bytes of weights the model holds for decoding: parameters (not the shape-only placeholders of
    weights a prepared model let go), plus packed copies and int8 weights."""
    total = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    for m in model.modules():
        if isinstance(m, PackedLinear) and m.packed is not None:  # an Int8Linear may hold no packed copy
            total += m.packed.numel() * m.packed.element_size()
        if isinstance(m, Int8Linear):
            total += m.qweight.numel() + m.scale.numel() * m.scale.element_size()
            total += 0 if m.float16_copy is None else 2 * m.in_features * m.out_features  # its float16 copy
    return total / 1e6


def weights_read_per_token(model: GPT) -> int:
    """Weights a decode step reads: all but the embedding tables (one row each), plus the output
    matrix when it is tied to the token embedding."""
    c, n = model.config, model.num_params()
    n -= c.vocab_size * c.n_embd + (c.block_size * c.n_embd if c.pos_emb == "learned" else 0)
    return n + (c.vocab_size * c.n_embd if c.tie_embeddings else 0)


@torch.inference_mode()
def prefill_tokens_per_s(model: GPT, length: int, repeats: int = 5) -> float:
    idx = torch.randint(0, model.config.vocab_size, (1, length))
    cache = KVCache.allocate(model.config, 1, dtype=kv_cache_dtype(model))  # as the decoder holds it
    model(idx, cache=cache, last_only=True)  # warm-up
    return length * repeats / sum(timed(lambda: model(idx, cache=cache, last_only=True)) for _ in range(repeats))


def decode_tokens_per_s(model, tokenizer, batch: int, new_tokens: int, use_cache: bool) -> float:
    prompts = [TEXT[i % 7 : i % 7 + 16] for i in range(batch)]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.8, seed=0)
    generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=4), use_cache=use_cache)  # warm-up
    seconds = timed(lambda: generate(model, tokenizer, prompts, params, use_cache=use_cache, max_batch=batch))
    return batch * new_tokens / seconds


def onnx_rates(model: GPT, tokenizer, new_tokens: int) -> dict:
    """The same figures through onnxruntime, on a graph exported to a temporary file."""
    import tempfile

    from quillgpt.checkpoint import LoadedModel
    from quillgpt.interop.export_onnx import OnnxDecoder, export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(LoadedModel(model, tokenizer, Path(tmp)), Path(tmp) / "model.onnx")
        decoder = OnnxDecoder(path, threads=torch.get_num_threads())
        prompt = [tokenizer.encode(TEXT[:16])]
        decoder.greedy(prompt, 4)  # warm-up
        long = [[i % model.config.vocab_size for i in range(200)]]
        results = {"prefill_tokens_per_s": 200 / timed(lambda: decoder.prefill(long))}
        for batch in (1, 16):
            rate = batch * new_tokens / timed(lambda b=batch: decoder.greedy(prompt * b, new_tokens))
            results[f"decode_b{batch}_cache_tokens_per_s"] = rate
    return results


def base_model(args) -> tuple[GPT, object]:
    if args.model:
        loaded = load_model(args.model)
        return loaded.model, loaded.tokenizer
    config = SHAPE
    if args.config:
        train = load_train_config(args.config)
        vocab = args.vocab_size or train.vocab_size or len(train.encode or {}) or SHAPE.vocab_size
        config = GPTConfig(**{**train.model.to_dict(), "vocab_size": vocab})
    torch.manual_seed(0)
    extra = [chr(0x100 + i) for i in range(config.vocab_size - len(SHAKESPEARE_CHARS))]  # fill a larger vocabulary
    tokenizer = CharTokenizer([*SHAKESPEARE_CHARS, *extra][: config.vocab_size])
    return GPT(config).eval(), tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a trained model instead of random weights")
    p.add_argument("--config", default=None, help="a training config whose model shape to build (random weights)")
    p.add_argument("--vocab-size", type=int, default=None, help="with --config: the vocabulary (default 65)")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--uncached-tokens", type=int, default=50, help="new tokens for the slow no-cache runs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--variants", default="plain-fp32,fp32,bf16,int8,onnx", help=", ".join([*WEIGHTS, "onnx"]))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = cpu_info()
    print(describe(machine))
    bandwidth = memory_read_bandwidth()
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s (sum over a 512 MiB tensor)")
    base, tokenizer = base_model(args)
    read = weights_read_per_token(base)
    auto = next(variant for variant, weights in WEIGHTS.items() if weights == cpu_auto_weights())
    print(
        f"model: {base.num_params() / 1e6:.2f}M parameters, context {base.config.block_size}; "
        f"a decode step reads {read / 1e6:.2f}M weights ({read * 4 / 1e6:.1f} MB in fp32); "
        f"batch-1 bound in fp32: {bandwidth / (read * 4):,.0f} tokens/s"
    )
    print(f"default path (weights=auto) on this CPU: {auto}")
    kernel = decode_attention_op() is not None
    attention = "compiled kernel (quillgpt/kernels)" if kernel else "PyTorch SDPA (no kernel here)"
    print(f"decode attention: {attention}; QUILL_KERNELS=0 compares against PyTorch's")
    del base  # each variant builds its own (the same weights): a float32 copy kept beside it would count in RSS
    report = {}
    for variant in args.variants.split(","):
        if variant == "onnx":
            bound = bandwidth / (read * 4)
            model, _ = base_model(args)
            report[variant] = r = {**onnx_rates(model, tokenizer, args.new_tokens), "batch1_bound_tokens_per_s": bound}
            del model
            print(f"[onnx] prefill (200-token prompt):       {r['prefill_tokens_per_s']:9,.0f} tokens/s")
            b1, b16 = r["decode_b1_cache_tokens_per_s"], r["decode_b16_cache_tokens_per_s"]
            print(f"[onnx] decode batch  1, with cache:     {b1:9,.0f} tokens/s  = {b1 / bound:.0%} of its bound")
            print(f"[onnx] decode batch 16, with cache:     {b16:9,.0f} tokens/s (aggregate)")
            continue
        model, _ = base_model(args)
        if WEIGHTS[variant] is not None:
            prepare_for_inference(model, WEIGHTS[variant])
        bound = bandwidth / (read * BYTES_PER_WEIGHT[variant])
        results = {
            "prefill_tokens_per_s": prefill_tokens_per_s(model, min(200, model.config.block_size)),
            "batch1_bound_tokens_per_s": bound,
            "held_weights_mb": held_weight_mb(model),
        }
        print(f"[{variant}] weights held: {results['held_weights_mb']:,.0f} MB; process RSS {rss_mb():,.0f} MB")
        print(f"[{variant}] prefill (200-token prompt):       {results['prefill_tokens_per_s']:9,.0f} tokens/s")
        for batch in (1, 16):
            for use_cache in (True, False):
                if not use_cache and variant != "plain-fp32":
                    continue
                n = args.new_tokens if use_cache else args.uncached_tokens
                rate = decode_tokens_per_s(model, tokenizer, batch, n, use_cache)
                results[f"decode_b{batch}_{'cache' if use_cache else 'nocache'}_tokens_per_s"] = rate
                label = f"decode batch {batch:2d}, {'with' if use_cache else 'without'} cache:"
                extra = " (aggregate)" if batch > 1 else f"  = {rate / bound:.0%} of its bound ({bound:,.0f})"
                print(f"[{variant}] {label:34}{rate:9,.0f} tokens/s{extra}")
        results["rss_mb"] = rss_mb()
        report[variant] = results
        del model
    fp32_bound = bandwidth / (read * 4)
    for variant, r in report.items():
        b1, b16 = r["decode_b1_cache_tokens_per_s"], r["decode_b16_cache_tokens_per_s"]
        print(
            f"[{variant}{' = default' if variant == auto else ''}] batch 1: {b1:,.0f} tokens/s "
            f"(target >= 400; {b1 / fp32_bound:.0%} of the fp32 bound, target >= 60%); "
            f"batch 16: {b16:,.0f} tokens/s (target >= 3,000)"
        )
    summary = {
        "benchmark": "generate",
        **machine,
        "memory_read_gb_per_s": bandwidth / 1e9,
        "weights_read_per_token": read,
        "fp32_batch1_bound_tokens_per_s": fp32_bound,
        "default_variant": auto,
        "decode_attention": "kernel" if kernel else "sdpa",
        "results": report,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
