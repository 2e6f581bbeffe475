"""Interoperability: import (original QuillGPT, nanoGPT, HuggingFace GPT-2) and export (HuggingFace
transformers, ONNX), one module per format. An import writes a normal model directory."""

from __future__ import annotations

from pathlib import Path

from quillgpt.checkpoint import LoadedModel
from quillgpt.interop.export_hf import export_hf
from quillgpt.interop.export_onnx import export_onnx
from quillgpt.interop.hf_gpt2 import import_hf_gpt2
from quillgpt.interop.nanogpt import import_nanogpt
from quillgpt.interop.quillgpt_v1 import import_quillgpt_v1

IMPORTERS = {"quillgpt-v1": import_quillgpt_v1, "nanogpt": import_nanogpt, "hf-gpt2": import_hf_gpt2}
IMPORT_FORMATS = tuple(IMPORTERS)
EXPORTERS = {"hf": export_hf, "onnx": export_onnx}
EXPORT_FORMATS = tuple(EXPORTERS)


def import_model(fmt: str, sources: list[str], out: str | Path) -> Path:
    """Convert `sources` in format `fmt` into the model directory `out`."""
    if fmt not in IMPORTERS:
        raise ValueError(f"unknown import format {fmt!r} (known: {', '.join(IMPORT_FORMATS)})")
    return IMPORTERS[fmt]([Path(s) for s in sources], Path(out))


def export_model(fmt: str, loaded: LoadedModel, out: str | Path) -> Path:
    """Write `loaded` in format `fmt` ("hf": a directory for transformers; "onnx": a .onnx file) to `out`."""
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r} (known: {', '.join(EXPORT_FORMATS)})")
    return EXPORTERS[fmt](loaded, out)
