"""Reading the original QuillGPT's weights: a `GPTLanguageModel` state dict (`.pt`) and its config JSON.

`load_model` reads them as they are (users' trained weights keep working); `quill import quillgpt-v1`
(quillgpt.interop.quillgpt_v1) writes them as a model directory.

The original model (core/models/gpt.py) has learned token and position embedding tables, and per
block `ln1`/`ln2` LayerNorms, one `nn.Linear(C, hs, bias=False)` each for the key, query and value
of every head (plus a `tril` mask buffer), the heads concatenated in order into `sa.proj`
(`n_head * hs -> C`, with bias), and `ffwd.net.0`/`ffwd.net.2` (C -> 4C -> C, ReLU, with biases);
then `ln_f` and an untied `lm_head` with a bias. The vocabulary is the config's `encode`/`decode`.

Every shape is read from the state dict itself, so any geometry loads (the 226M model's heads of
85 over n_embd 1024 included); the config's shape keys, where present, are checked against it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from quillgpt.config import ConfigError, GPTConfig
from quillgpt.model import GPT
from quillgpt.tokenizer import CharTokenizer, TokenizerError
from quillgpt.weights import CheckpointError, load_state_dict_file

MARKER = "token_embedding_table.weight"
# original name inside a block -> ours
BLOCK_RENAMES = {
    "ln1": "ln_1",
    "ln2": "ln_2",
    "sa.proj": "attn.c_proj",
    "ffwd.net.0": "mlp.c_fc",
    "ffwd.net.2": "mlp.c_proj",
}
TOP_RENAMES = {
    "token_embedding_table.weight": "transformer.wte.weight",
    "position_embedding_table.weight": "transformer.wpe.weight",
    "ln_f.weight": "transformer.ln_f.weight",
    "ln_f.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
}


def is_original_state_dict(state: dict) -> bool:
    return MARKER in state


def original_config(state: dict[str, torch.Tensor], dropout: float = 0.0) -> GPTConfig:
    """The GPTConfig that reproduces the original model whose state dict this is."""
    vocab_size, n_embd = state[MARKER].shape
    n_layer = len({m[1] for k in state if (m := re.match(r"blocks\.(\d+)\.ln1\.weight$", k))})
    n_head = len({m[1] for k in state if (m := re.match(r"blocks\.0\.sa\.heads\.(\d+)\.key\.weight$", k))})
    if n_layer == 0 or n_head == 0:
        raise CheckpointError("an original QuillGPT state dict needs blocks.N.ln1 and blocks.0.sa.heads.M weights")
    head_size = state["blocks.0.sa.heads.0.key.weight"].shape[0]
    return GPTConfig(
        vocab_size=vocab_size,
        block_size=state["position_embedding_table.weight"].shape[0],
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        head_size=None if n_embd == n_head * head_size else head_size,
        dropout=dropout,
        qkv_bias=False,
        lm_head_bias=True,
        activation="relu",
        tie_embeddings=False,
    )


def convert_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Original names -> ours; each block's per-head q, k, v stacked (heads in order) into c_attn."""
    out = {ours: state[theirs] for theirs, ours in TOP_RENAMES.items() if theirs in state}
    used = set(TOP_RENAMES)
    for i in range(config.n_layer):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        qkv = [f"{src}sa.heads.{m}.{w}.weight" for w in ("query", "key", "value") for m in range(config.n_head)]
        missing = [k for k in qkv if k not in state]
        if missing:
            raise CheckpointError(f"original QuillGPT state dict lacks {missing[:3]}")
        out[dst + "attn.c_attn.weight"] = torch.cat([state[k] for k in qkv])  # (3 * nh * hs, C)
        used.update(qkv)
        for theirs, ours in BLOCK_RENAMES.items():
            for param in ("weight", "bias"):
                if src + f"{theirs}.{param}" in state:
                    out[dst + f"{ours}.{param}"] = state[src + f"{theirs}.{param}"]
                    used.add(src + f"{theirs}.{param}")
    unexpected = [k for k in state if k not in used and not k.endswith(".tril")]
    if unexpected:
        raise CheckpointError(f"unexpected keys in an original QuillGPT state dict: {sorted(unexpected)[:5]}")
    return out


def read_vocabulary(config_path: str | Path) -> tuple[dict, CharTokenizer]:
    """The original config JSON and the character tokenizer its `encode`/`decode` maps define."""
    config_path = Path(config_path)
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"config file not found: {config_path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("encode"), dict):
        raise CheckpointError(f"{config_path} has no 'encode' map, so the vocabulary is unknown")
    try:
        return data, CharTokenizer.from_maps(data["encode"], data.get("decode"))
    except TokenizerError as e:
        raise CheckpointError(f"{config_path}: {e}") from None


def build_model(state: dict[str, torch.Tensor], config_path: str | Path) -> tuple[GPT, CharTokenizer]:
    """An equivalent GPT and the tokenizer from an original state dict and its config JSON."""
    data, tokenizer = read_vocabulary(config_path)
    try:
        config = original_config(state, dropout=data.get("dropout", 0.0))
    except ConfigError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    for key in ("vocab_size", "n_embd", "n_head", "n_layer", "block_size"):
        if key in data and data[key] != getattr(config, key):
            raise CheckpointError(f"{config_path} says {key}={data[key]} but the weights have {getattr(config, key)}")
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"{config_path} maps {tokenizer.vocab_size} characters but the weights have {config.vocab_size} tokens"
        )
    model = GPT(config)
    model.load_state_dict(convert_state_dict(state, config))
    return model.eval(), tokenizer


def load_if_original(config_path: str | Path, weights_path: str | Path) -> tuple[GPT, CharTokenizer] | None:
    """The model and tokenizer of a `.pt` file in the original layout with its config; None if it holds
    another layout."""
    if Path(weights_path).suffix == ".safetensors":
        return None
    state = load_state_dict_file(weights_path)
    if not is_original_state_dict(state):
        return None
    return build_model(state, config_path)


def find_files(path: str | Path) -> tuple[Path, Path] | None:
    """(config, weights) when `path` is a `.pt` file, or a folder that holds one (a model directory is
    told apart by its caller): the config is `NAME.json` beside `NAME.pt`, else the one JSON there with
    an `encode` map."""
    path = Path(path).expanduser()
    if path.is_dir():
        weights = sorted(path.glob("*.pt"))
        if len(weights) != 1:
            return None
        path = weights[0]
    if path.suffix != ".pt" or not path.is_file():
        return None
    if path.with_suffix(".json").is_file():
        return path.with_suffix(".json"), path
    configs = [p for p in sorted(path.parent.glob("*.json")) if _has_encode_map(p)]
    if len(configs) != 1:
        raise CheckpointError(
            f"no single original QuillGPT config beside {path}: put its config JSON (with the encode/decode maps) "
            f"next to it as {path.with_suffix('.json').name}"
        )
    return configs[0], path


def _has_encode_map(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")).get("encode"), dict)
    except (OSError, ValueError, AttributeError):
        return False
