"""`quill import quillgpt-v1`: the original QuillGPT's `.pt` state dict and config JSON, written as a
model directory (the reading itself is quillgpt.original, which `load_model` uses too)."""

from __future__ import annotations

from pathlib import Path

from quillgpt.checkpoint import CONFIG_FILE, CheckpointError, save_model
from quillgpt.original import MARKER, build_model, find_files, is_original_state_dict
from quillgpt.weights import load_state_dict_file


def import_quillgpt_v1(sources: list[str | Path], out: str | Path) -> Path:
    """`quill import quillgpt-v1 CONFIG.json WEIGHTS.pt` (either order; or the `.pt` alone, config beside it)."""
    configs = [Path(s) for s in sources if Path(s).suffix == ".json"]
    weights = [Path(s) for s in sources if Path(s).suffix != ".json"]
    if len(weights) != 1 or len(configs) > 1:
        raise CheckpointError("quillgpt-v1 takes the weights file (.pt) and the original config JSON")
    if not configs:  # the config beside the weights (a model directory is not the original's folder)
        found = None if (weights[0] / CONFIG_FILE).is_file() else find_files(weights[0])
        if found is None:
            raise CheckpointError(f"give the original config JSON with {weights[0]}")
        configs = [found[0]]
    config = configs[0]
    state = load_state_dict_file(weights[0])
    if not is_original_state_dict(state):
        raise CheckpointError(f"{weights[0]} is not in the original QuillGPT layout (no {MARKER})")
    model, tokenizer = build_model(state, config)
    provenance = {"imported_from": "quillgpt-v1", "source": str(weights[0])}
    return save_model(out, model, tokenizer, provenance=provenance)
