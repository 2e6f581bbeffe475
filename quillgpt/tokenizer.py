"""Tokenizers: `CharTokenizer` (one id per character) and `BPETokenizer` (byte-level BPE, HF tokenizers).

Both map text to a list of ids and back, and describe themselves as a small dict (`to_spec`) that a
model directory stores beside the weights, so a model always travels with its own vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
BPE_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """Text or a vocabulary that a tokenizer cannot handle."""


class TextTokenizer(Protocol):
    """What generation, training data and serving need from a tokenizer (both tokenizers here are one)."""

    vocab_size: int
    eot_id: int | None
    """The end-of-text token, which ends generation; None when the vocabulary has none (characters)."""

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def start_ids(self) -> list[int]:
        """What an empty prompt starts from."""
        ...

    def to_spec(self) -> dict[str, Any]:
        """The small dict a model's config.json stores to rebuild the tokenizer."""
        ...

    def fingerprint(self) -> str:
        """A hash of the whole vocabulary: equal fingerprints encode text identically."""
        ...


def _fingerprint(spec: dict[str, Any], vocabulary: str = "") -> str:
    return hashlib.sha256((json.dumps(spec, sort_keys=True) + vocabulary).encode("utf-8")).hexdigest()


UNK_TEXT = "\ufffd"
"""What the unknown-character token decodes to: Unicode's replacement character."""


