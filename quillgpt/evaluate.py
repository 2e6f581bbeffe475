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

`adapt_lr` turns on dynamic evaluation (Krause et al., 2018): the model keeps learning from the text
as it reads it, the way an adaptive compressor (PPM, zpaq, NNCP) does. Windows are read in order,
one at a time; each window's new tokens are scored first, then one Adam step is taken on the loss
just paid for them, and every weight is pulled `ADAPT_DECAY` of the way back toward the model's own
(a long text cannot drag it far from what it was trained to be). No token is ever predicted by
weights that have seen it, and a decoder repeating the same steps could rebuild the text from the
code: the total is an honest code length. Every scored text starts again from the model's own
weights, and the caller's model is left as it was. It costs two to three times the compute of plain
scoring, and its numbers are reported as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from quillgpt.config import TrainConfig
from quillgpt.data import DataError, TokenSplits, get_batch, load_files, sequential_windows, split_dataset
from quillgpt.infer.packed import PackedLinear
from quillgpt.layout import reflow
from quillgpt.model import GPT
from quillgpt.tokenizer import CharTokenizer

SPLITS = ("val", "train", "all")
"""What `evaluate` scores: the validation split, the training split, or the whole text."""
LAYOUTS = ("original", "paragraph")
"""How scored text is laid out: as stored, or with hard-wrapped paragraphs re-flowed to one line."""
UNKNOWN_CHAR_BITS_PER_BYTE = 8.0
ADAPT_LR = 5e-4
"""`quill eval --adapt`'s learning rate when none is given (docs/results.md shows how it was chosen)."""
ADAPT_DECAY = 0.01
"""After each adaptation step every weight moves this fraction of the way back toward the model's own."""


def evaluate_ids(
    model: GPT, ids, batch_size: int = 16, stride: int | None = None, adapt_lr: float | None = None
) -> tuple[float, int]:
    """(total negative log-likelihood in nats, tokens scored) over a 1-D array of token ids;
    `adapt_lr`: learning as it reads (the module docstring)."""
    model.eval()
    if adapt_lr is not None:
        return _adapted_nll(model, ids, stride, adapt_lr)
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in sequential_windows(ids, model.config.block_size, batch_size, stride):
            nll, n = _window_nll(model, x, y)
            total += nll.item()
            count += n
    return total, count


def _window_nll(model: GPT, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed NLL of a batch of windows' scored targets (those >= 0), and how many there are."""
    device = next(model.parameters()).device
    logits, _ = model(x.to(device))
    y = y.to(device)
    nll = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-1, reduction="sum")
    return nll, int((y >= 0).sum())


def check_options(
    block_size: int, stride: int | None = None, adapt_lr: float | None = None, weights: str = "float32", flag: str = ""
) -> None:
    """`evaluate`'s window and adaptation options, checked before anything is loaded or read: a
    ValueError naming the option, prefixed by `flag` ("--": the CLI's flags). `weights`: how the model
    was loaded (`load_model`); adapting trains its float32 weights."""
    if stride is not None and not 1 <= stride <= block_size:
        raise ValueError(f"{flag}stride must be between 1 and the model's context length {block_size}, not {stride}")
    if adapt_lr is not None:
        if weights != "float32":
            raise ValueError(
                f"{flag}adapt trains the model's float32 weights; it cannot run with {flag}weights {weights}"
            )
        if not (math.isfinite(adapt_lr) and adapt_lr > 0):
            raise ValueError(f"{flag}adapt's learning rate must be a positive number, not {adapt_lr}")


def own_val_split(provenance: dict, data: str) -> str:
    """The validation split to score `data` with: the model's own (`val_split` in its provenance) when
    `data` is what it was trained on, else "concat"."""
    return provenance.get("val_split", "concat") if provenance.get("data") == str(data) else "concat"


def check_adaptable(model: GPT, lr: float) -> list[torch.nn.Parameter]:
    """The parameters adaptation trains; a ValueError for a bad learning rate or weights it cannot train."""
    check_options(model.config.block_size, adapt_lr=lr)
    params = [p for p in model.parameters() if p.requires_grad]
    packed = any(isinstance(m, PackedLinear) for m in model.modules())  # weights readied for decoding only
    if packed or not params or any(p.dtype != torch.float32 for p in params):
        raise ValueError("adapting while scoring needs the model's float32 weights (load it with weights='float32')")
    return params


def _adapted_nll(model: GPT, ids, stride: int | None, lr: float) -> tuple[float, int]:
    """Score each window, then take one Adam step on what it just paid and pull the weights back toward
    their own by `ADAPT_DECAY`; the weights are put back after."""
    params = check_adaptable(model, lr)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    own = [saved[name] for name, p in model.named_parameters() if p.requires_grad]  # the same order as params
    optimizer = torch.optim.Adam(params, lr=lr)
    total, count = 0.0, 0
    try:
        with torch.enable_grad():
            for x, y in sequential_windows(ids, model.config.block_size, 1, stride):
                nll, n = _window_nll(model, x, y)
                total += nll.item()  # scored before the step below learns from these tokens
                count += n
                optimizer.zero_grad(set_to_none=True)
                (nll / n).backward()
                optimizer.step()
                with torch.no_grad():
                    for p, p0 in zip(params, own):
                        p.lerp_(p0, ADAPT_DECAY)
    finally:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
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


def score_text(model: GPT, tokenizer, text: str, stride: int | None = None, adapt_lr: float | None = None) -> Score:
    """Score every token of `text` but the first (its context); see the module docstring."""
    ids = np.asarray(tokenizer.encode(text))
    if len(ids) < 2:  # the first token is only context
        raise DataError(f"a text of {len(ids)} token(s) is too short to score")
    nll, tokens = evaluate_ids(model, ids, stride=stride, adapt_lr=adapt_lr)
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
    adapt_lr: float | None = None,
) -> dict:
    """Loss, bits per character and per byte of `split` ("val", "train" or "all") of a dataset.

    With `val_split="per_file"` each file's piece is scored on its own (its own windows) and
    reported under "files"; the totals add up the pieces. `layout="paragraph"` re-flows the scored
    text (`quillgpt.layout.reflow`) first. `stride`: overlapping windows (the module docstring);
    the result's "stride" is the one used, the context length by default. `adapt_lr`: the model
    learns from each text as it scores it (the module docstring); "adapt_lr" in the result.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    block_size = model.config.block_size
    check_options(block_size, stride)
    if adapt_lr is not None:
        check_adaptable(model, adapt_lr)
    text_split = split_dataset(data, val_fraction, val_split)
    pieces = {"val": text_split.val_files, "train": text_split.train_files}.get(split)
    if pieces is None:  # "all": each whole file (per_file), or the whole text in one piece
        whole = [(text_split.val_files[0][0], text_split.train + text_split.val)]
        pieces = load_files(data) if val_split == "per_file" else whole
    total, per_file = None, {}
    for name, text in pieces:
        score = score_text(model, tokenizer, reflow(text) if layout == "paragraph" else text, stride, adapt_lr)
        per_file[name] = score
        total = score if total is None else total + score
    result = {
        "split": split,
        "val_split": val_split,
        "layout": layout,
        "stride": stride or block_size,
        "adapt_lr": adapt_lr,
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
