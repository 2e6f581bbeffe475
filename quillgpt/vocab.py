"""A new model's vocabulary: the tokenizer a training config asks for, built from its dataset.

Above both the tokenizers and the dataset registry (GPT-2's files are a registered dataset), so
neither needs the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from quillgpt.config import TrainConfig
from quillgpt.data import TextSplit, get_dataset
from quillgpt.tokenizer import BPETokenizer, CharTokenizer


def build_tokenizer(
    cfg: TrainConfig,
    split: TextSplit | None = None,
    *,
    chars: Iterable[str] | None = None,
    gpt2_dir: str | Path | None = None,
) -> CharTokenizer | BPETokenizer:
    """A new model's tokenizer, as a training config asks for it (`quill train` and `quill init`).

    First match wins: the config's own `encode`/`decode` maps (the original QuillGPT's configs);
    `chars`, an explicit vocabulary in its order; then `cfg.tokenizer`: "char" takes the sorted
    characters of the dataset (with `unk_token`: those seen `min_char_count` times in the training
    split, plus the unknown token); "bpe" trains on the training split only, so validation text
    never shapes the merges; "gpt2" reads GPT-2's `vocab.json` and `merges.txt` from `gpt2_dir`
    (default: the registered `gpt2` dataset).
    """
    if cfg.encode is not None:
        return CharTokenizer.from_maps(cfg.encode, cfg.decode)
    if chars is not None:
        return CharTokenizer(chars, unk=cfg.unk_token)
    train, val = (split.train, split.val) if split is not None else ("", "")
    if cfg.tokenizer == "char":
        if cfg.unk_token:
            return CharTokenizer.from_text(train, unk=True, min_count=cfg.min_char_count)
        return CharTokenizer.from_text(train + val)
    if cfg.tokenizer == "bpe":
        return BPETokenizer.train([train], cfg.bpe_vocab_size)
    folder = Path(gpt2_dir) if gpt2_dir is not None else get_dataset("gpt2", quiet=True)
    return BPETokenizer.from_gpt2_files(folder / "vocab.json", folder / "merges.txt")
