"""Training throughput of the 10.7M-parameter Shakespeare shape, through the real `quill train` loop.

Shape: 6 layers, 384 wide, 6 heads, context 256, batch 16, fp32 (nanoGPT's Shakespeare model).
For each variant it trains a few steps on Tiny Shakespeare and times the steady state (the first
steps, and torch.compile's warm-up, are left out). MFU is relative to an fp32 matmul peak measured
in the same run, so bfloat16 variants (autocast, `dtype: bfloat16`) can pass 100%. Prints
human-readable lines, then one JSON line.

    python benchmarks/train.py [--steps 20] [--variants eager,compile,compile-bf16] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from machine import cpu_info, describe

from quillgpt.config import train_config_from_dict
from quillgpt.device import measure_matmul_peak
from quillgpt.model import GPT
from quillgpt.train import train

SHAPE = dict(n_layer=6, n_embd=384, n_head=6, block_size=256, batch_size=16, dropout=0.0)
MODERN = {
    "pos_emb": "rope",
    "norm": "rmsnorm",
    "norm_affine": False,
    "qk_norm": True,
    "activation": "relu2",
    "tie_embeddings": False,
    "bias": False,
    "optimizer": "muon",
}  # the shipped models' recipe
VARIANTS = {
    "eager": {},
    "compile": {"compile": True},
    "modern-eager": MODERN,
    "modern-compile": {**MODERN, "compile": True},
    "bf16": {"dtype": "bfloat16"},
    "compile-bf16": {"compile": True, "dtype": "bfloat16"},
    "modern-compile-bf16": {**MODERN, "compile": True, "dtype": "bfloat16"},
}


def measure(variant: str, steps: int, warmup: int, data: str) -> dict:
    cfg = train_config_from_dict(
        {
            **SHAPE,
            **VARIANTS[variant],
            "max_iters": warmup + steps,
            "eval_interval": 10**6,
            "eval_iters": 1,
            "device": "cpu",
        }
    )
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        train(cfg, out, data=data, progress=False, on_step=lambda step, loss: stamps.append(time.perf_counter()))
    timed = stamps[warmup - 1 :]
    seconds = (timed[-1] - timed[0]) / (len(timed) - 1)
    tokens_per_s = SHAPE["batch_size"] * SHAPE["block_size"] / seconds
    model = GPT(cfg.model)
    return {
        "variant": variant,
        "step_ms": seconds * 1000,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": model.config.flops_per_token(model.num_params(non_embedding=True)),
        "params": model.num_params(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--variants", default="eager,compile")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", default="tinyshakespeare")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = measure_matmul_peak(2.0)
    machine = cpu_info()
    print(f"{describe(machine)}; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    results = []
    for variant in args.variants.split(","):
        r = measure(variant, args.steps, args.warmup, args.data)
        r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak
        results.append(r)
        print(
            f"{variant:>15}: {r['tokens_per_s']:7,.0f} tokens/s  {r['step_ms']:7.1f} ms/step  MFU {r['mfu']:.1%}"
            f"  ({r['params'] / 1e6:.2f}M params)"
        )
    best = max(results, key=lambda r: r["tokens_per_s"])
    print(f"best: {best['variant']} at {best['tokens_per_s']:,.0f} tokens/s (target >= 2,000)")
    print(
        json.dumps(
            {
                "benchmark": "train",
                **machine,
                "peak_flops": peak,
                "threads": torch.get_num_threads(),
                "shape": SHAPE,
                "results": results,
                "best_tokens_per_s": best["tokens_per_s"],
            }
        )
    )


if __name__ == "__main__":
    main()
