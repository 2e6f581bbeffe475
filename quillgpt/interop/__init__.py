"""Interoperability: import (original QuillGPT, nanoGPT, HuggingFace GPT-2) and export (HuggingFace
transformers, ONNX), one module per format. An import writes a normal model directory."""

from __future__ import annotations

from pathlib import Path

IMPORT_FORMATS = ("quillgpt-v1", "nanogpt", "hf-gpt2")


def import_model(fmt: str, sources: list[str], out: str | Path) -> Path:
    """Convert `sources` in format `fmt` into the model directory `out`."""
    if fmt == "quillgpt-v1":
        from quillgpt.interop.quillgpt_v1 import import_quillgpt_v1 as importer
    elif fmt == "nanogpt":
        from quillgpt.interop.nanogpt import import_nanogpt as importer
    elif fmt == "hf-gpt2":
        from quillgpt.interop.hf_gpt2 import import_hf_gpt2 as importer
    else:
        raise ValueError(f"unknown import format {fmt!r} (known: {', '.join(IMPORT_FORMATS)})")
    return importer([Path(s) for s in sources], Path(out))
