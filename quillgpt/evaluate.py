"""Deterministic loss of a model over a whole split: every token once, in consecutive windows;
and `estimate_loss`, the quick estimate on fixed random batches that training logs.

Non-overlapping windows of the model's context length give each position the same spread of
context lengths as nanoGPT's random-window estimate, so the numbers stay comparable with it; that is
the default. `stride` asks for overlapping windows instead: each advances `stride` tokens and scores
only its new tokens, so every token after the first window is predicted from at least
context - stride tokens before it, as a compressor (which keeps its whole past) predicts. It costs
context / stride times the compute and gives lower numbers; they are reported as such, never mixed
with the default ones.

Bits per byte of the UTF-8 text is the unit that compares any two models: every byte of the scored
text is paid for. The first token of each scored text is context, never a target. A character
model's unknown-character token (`CharTokenizer(unk=True)`) stands for a whole class of
characters, so each character it stands for costs the model's probability of the token plus
8 bits per byte of the character's UTF-8 (spelling the character out); a vocabulary without that
token cannot score text with other characters at all (a TokenizerError names them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from quillgpt.config import TrainConfig
from quillgpt.data import DataError, TokenSplits, get_batch, load_files, sequential_windows, split_dataset
from quillgpt.layout import reflow
from quillgpt.model import GPT
from quillgpt.tokenizer import CharTokenizer

LAYOUTS = ("original", "paragraph")
"""How scored text is laid out: as stored, or with hard-wrapped paragraphs re-flowed to one line."""
UNKNOWN_CHAR_BITS_PER_BYTE = 8.0


@torch.no_grad()
def evaluate_ids(model: GPT, ids, batch_size: int = 16, stride: int | None = None) -> tuple[float, int]:
    """(total negative log-likelihood in nats, tokens scored) over a 1-D array of token ids."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y in sequential_windows(ids, model.config.block_size, batch_size, stride):
        logits, _ = model(x.to(device))
        y = y.to(device)
        nll = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-1, reduction="sum")
        total += nll.item()
        count += int((y >= 0).sum())
    return total, count


@dataclass
class Score:
    """What scoring one text cost: the model's NLL and the characters spelled out beside it."""

    nll: float
    """Nats the model paid for the scored tokens."""
    tokens: int
    characters: int
    bytes: int
    unknown_characters: int = 0
    unknown_bits: float = 0.0
    """8 bits per UTF-8 byte of each character the unknown token stood for."""

    @property
    def bits(self) -> float:
        return self.nll / math.log(2) + self.unknown_bits

    def __add__(self, other: Score) -> Score:
        return Score(*(getattr(self, f) + getattr(other, f) for f in Score.__dataclass_fields__))

    def summary(self) -> dict:
        return {
            "bits_per_token": self.nll / self.tokens / math.log(2),
            "bits_per_char": self.bits / self.characters,
            "bits_per_byte": self.bits / self.bytes,
            "tokens": self.tokens,
            "characters": self.characters,
            "bytes": self.bytes,
            "unknown_characters": self.unknown_characters,
        }


def score_text(model: GPT, tokenizer, text: str, stride: int | None = None) -> Score:
    """Score every token of `text` but the first (its context); see the module docstring."""
    ids = np.asarray(tokenizer.encode(text))
    if len(ids) < 2:  # the first token is only context
        raise DataError(f"a text of {len(ids)} token(s) is too short to score")
    nll, tokens = evaluate_ids(model, ids, stride=stride)
    if isinstance(tokenizer, CharTokenizer):
        scored = text[1:]  # one token per character
    else:
        scored = tokenizer.decode(ids[1:].tolist())
    unknown = tokenizer.unknown(scored) if isinstance(tokenizer, CharTokenizer) else []
    n_unknown, unknown_bits = 0, 0.0
    if unknown:
        counts = {c: scored.count(c) for c in unknown}
        n_unknown = sum(counts.values())
        unknown_bits = sum(UNKNOWN_CHAR_BITS_PER_BYTE * len(c.encode("utf-8")) * n for c, n in counts.items())
    return Score(nll, tokens, len(scored), len(scored.encode("utf-8")), n_unknown, unknown_bits)


def evaluate(
    model: GPT,
    tokenizer,
    data: str,
    split: str = "val",
    val_fraction: float = 0.1,
    val_split: str = "concat",
    layout: str = "original",
    stride: int | None = None,
) -> dict:
    """Loss, bits per character and per byte of `split` ("val", "train" or "all") of a dataset.

    With `val_split="per_file"` each file's piece is scored on its own (its own windows) and
    reported under "files"; the totals add up the pieces. `layout="paragraph"` re-flows the scored
    text (`quillgpt.layout.reflow`) first. `stride`: overlapping windows (the module docstring);
    the result's "stride" is the one used, the context length by default.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    block_size = model.config.block_size
    if stride is not None and not 1 <= stride <= block_size:
        raise ValueError(f"stride must be between 1 and the model's context length {block_size}, not {stride}")
    text_split = split_dataset(data, val_fraction, val_split)
    pieces = {"val": text_split.val_files, "train": text_split.train_files}.get(split)
    if pieces is None:  # "all": each whole file (per_file), or the whole text in one piece
        whole = [(text_split.val_files[0][0], text_split.train + text_split.val)]
        pieces = load_files(data) if val_split == "per_file" else whole
    total, per_file = None, {}
    for name, text in pieces:
        score = score_text(model, tokenizer, reflow(text) if layout == "paragraph" else text, stride)
        per_file[name] = score
        total = score if total is None else total + score
    result = {
        "split": split,
        "val_split": val_split,
        "layout": layout,
        "stride": stride or block_size,
        "val_loss" if split == "val" else "loss": total.nll / total.tokens,
        **total.summary(),
        "data_sha256": text_split.data_sha256,
    }
    if len(per_file) > 1:
        result["files"] = {name: s.summary() for name, s in per_file.items()}
    return result


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
