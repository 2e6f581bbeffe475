"""A model is a directory: `model.safetensors` + `config.json` (+ `tokenizer.json` for BPE).

config.json holds the model config, the tokenizer spec and provenance (data hash, steps, val loss),
so the directory describes itself. Weights are safetensors: loading never runs code. Every file
is written atomically (`quillgpt.fileio`), so a crash never leaves a torn file.
Bundled models (under `models/` in the repository, or $QUILL_MODELS_DIR) are found by name.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_file as st_save_file
from safetensors.torch import save_model as st_save_model

from quillgpt.config import ConfigError, GPTConfig, load_train_config
from quillgpt.fileio import atomic_write, write_json
from quillgpt.infer.int8 import quantize_rows
from quillgpt.infer.prepare import INFERENCE_WEIGHTS, prepare_for_inference
from quillgpt.model import GPT
from quillgpt.original import find_files, load_if_original
from quillgpt.tokenizer import BPE_FILE, BPETokenizer, CharTokenizer, TokenizerError, tokenizer_from_spec
from quillgpt.weights import CheckpointError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "quillgpt"
FORMAT_VERSION = 1
REPO_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MAX_HEADER_BYTES = 100_000_000
MAX_BLOCK_SIZE = 1 << 20
"""The longest context a model directory may ask for: rotary tables and KV caches grow with it."""
INT8_SCALE = ".int8_scale"
"""Suffix of the per-row scale stored beside each matrix of a model saved in int8."""


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: CharTokenizer | BPETokenizer
    path: Path
    provenance: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def info(self) -> dict[str, Any]:
        """What the model directory says about itself: its provenance, overridden by its card's keys."""
        return {**self.provenance, **self.card}


def models_dirs() -> list[Path]:
    """Where bundled models are looked up by name: $QUILL_MODELS_DIR (os.pathsep-separated), then models/."""
    env = os.environ.get("QUILL_MODELS_DIR")
    dirs = [Path(p) for p in env.split(os.pathsep) if p] if env else []
    return dirs + [REPO_MODELS_DIR]


def bundled_models() -> dict[str, Path]:
    """Name → directory of every model directory found in `models_dirs()`."""
    found: dict[str, Path] = {}
    for base in models_dirs():
        if base.is_dir():
            for d in sorted(base.iterdir()):
                if (d / CONFIG_FILE).is_file() and d.name not in found:
                    found[d.name] = d
    return found


DEFAULT_MODELS = ("shakespeare-char", "shakespeare-speedrun")


def default_model() -> str:
    """The bundled model commands use when none is named: the first of DEFAULT_MODELS present."""
    bundled = bundled_models()
    return next((name for name in DEFAULT_MODELS if name in bundled), DEFAULT_MODELS[0])


def served_models() -> list[str]:
    """What a server or playground offers when no model is named: every bundled model, the default first."""
    first = default_model()
    return [first, *(name for name in bundled_models() if name != first)]


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A model directory given by path, or a bundled model given by name."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.suffix in (".safetensors", ".json") and p.is_file():
        return p.parent
    models = bundled_models()
    if str(name_or_path) in models:
        return models[str(name_or_path)]
    known = ", ".join(sorted(models)) or "none"
    raise CheckpointError(f"no model directory or bundled model named {str(name_or_path)!r} (bundled: {known})")


