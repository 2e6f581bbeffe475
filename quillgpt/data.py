"""Datasets: a registry of named public texts, text decoding, the train/val split, and token batches.

A dataset is any `.txt` file or folder of them, or a registered name. A registered dataset is looked
up in the cache (`$QUILL_CACHE_DIR`, default ~/.cache/quillgpt), then in local data dirs
(`$QUILL_DATA_DIR`, os.pathsep-separated), and only then downloaded from its canonical URL; every file
is checked against its sha256. Text is tokenised once into a memory-mapped file keyed by content hash.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from quillgpt.fileio import atomic_write, write_bytes
from quillgpt.layout import normalize_newlines
from quillgpt.tokenizer import TextTokenizer


class DataError(ValueError):
    """A dataset that cannot be found, read, verified or used."""


@dataclass(frozen=True)
class DataFile:
    path: str
    """Path inside the dataset folder (and inside a data dir: `<data_dir>/<path>`)."""
    sha256: str
    url: str
    """Canonical public source. `zip_member` picks a file out of a zip; `max_bytes` keeps a prefix."""
    zip_member: str | None = None
    max_bytes: int | None = None


@dataclass(frozen=True)
class Dataset:
    name: str
    description: str
    license: str
    files: tuple[DataFile, ...]
    default_prompt: str = ""
    """Where a model trained on it starts when given no prompt in a UI (a model may declare its own)."""


_NLTK_GUTENBERG = "https://raw.githubusercontent.com/nltk/nltk_data/gh-pages/packages/corpora/gutenberg.zip"
_GUTENBERG = {
    "austen-emma.txt": "71b0923d75fcf2f1faa897b22da8de8e2476d7478a2b22388eb58a3420e00215",
    "austen-persuasion.txt": "cec097657cbfeb62aafe178973f514fa07ab66a5e28ea025ebd5d51ca870e40f",
    "austen-sense.txt": "57b169c7cfa502896dee25bd66616f61cc1d21084caf31f015176ee46fda9718",
    "blake-poems.txt": "840897a66e23a47dd1fd56b864f421b2be0af074dc081244f7995bf26939eee9",
    "chesterton-ball.txt": "c6b6d4e8c09a3f49a09f37f4e47663d4d6f048b62d86c70ccafdfd8f27059a58",
    "chesterton-brown.txt": "67027976205b4b30e367c704807f56c8ffac3e8ea6037d993e57ab1fe28447ec",
    "chesterton-thursday.txt": "8b431a2a8db84089cd6f83fa66610c3b12c04114609df6e90137c0c58f2c5493",
    "melville-moby_dick.txt": "dc2466ee3c2e6e2ea1f86233d142e4b5578fdc1d6f0ca657bee7572202a980c7",
    "milton-paradise.txt": "49028a77c557de1459e96c026edbe72997be2d9015925f7baefb793cd6fe706f",
    "shakespeare-caesar.txt": "7c46bd32fc84d9596bcad55b61ec3c1a390239acb190b286422855aafc2774b3",
    "shakespeare-hamlet.txt": "1eceab7027ad7e0cc25c6b6aadcb2e6bb070395cb2085f775ac732d63d5db240",
    "shakespeare-macbeth.txt": "d4a204352cfe5924cbae76f764225d120e9f7617d39cb8c949dedd3f306353ac",
    "whitman-leaves.txt": "93ebaf1dccc8f1514b4b1c2f52e64e81829113fc58cff63fb51ada0c72f99c3e",
}
_TINYSTORIES = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"

REGISTRY: dict[str, Dataset] = {
    d.name: d
    for d in [
        Dataset(
            "tinyshakespeare",
            "Tiny Shakespeare (char-rnn, nanoGPT): 1.1 MB of plays; the standard char-level benchmark",
            "public domain",
            (
                DataFile(
                    "tinyshakespeare/input.txt",
                    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                ),
            ),
            default_prompt="ROMEO:",
        ),
        Dataset(
            "gutenberg",
            "NLTK's Gutenberg selection: 13 classic books (Austen, Melville, Milton, Shakespeare, ...), 5.8 MB",
            "public domain",
            tuple(
                DataFile(f"gutenberg/{name}", sha, _NLTK_GUTENBERG, zip_member=f"gutenberg/{name}")
                for name, sha in _GUTENBERG.items()
            ),
            default_prompt="CHAPTER I\n\n",
        ),
        Dataset(
            "tinystories",
            "TinyStories (Eldan & Li, 2023): the first 2 MiB of the V1 train split, and validation stories",
            "CDLA-Sharing-1.0",
            (
                DataFile(
                    "tinystories/train.txt",
                    "5352b299dcb1a32898b2d779b145b5a05f3e1265953fd21c264c9f9f9c9ae33d",
                    f"{_TINYSTORIES}/TinyStories-train.txt",
                    max_bytes=2 * 1024 * 1024,
                ),
                DataFile(
                    "tinystories/valid.txt",
                    "5fc1fb0113df62b567fb271806cd645ce8d75f59c58ca0b764c03d3b6ff34ca6",
                    f"{_TINYSTORIES}/TinyStories-valid.txt",
                ),
            ),
            default_prompt="Once upon a time",
        ),
        Dataset(
            "gpt2",
            "GPT-2's byte-level BPE files (vocab.json, merges.txt without the #version line), for tokenizer 'gpt2'",
            "MIT",
            (
                DataFile(
                    "gpt2/vocab.json",
                    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                    "https://huggingface.co/openai-community/gpt2/resolve/main/vocab.json",
                ),
                DataFile(
                    "gpt2/merges.txt",
                    "ac33235097fe06d4a8fff0feac994644809e6eb6ab70669e1e9fd40ae032428e",
                    "https://huggingface.co/openai-community/gpt2/resolve/main/merges.txt",
                ),
            ),
        ),
    ]
}


def default_prompt(info: dict[str, Any]) -> str:
    """Where a UI starts a model that has no prompt yet: the model's own `default_prompt` (a top-level
    key of its config.json, or its provenance, from the training config), else the one of the
    registered dataset it was trained on (`data`: a name, or a path in a folder of that name)."""
    if isinstance(info.get("default_prompt"), str):
        return info["default_prompt"]
    data = info.get("dataset") or info.get("data")
    if isinstance(data, str):
        for name in (data, Path(data).name, Path(data).parent.name):
            if name in REGISTRY:
                return REGISTRY[name].default_prompt
    return ""


def cache_dir() -> Path:
    return Path(os.environ.get("QUILL_CACHE_DIR") or Path.home() / ".cache" / "quillgpt")


def data_dirs() -> list[Path]:
    env = os.environ.get("QUILL_DATA_DIR", "")
    return [Path(p).expanduser() for p in env.split(os.pathsep) if p]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _find_local(f: DataFile, roots: list[Path]) -> Path | None:
    """A verified copy of `f` under one of `roots` (as root/<path>, root/<file name>, or root itself)."""
    for root in roots:
        for candidate in (root / f.path, root / Path(f.path).name, root):
            if candidate.is_file() and candidate.name == Path(f.path).name:
                if sha256_file(candidate) != f.sha256:
                    raise DataError(f"{candidate} does not match the registered sha256 of {f.path}")
                return candidate
    return None


def get_dataset(name: str, source: str | Path | None = None, download: bool = True, quiet: bool = False) -> Path:
    """Make a registered dataset available in the cache and return its folder there.

    `source` is a local file or folder to take the files from (no network). Otherwise the cache,
    then $QUILL_DATA_DIR, then the canonical URLs are tried, in that order.
    """
    if name not in REGISTRY:
        raise DataError(f"unknown dataset {name!r}; registered: {', '.join(REGISTRY)}")
    dataset = REGISTRY[name]
    target = cache_dir() / "datasets"
    roots = [Path(source).expanduser()] if source is not None else [target, *data_dirs()]
    if source is not None and not roots[0].exists():
        raise DataError(f"--from path does not exist: {source}")
    for f in dataset.files:
        dest = target / f.path
        found = _find_local(f, roots)
        if found is not None and found.resolve() == dest.resolve():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if found is not None:
            atomic_write(dest, partial(shutil.copyfile, found))
        elif source is not None:
            raise DataError(f"{f.path} not found under {source}")
        elif not download:
            raise DataError(f"{f.path} is not in the cache or in $QUILL_DATA_DIR; run `quill data get {name}`")
        else:
            _download(f, dest, quiet)
    return target / name


def _download(f: DataFile, dest: Path, quiet: bool) -> None:
    try:
        with urllib.request.urlopen(f.url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            buf = io.BytesIO()
            with tqdm(total=total, unit="B", unit_scale=True, desc=f.path, disable=quiet) as bar:
                while block := response.read(1 << 16):
                    buf.write(block)
                    bar.update(len(block))
                    if f.max_bytes is not None and buf.tell() >= f.max_bytes and f.zip_member is None:
                        break
    except OSError as e:
        raise DataError(f"cannot download {f.url} ({e}); without internet, use --from with a local copy") from None
    data = buf.getvalue()
    if f.zip_member is not None:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            data = z.read(f.zip_member)
    if f.max_bytes is not None:
        data = data[: f.max_bytes]
    if hashlib.sha256(data).hexdigest() != f.sha256:
        raise DataError(f"downloaded {f.path} from {f.url} does not match its registered sha256")
    write_bytes(dest, data)


def resolve_data(source: str | Path) -> list[Path]:
    """The text files behind a dataset name, a `.txt` file, or a folder of `.txt` files."""
    p = Path(source).expanduser()
    if str(source) in REGISTRY and not p.exists():
        folder = get_dataset(str(source), quiet=True)
        return [folder.parent / f.path for f in REGISTRY[str(source)].files if f.path.endswith(".txt")]
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(x for x in p.rglob("*.txt") if x.is_file())
        if not files:
            raise DataError(f"folder {p} holds no .txt files")
        return files
    raise DataError(f"data not found: {source} (a .txt file, a folder of them, or one of: {', '.join(REGISTRY)})")


def read_text(path: Path) -> str:
    """UTF-8, or Latin-1 with a warning naming the file; CRLF and lone CR become LF. Binary files
    (NUL bytes) and UTF-16 are refused with a DataError rather than read as garbage."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path} is UTF-16 text: convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)")
    if b"\x00" in raw:
        kind = "a PNG image" if raw.startswith(b"\x89PNG") else "a binary file, or UTF-16 text without a BOM"
        raise DataError(f"{path} holds NUL bytes: {kind}, not UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        warnings.warn(f"{path} is not valid UTF-8; decoding it as Latin-1", stacklevel=2)
        text = raw.decode("latin-1")
    if text.startswith("\ufeff"):
        text = text[1:]
    return normalize_newlines(text)


def load_files(source: str | Path) -> list[tuple[str, str]]:
    """(file name, text) of each file of a dataset, in sorted order; several files are stripped of
    their leading and trailing blank lines (they are joined by exactly one blank line)."""
    files = resolve_data(source)
    texts = [(f.name, read_text(f)) for f in files]
    if len(texts) > 1:
        texts = [(name, text.strip("\n")) for name, text in texts]
    return texts


def load_text(source: str | Path) -> str:
    """All the text of a dataset: its files in sorted order, separated by a blank line."""
    return _joined(load_files(source), source)


def _joined(files: list[tuple[str, str]], source: str | Path) -> str:
    text = "\n\n".join(t for _, t in files)
    if not text.strip():
        raise DataError(f"dataset {source} is empty")
    return text


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """First (1 - val_fraction) of the characters train, the rest validation (nanoGPT's split)."""
    n = int(len(text) * (1 - val_fraction))
    return text[:n], text[n:]


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


VAL_SPLITS = ("concat", "per_file")


@dataclass(frozen=True)
class TextSplit:
    """A dataset divided into training and validation text, and how.

    "concat": the last `val_fraction` of the files joined (nanoGPT's split). "per_file": the last
    `val_fraction` of each file, so every book of a folder is in validation; the pieces are joined
    by a blank line, and `val_files` keeps each file's piece for scoring (and reporting) apart.
    A single file splits the same both ways.
    """

    train: str
    val: str
    val_files: list[tuple[str, str]]
    """(name, validation text) per file: one entry, the dataset, for "concat"."""
    train_files: list[tuple[str, str]]
    data_sha256: str
    """Hash of the whole dataset text (`load_text`), whatever the split."""
    val_fraction: float
    val_split: str

    def describe(self) -> str:
        train, val = f"{1 - self.val_fraction:.0%}", f"{self.val_fraction:.0%}"
        if self.val_split == "per_file" and len(self.val_files) > 1:
            return f"first {train} of each of {len(self.val_files)} files train, last {val} of each val"
        return f"first {train} train, last {val} val"


def split_dataset(source: str | Path, val_fraction: float = 0.1, val_split: str = "concat") -> TextSplit:
    """Load a dataset and split it into training and validation text (see `TextSplit`)."""
    if val_split not in VAL_SPLITS:
        raise DataError(f"unknown val_split {val_split!r} (expected one of {', '.join(VAL_SPLITS)})")
    files = load_files(source)
    text = _joined(files, source)
    if val_split == "concat" or len(files) == 1:
        train, val = split_text(text, val_fraction)
        name = files[0][0] if len(files) == 1 else str(source)
        return TextSplit(train, val, [(name, val)], [(name, train)], text_sha256(text), val_fraction, val_split)
    pieces = [(name, *split_text(t, val_fraction)) for name, t in files]
    train_files = [(name, train) for name, train, _ in pieces]
    val_files = [(name, val) for name, _, val in pieces]
    return TextSplit(
        "\n\n".join(t for _, t in train_files),
        "\n\n".join(v for _, v in val_files),
        val_files,
        train_files,
        text_sha256(text),
        val_fraction,
        val_split,
    )


@dataclass
class TokenSplits:
    train: np.ndarray
    val: np.ndarray
    data_sha256: str


def tokenize_splits(split: TextSplit, tokenizer: TextTokenizer, cache: Path | None = None) -> TokenSplits:
    """Encode both splits once into memory-mapped token files keyed by their text and the tokenizer."""
    parts = {"train": split.train, "val": split.val}
    key_text = "|".join([text_sha256(split.train), text_sha256(split.val), tokenizer.fingerprint()])
    folder = (cache or cache_dir() / "tokens") / hashlib.sha256(key_text.encode()).hexdigest()[:24]
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    paths = {name: folder / f"{name}.bin" for name in parts}
    if not all(p.is_file() for p in paths.values()):
        folder.mkdir(parents=True, exist_ok=True)
        for name, part in parts.items():
            write_bytes(paths[name], np.asarray(tokenizer.encode(part), dtype=dtype).tobytes())
    train, val = (np.memmap(paths[n], dtype=dtype, mode="r") for n in ("train", "val"))
    return TokenSplits(train, val, split.data_sha256)


def get_batch(
    data: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator, rows: slice | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of `block_size` tokens (x) and the same windows shifted by one (y).

    `rows` keeps a slice of the drawn batch: every process draws the same global batch and takes
    its own rows, so the data seen does not depend on how many processes share it.
    """
    if len(data) <= block_size:
        raise DataError(f"{len(data)} tokens cannot fill one window of block_size {block_size} + 1")
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    if rows is not None:
        ix = ix[rows]
    x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
    return x, y


def sequential_windows(data: np.ndarray, block_size: int, batch_size: int, stride: int | None = None):
    """Batches (x, y) of windows of up to `block_size` tokens that predict every token but the first
    exactly once (targets of -1 are not scored).

    Without `stride` the windows are consecutive and do not overlap (the last may be shorter). With
    stride s < block_size each window starts s tokens after the one before and scores only the
    targets that one did not reach, its last s: every token after the first window is then predicted
    from at least block_size - s tokens before it.
    """
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be between 1 and the context length {block_size}, not {stride}")
    targets = len(data) - 1
    if targets < 1:  # a single token is only context
        return
    starts = [0]
    while starts[-1] + block_size < targets:
        starts.append(starts[-1] + stride)
    for b in range(0, len(starts), batch_size):
        group = starts[b : b + batch_size]
        lengths = [min(block_size, targets - s) for s in group]
        T = max(lengths)
        x = torch.zeros(len(group), T, dtype=torch.long)
        y = torch.full((len(group), T), -1, dtype=torch.long)  # -1: ignored by the loss
        for r, (s, n) in enumerate(zip(group, lengths)):
            seen = 0 if s == 0 else block_size - stride  # targets the previous window scored
            x[r, :n] = torch.from_numpy(data[s : s + n].astype(np.int64))
            y[r, seen:n] = torch.from_numpy(data[s + 1 + seen : s + 1 + n].astype(np.int64))
        yield x, y