class CharTokenizer:
    """One id per character, ids in sorted character order (nanoGPT's and QuillGPT's convention).

    With `unk=True` the vocabulary reserves one more id, the last, for every character outside it:
    such text still encodes (the token decodes as U+FFFD), and `quill eval` charges it honestly
    (the model's probability of the token plus 8 bits per UTF-8 byte of the character). Without it,
    encoding a character outside the vocabulary raises a TokenizerError naming the characters.
    """

    eot_id = None  # no end-of-text character: generation ends on length or stop strings

    def __init__(self, chars: Iterable[str], unk: bool = False):
        self.chars = list(chars)
        if len(set(self.chars)) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise TokenizerError("a character vocabulary must list distinct single characters")
        if not self.chars:
            raise TokenizerError("a character vocabulary cannot be empty")
        if unk and UNK_TEXT in self.chars:
            raise TokenizerError("a vocabulary with an unknown token cannot also hold U+FFFD, which it decodes to")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.unk_id = len(self.chars) if unk else None

    @classmethod
    def from_text(cls, text: str, unk: bool = False, min_count: int = 1) -> CharTokenizer:
        """The sorted characters of `text`; with `unk`, only those seen at least `min_count` times."""
        if min_count <= 1:
            return cls(sorted(set(text)), unk=unk)
        counts = Counter(text)
        return cls(sorted(c for c, n in counts.items() if n >= min_count), unk=unk)

    @classmethod
    def from_maps(cls, encode: dict[str, int], decode: dict[str, str] | None = None) -> CharTokenizer:
        """Load the original QuillGPT's `encode` (char → id) / `decode` (id → char) maps."""
        ids = sorted(encode.values())
        if ids != list(range(len(ids))):
            raise TokenizerError("the encode map's ids must be 0..n-1 without gaps")
        chars = [""] * len(ids)
        for c, i in encode.items():
            chars[i] = c
        if decode is not None and {int(k): v for k, v in decode.items()} != dict(enumerate(chars)):
            raise TokenizerError("the encode and decode maps disagree")
        return cls(chars)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + (self.unk_id is not None)

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of `text` outside the vocabulary, sorted."""
        return sorted(set(text) - self.stoi.keys())

    def encode(self, text: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            pass
        if self.unk_id is None:
            unknown = self.unknown(text)
            shown = ", ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise TokenizerError(
                f"{len(unknown)} character(s) not in the model's vocabulary: {shown} (it has no unknown token)"
            ) from None
        return [stoi.get(c, self.unk_id) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars + [UNK_TEXT] if self.unk_id is not None else self.chars
        try:
            return "".join(chars[i] for i in ids)
        except IndexError:
            raise TokenizerError(f"token id out of range for a vocabulary of {self.vocab_size}") from None

    def start_ids(self) -> list[int]:
        """What an empty prompt starts from: a newline if the vocabulary has one, else id 0."""
        return [self.stoi.get("\n", 0)]

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"type": "char", "chars": "".join(self.chars)}
        if self.unk_id is not None:
            spec["unk"] = True
        return spec

    def fingerprint(self) -> str:
        return _fingerprint(self.to_spec())  # the spec holds the whole vocabulary


class BPETokenizer:
    """Byte-level BPE (GPT-2's scheme) backed by HuggingFace `tokenizers`: any text encodes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.eot_id = tokenizer.token_to_id(EOT)

    @staticmethod
    def _byte_level(model: models.Model) -> Tokenizer:
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: tuple[str, ...] = (EOT,)) -> BPETokenizer:
        tok = cls._byte_level(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_gpt2_files(cls, vocab_path: str | Path, merges_path: str | Path) -> BPETokenizer:
        """GPT-2's `vocab.json` and `merges.txt` (with or without a `#version` header)."""
        for p in (vocab_path, merges_path):
            if not Path(p).is_file():
                raise TokenizerError(f"tokenizer file not found: {p}")
        return cls(cls._byte_level(models.BPE.from_file(str(vocab_path), str(merges_path))))

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def start_ids(self) -> list[int]:
        """An empty prompt starts from <|endoftext|> (GPT-2's convention), else a newline."""
        return [self.eot_id] if self.eot_id is not None else self.encode("\n")

    def to_spec(self) -> dict[str, Any]:
        return {"type": "bpe", "file": BPE_FILE}

    def fingerprint(self) -> str:
        return _fingerprint(self.to_spec(), self.tokenizer.to_str())  # the spec only names a file

    def save(self, path: str | Path) -> None:
        """Write the vocabulary and merges as HF `tokenizer.json` (the file `to_spec` names)."""
        self.tokenizer.save(str(path))


def tokenizer_from_spec(spec: dict[str, Any], directory: str | Path | None = None) -> CharTokenizer | BPETokenizer:
    """Rebuild a tokenizer from the spec stored in a model's config.json."""
    kind = spec.get("type")
    if kind == "char":
        if not isinstance(spec.get("chars"), str):
            raise TokenizerError("char tokenizer spec needs a 'chars' string")
        return CharTokenizer(spec["chars"], unk=spec.get("unk") is True)
    if kind == "bpe":
        if directory is None:
            raise TokenizerError("a BPE tokenizer spec needs the model directory holding its file")
        path = Path(directory) / spec.get("file", BPE_FILE)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        return BPETokenizer.from_file(path)
    raise TokenizerError(f"unknown tokenizer type {kind!r} (expected 'char' or 'bpe')")


class TextStreamer:
    """Turns token ids into text pieces as they arrive, never splitting a UTF-8 character.

    A byte-level BPE token can hold part of a multi-byte character; its text then ends in U+FFFD
    until the rest arrives, so such pieces are held back (at most `max_hold` tokens).
    """

    def __init__(self, tokenizer: TextTokenizer, max_hold: int = 8):
        self.tokenizer = tokenizer
        self.max_hold = max_hold
        self._pending: list[int] = []

    def push(self, token_id: int) -> str:
        """The text this token completes ("" while it holds part of a character)."""
        self._pending.append(token_id)
        text = self.tokenizer.decode(self._pending)
        if text.endswith("\ufffd") and len(self._pending) < self.max_hold:
            return ""
        self._pending.clear()
        return text

    def flush(self) -> str:
        """Whatever is held back, as text (generation has ended)."""
        text = self.tokenizer.decode(self._pending) if self._pending else ""
        self._pending.clear()
        return text

    def discard(self) -> None:
        """Drop what is held back (generation ended on a stop string: nothing more is shown)."""
        self._pending.clear()


def iter_text_pieces(tokenizer: TextTokenizer, ids: Iterable[int]) -> Iterator[str]:
    streamer = TextStreamer(tokenizer)
    for i in ids:
        if piece := streamer.push(i):
            yield piece
    if tail := streamer.flush():
        yield tail