def save_model(
    directory: str | Path,
    model: GPT,
    tokenizer: CharTokenizer | BPETokenizer,
    provenance: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a model directory. Each file goes to a temporary name first and is renamed into place,
    weights before config, so a crash leaves the previous complete files, never a torn one.
    `dtype` stores the weights in another precision, which loading turns back into the model's
    float32: bfloat16 (half the size), or int8 (a quarter: `int8_rows`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw = getattr(model, "_orig_mod", model)  # the compiled wrapper's inner model, not its key names
    raw = getattr(raw, "module", raw)  # DistributedDataParallel's inner model
    if dtype == torch.int8:
        state = int8_rows(raw)
        atomic_write(directory / WEIGHTS_FILE, lambda tmp: st_save_file(state, str(tmp), metadata={"format": "pt"}))
    else:
        if dtype is not None and dtype != next(raw.parameters()).dtype:
            raw = copy.deepcopy(raw).to(dtype)
        atomic_write(directory / WEIGHTS_FILE, lambda tmp: st_save_model(raw, str(tmp), metadata={"format": "pt"}))
    if isinstance(tokenizer, BPETokenizer):
        atomic_write(directory / BPE_FILE, tokenizer.save)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": raw.config.to_dict(),
        "tokenizer": tokenizer.to_spec(),
        "provenance": provenance or {},
    }
    write_json(directory / CONFIG_FILE, config)
    return directory


@torch.no_grad()
def int8_rows(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with every matrix in int8 (`quantize_rows`), its float32 row scales stored
    under `name + INT8_SCALE`. Vectors (norms, biases) stay float32; a tied matrix is stored once."""
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if t.dim() == 2:
            state[name], state[name + INT8_SCALE] = quantize_rows(t)
        else:
            state[name] = t.detach().float().contiguous()
    return state


def from_int8_rows(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo `int8_rows`: each int8 matrix times its rows' scales, in float32."""
    scales = {k.removesuffix(INT8_SCALE): v for k, v in state.items() if k.endswith(INT8_SCALE)}
    return {
        k: v.float() * scales[k][:, None] if k in scales else v for k, v in state.items() if not k.endswith(INT8_SCALE)
    }


def _is_model_dir(directory: Path) -> bool:
    try:
        return json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_model_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"model config not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"model config is corrupt: {path} ({e})") from None
    if not isinstance(data, dict) or "model" not in data or "tokenizer" not in data:
        raise CheckpointError(f"{path} is not a QuillGPT model config (needs 'model' and 'tokenizer')")
    return data


def update_provenance(directory: str | Path, **values: Any) -> None:
    """Add facts (such as a final evaluation) to a saved model's provenance."""
    data = read_model_config(directory)
    data["provenance"] = {**data.get("provenance", {}), **values}
    write_json(Path(directory) / CONFIG_FILE, data)


def load_model(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    weights: str = "float32",
) -> LoadedModel:
    """Load a model directory (or bundled model by name) with its tokenizer, in eval mode.

    `weights` other than "float32" readies the model for fast decoding (`prepare_for_inference`):
    "auto" (what the CLI, the server and the playground use), "bfloat16" or "int8".
    """
    if weights not in INFERENCE_WEIGHTS:
        raise CheckpointError(f"unknown weights {weights!r} (choose from {', '.join(INFERENCE_WEIGHTS)})")
    if (Path(name_or_path).expanduser() / CONFIG_FILE).is_file():
        original = None  # a model directory
    else:
        original = find_files(name_or_path)  # the original QuillGPT's .pt + config JSON, or None
    if original is not None:
        return _for_inference(load_from_train_config(*original, device), device, weights)
    directory = resolve_model_path(name_or_path)
    data = read_model_config(directory)
    try:
        config = GPTConfig.from_dict(data["model"])
        tokenizer = tokenizer_from_spec(data["tokenizer"], directory)
    except (ConfigError, TokenizerError, TypeError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{directory}: tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}"
        )
    check_weights_fit(config, directory / WEIGHTS_FILE)  # before GPT(config) allocates anything
    model = GPT(config)
    load_weights(model, directory / WEIGHTS_FILE)
    model.to(device).eval()
    card = {k: v for k, v in data.items() if k not in ("model", "tokenizer", "provenance")}
    return _for_inference(LoadedModel(model, tokenizer, directory, data.get("provenance", {}), card), device, weights)


WEIGHTS_HELP = "float32 (exact), bfloat16, int8, or auto: int8 on CPUs"
OLD_WEIGHTS_FLAG = ("--quantize", "int8")
"""The older spelling of `--weights int8` (and QUILL_QUANTIZE=int8 for the server), still accepted, not shown."""


def add_weights_flags(parser: argparse.ArgumentParser, default: str | None) -> None:
    """`--weights` (load_model's `weights`) and its hidden older spelling, for every command that loads
    a model: `quill generate`, `quill eval`, `quill serve`. None: the default is decided elsewhere."""
    shown = f"{WEIGHTS_HELP} (default {default})" if default else WEIGHTS_HELP
    parser.add_argument("--weights", choices=INFERENCE_WEIGHTS, default=default, help=shown)
    flag, weights = OLD_WEIGHTS_FLAG
    parser.add_argument(flag, choices=[weights], dest="weights", help=argparse.SUPPRESS)


def _for_inference(loaded: LoadedModel, device, weights: str) -> LoadedModel:
    if weights != "float32":
        try:
            prepare_for_inference(loaded.model, weights)
        except ValueError as e:  # int8 or bfloat16 off the CPU, or without oneDNN
            raise CheckpointError(str(e)) from None
    return loaded


def read_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape, from a safetensors file's header alone, checked against the file: the
    header fits, each tensor's bytes lie inside the file and are exactly its dtype and shape's worth."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path} is not a safetensors file (header of {n} bytes in a file of {size})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    data_bytes = size - 8 - n
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = dtype in DTYPE_BYTES and all(type(d) is int and d >= 0 for d in (*shape, begin, end))
            ok = ok and begin <= end <= data_bytes
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: malformed header entry for {name!r}")
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CheckpointError(
                f"{path}: the header lies about {name}: {dtype}{list(shape)} needs "
                f"{math.prod(shape) * DTYPE_BYTES[dtype]:,} bytes, it is given {end - begin:,}"
            )
        shapes[name] = shape
    return shapes


def check_weights_fit(config: GPTConfig, path: Path) -> None:
    """Check a model directory's config against its weights file's header, before the model is built:
    a config whose sizes disagree with the weights (or are absurd) fails here, with nothing allocated
    beyond the header. The weights file bounds the model's size; the config only names its shapes."""
    if path.suffix != ".safetensors" or not path.is_file():
        return  # load_weights reports a missing file; legacy .pt files are checked after loading
    where = f"{path.parent / CONFIG_FILE} does not match {path.name}"
    if config.block_size > MAX_BLOCK_SIZE:
        raise CheckpointError(
            f"{path.parent / CONFIG_FILE}: block_size {config.block_size:,} is over {MAX_BLOCK_SIZE:,}"
        )
    shapes = read_safetensors_header(path)
    scales = {k: v for k, v in shapes.items() if k.endswith(INT8_SCALE)}
    for name, shape in scales.items():  # int8 weights: one scale per row of a stored matrix
        matrix = shapes.get(name.removesuffix(INT8_SCALE))
        if matrix is None or len(matrix) != 2 or shape != matrix[:1]:
            raise CheckpointError(f"{path}: {name} {list(shape)} is not the row scale of a stored matrix")
    shapes = {k: v for k, v in shapes.items() if k not in scales}
    layers = {k.split(".")[2] for k in shapes if k.startswith("transformer.h.")}
    if len(layers) != config.n_layer:
        raise CheckpointError(f"{where}: n_layer is {config.n_layer:,}, the weights hold {len(layers)} layers")
    wte = shapes.get("transformer.wte.weight", shapes.get("lm_head.weight"))  # tied: saved under one name
    if wte is not None and wte != (config.vocab_size, config.n_embd):
        raise CheckpointError(
            f"{where}: vocab_size x n_embd is {config.vocab_size:,} x {config.n_embd:,}, "
            f"the token embedding is {' x '.join(map(str, wte))}"
        )
    with torch.device("meta"):  # shapes without memory: one block stands for all
        block = GPT(dataclasses.replace(config, n_layer=1))
    expected = {}
    for name, tensor in block.state_dict().items():
        names = [name.replace(".h.0.", f".h.{i}.", 1) for i in range(config.n_layer)] if ".h.0." in name else [name]
        expected.update(dict.fromkeys(names, tuple(tensor.shape)))
    if config.tie_embeddings:  # one tensor, saved under either name
        tied = ("transformer.wte.weight", "lm_head.weight")
        if any(n in shapes for n in tied):
            for name in (n for n in tied if n not in shapes):
                del expected[name]
    wrong = [f"{k} {list(v)} (config: {list(expected[k])})" for k, v in shapes.items() if expected.get(k, v) != v]
    missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
    if wrong or missing or unexpected:
        raise CheckpointError(
            f"{where}: shapes {wrong[:3]}, missing {missing[:3]}, unexpected {unexpected[:3]}".replace(
                "shapes [], ", ""
            )
        )


def load_weights(model: GPT, path: str | Path) -> None:
    """Load safetensors weights, or a legacy `.pt` state dict with torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors" and _stored_in_int8(path):
            result = model.load_state_dict(from_int8_rows(st_load_file(str(path))), strict=False)
            missing, unexpected = result.missing_keys, result.unexpected_keys
        elif path.suffix == ".safetensors":  # float32, or bfloat16 cast on copy; re-ties a tied matrix
            missing, unexpected = st_load_model(model, str(path), strict=False)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("model"), dict):
                state = state["model"]  # nanoGPT-style {"model": state_dict, ...}
            if not isinstance(state, dict):
                raise CheckpointError(f"{path} does not hold a state dict")
            result = model.load_state_dict(state, strict=False)
            missing, unexpected = result.missing_keys, result.unexpected_keys
    except CheckpointError:
        raise
    except (SafetensorError, RuntimeError, OSError, ValueError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load weights from {path}: {first}") from None
    except Exception as e:  # torch.load's unpickler raises many kinds on corrupt files
        raise CheckpointError(f"cannot load weights from {path}: {type(e).__name__}: {e}") from None
    check_loaded_keys(model, missing, unexpected, f"weights in {path} do not match the model config")


def _stored_in_int8(path: Path) -> bool:
    return any(name.endswith(INT8_SCALE) for name in read_safetensors_header(path))


def check_loaded_keys(model: GPT, missing: list[str], unexpected: list[str], problem: str) -> None:
    """Raise `problem` (with the first keys) unless a non-strict load filled every weight exactly;
    a tied output matrix is filled through the token embedding."""
    if model.config.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{problem}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def load_from_train_config(config_path: str | Path, weights_path: str | Path, device="cpu") -> LoadedModel:
    """The original QuillGPT's pair: a JSON training config (model keys, `encode`/`decode` maps) and
    a weights file: a `.pt` state dict in the original layout or ours, or `.safetensors`. A model
    directory works as either argument."""
    for p in (Path(weights_path), Path(config_path)):
        directory = p if p.is_dir() else p.parent
        if _is_model_dir(directory):
            return load_model(directory, device)
    if (original := load_if_original(config_path, weights_path)) is not None:
        model, tokenizer = original  # the original QuillGPT's layout (per-head q/k/v, biased lm_head)
        return LoadedModel(model.to(device), tokenizer, Path(weights_path).parent, {"imported_from": "quillgpt-v1"})
    cfg = load_train_config(config_path)
    if cfg.encode is None:
        raise CheckpointError(f"{config_path} has no 'encode' map, so the tokenizer is unknown; use a model directory")
    tokenizer = CharTokenizer.from_maps(cfg.encode, cfg.decode)
    config = GPTConfig(**{**cfg.model.to_dict(), "vocab_size": cfg.vocab_size or tokenizer.vocab_size})
    model = GPT(config)
    load_weights(model, weights_path)
    return LoadedModel(model.to(device).eval(), tokenizer, Path(weights_path).parent)
