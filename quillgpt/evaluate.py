"""Deterministic loss of a model over a whole split: every token once, in consecutive windows;
and `estimate_loss`, the quick estimate on fixed random batches that training logs.

Non-overlapping windows of the model's context length give each position the same spread of
context lengths as nanoGPT's random-window estimate, so the numbers stay comparable with it; an
overlapping stride would give every token a long context and flatter the result.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from quillgpt.config import TrainConfig
from quillgpt.data import DataError, TokenSplits, get_batch, load_text, sequential_windows, tokenize_splits
from quillgpt.model import GPT


@torch.no_grad()
def evaluate_ids(model: GPT, ids, batch_size: int = 16) -> tuple[float, int]:
    """(total negative log-likelihood in nats, tokens scored) over a 1-D array of token ids."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y in sequential_windows(ids, model.config.block_size, batch_size):
        logits, _ = model(x.to(device))
        y = y.to(device)
        nll = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-1, reduction="sum")
        total += nll.item()
        count += int((y >= 0).sum())
    return total, count


def evaluate(model: GPT, tokenizer, data: str, split: str = "val", val_fraction: float = 0.1) -> dict:
    """Loss, bits per character and per byte of `split` ("val", "train" or "all") of a dataset."""
    text = load_text(data)
    ids = tokenize_splits(text, tokenizer, val_fraction)
    arr = {"val": ids.val, "train": ids.train}.get(split)
    if arr is None:  # "all": the whole text, encoded in one piece
        arr = np.asarray(tokenizer.encode(text))
    if len(arr) < 2:  # the first token is only context
        raise DataError(f"the {split} split of {data} has {len(arr)} token(s): too short to score")
    nll, tokens = evaluate_ids(model, arr)
    scored_text = tokenizer.decode(arr[1:].tolist())  # the first token is context, never a target
    return {
        "split": split,
        "val_loss" if split == "val" else "loss": nll / tokens,
        "bits_per_token": nll / tokens / math.log(2),
        "bits_per_char": nll / len(scored_text) / math.log(2),
        "bits_per_byte": nll / len(scored_text.encode("utf-8")) / math.log(2),
        "tokens": tokens,
        "characters": len(scored_text),
        "data_sha256": ids.data_sha256,
    }


@torch.no_grad()
def estimate_loss(model: GPT, splits: TokenSplits, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Mean loss on fixed batches: the same `eval_iters` windows of each split at every evaluation."""
    was_training = model.training
    model.eval()
    out = {}
    for i, (name, data) in enumerate((("train", splits.train), ("val", splits.val))):
        g = torch.Generator().manual_seed(cfg.seed + 7919 * (i + 1))
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = get_batch(data, cfg.batch_size, model.config.block_size, g)
            losses.append(model(x.to(device), y.to(device))[1].item())
        out[name] = sum(losses) / len(losses)
    model.train(was_training)
    return out
