"""What holding the KV cache in bfloat16 costs: the same text fed through the cache one token per
step (as `quill generate` decodes), with the model's inference weights, once with a float32 cache
and once with a bfloat16 one; mean loss per token of each.

`quill eval` scores whole windows without the cache, so it cannot see the cache's dtype. Here the
validation text (the last 10%) is cut into context-long windows, `--batch` at a time, each fed token
by token through a fresh cache; `--windows` bounds the work. Prints the CPU, human lines, then one
JSON line.

    python benchmarks/kv_cache_dtype.py --model shakespeare-char --data tinyshakespeare
    python benchmarks/kv_cache_dtype.py --model harpoon --data ../shared/data/gutenberg/austen-emma.txt
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from machine import cpu_info, describe

from quillgpt.checkpoint import load_model
from quillgpt.data import split_dataset
from quillgpt.infer.prepare import kv_cache_dtype, prepare_for_inference
from quillgpt.kvcache import KVCache


@torch.inference_mode()
def cached_loss(model, windows: torch.Tensor, targets: torch.Tensor, batch: int, dtype: torch.dtype) -> float:
    """Mean NLL per token over `windows` (N, T), fed one position per step through a cache in `dtype`."""
    total, count = 0.0, 0
    T = windows.shape[1]
    for start in range(0, len(windows), batch):
        x, y = windows[start : start + batch], targets[start : start + batch]
        cache = KVCache.allocate(model.config, len(x), dtype=dtype)
        for t in range(T):
            logits, _ = model(x[:, t : t + 1], pos=torch.full((len(x), 1), t), cache=cache)
            total += F.cross_entropy(logits[:, 0].float(), y[:, t], reduction="sum").item()
            count += len(x)
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shakespeare-char")
    p.add_argument("--data", default="tinyshakespeare", help="dataset name, text file or folder")
    p.add_argument("--weights", default="auto", help="inference weights, as `quill generate --weights`")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--windows", type=int, default=64, help="at most this many context-long windows")
    args = p.parse_args()
    machine = cpu_info()
    print(describe(machine))
    loaded = load_model(args.model)
    model = prepare_for_inference(loaded.model, args.weights)
    val = split_dataset(args.data).val
    ids = torch.tensor(loaded.tokenizer.encode(val))
    T = model.config.block_size
    n = min((len(ids) - 1) // T, args.windows)
    if n == 0:
        raise SystemExit(f"the validation text has {len(ids)} tokens, fewer than one context of {T} + 1")
    windows, targets = ids[: n * T].view(n, T), ids[1 : n * T + 1].view(n, T)
    losses = {
        str(dtype): cached_loss(model, windows, targets, args.batch, dtype) for dtype in (torch.float32, torch.bfloat16)
    }
    for dtype, loss in losses.items():
        print(f"{args.model} on {args.data} (last 10%, {n * T:,} tokens), {dtype} cache: {loss:.5f} nats/token")
    difference = losses["torch.bfloat16"] - losses["torch.float32"]
    print(
        f"bfloat16 cache - float32 cache: {difference:+.5f} nats/token (what `prepare_for_inference` uses here: "
        f"{kv_cache_dtype(model)})"
    )
    print(
        json.dumps(
            {
                "benchmark": "kv_cache_dtype",
                **machine,
                "model": args.model,
                "data": args.data,
                "weights": args.weights,
                "tokens": n * T,
                "nats_per_token": losses,
                "difference": difference,
            }
        )
    )


if __name__ == "__main__":
    main()
