"""Atomic file writes: the one way QuillGPT writes a file.

Every file goes to a temporary name beside its destination, is flushed to disk (fsync) and then
renamed over the destination (`os.replace`, atomic on POSIX and Windows). A crash or a full disk
leaves the previous complete file, never a torn one; a reader never sees half a file.
`atomic_dir` does the same for a folder of files that belong together (a training checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to write a temporary file beside `path`; fsync it and rename it over `path`."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; models, data and logs are meant to be read
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text, written as given (no newline translation)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")))


def write_json(path: str | Path, obj: Any) -> Path:
    """Indented JSON (non-ASCII kept as is) with a final newline."""
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_dir(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to fill a new folder beside `path`, then swap it in for `path` (two renames).
    A crash leaves the previous complete folder or the new one, never a mix of the two;
    `recover_dir` finishes a swap cut between its renames."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    recover_dir(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def recover_dir(path: str | Path) -> None:
    """After a crash in `atomic_dir`: put the previous folder back if the new one never arrived."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if old.exists():
        if path.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, path)
