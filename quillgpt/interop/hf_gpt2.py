"""HuggingFace GPT-2 checkpoints: a directory with `config.json` and `model.safetensors` (or
`pytorch_model.bin`, read with weights_only=True), plus its tokenizer files when present.

GPT-2's names are ours (`transformer.h.N.attn.c_attn`, ...); HF stores the four block matrices as
`Conv1D` (in, out), the transpose of `nn.Linear`. Reading needs no `transformers` install.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from quillgpt.checkpoint import CheckpointError, check_loaded_keys, save_model
from quillgpt.config import ConfigError, GPTConfig
from quillgpt.model import GPT
from quillgpt.tokenizer import BPE_FILE, BPETokenizer, TokenizerError
from quillgpt.weights import load_state_dict_file

MASK_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(masked_)?bias")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# HF's activation names -> ours ("gelu_new" and "gelu_pytorch_tanh" are the tanh approximation)
ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact", "relu": "relu"}


def gpt2_config(c: dict[str, Any]) -> GPTConfig:
    """Our config for a GPT-2 `config.json`; options GPT has no equivalent for are refused."""
    if c.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"not a GPT-2 config: model_type {c.get('model_type')!r}")
    act = c.get("activation_function", "gelu_new")
    unsupported = [
        f"activation_function={act!r}" * (act not in ACTIVATIONS),
        "scale_attn_weights=false" * (not c.get("scale_attn_weights", True)),
        "scale_attn_by_inverse_layer_idx" * bool(c.get("scale_attn_by_inverse_layer_idx")),
        "reorder_and_upcast_attn" * bool(c.get("reorder_and_upcast_attn")),
    ]
    if any(unsupported):
        raise CheckpointError(f"GPT-2 options QuillGPT cannot reproduce: {', '.join(u for u in unsupported if u)}")
    try:
        return GPTConfig(
            vocab_size=c["vocab_size"],
            block_size=c["n_positions"],
            n_layer=c["n_layer"],
            n_head=c["n_head"],
            n_embd=c["n_embd"],
            mlp_hidden=c.get("n_inner"),
            norm_eps=c.get("layer_norm_epsilon", 1e-5),
            activation=ACTIVATIONS[act],
            tie_embeddings=c.get("tie_word_embeddings", True),
        )
    except KeyError as e:
        raise CheckpointError(f"GPT-2 config lacks {e}") from None
    except ConfigError as e:
        raise CheckpointError(f"GPT-2 config: {e}") from None


def load_gpt2_state(
    model: GPT, state: dict[str, torch.Tensor], source: str | Path, conv1d: bool, prefix: str = ""
) -> GPT:
    """Load GPT-2-named weights (HF: Conv1D transposed; nanoGPT: nn.Linear as ours) into `model`."""
    converted = {}
    for key, value in state.items():
        key = key.removeprefix(prefix)
        if MASK_BUFFER.fullmatch(key):
            continue  # causal-mask buffers of older transformers and nanoGPT versions
        converted[key] = value.t() if conv1d and key.endswith(CONV1D) else value
    missing, unexpected = model.load_state_dict(converted, strict=False)
    check_loaded_keys(model, missing, unexpected, f"weights in {source} do not map onto GPT")
    return model.eval()


def gpt_from_hf_gpt2(hf_model) -> GPT:
    """An equivalent `GPT` for a loaded HuggingFace `GPT2LMHeadModel`."""
    config = gpt2_config(hf_model.config.to_dict())
    return load_gpt2_state(GPT(config), hf_model.state_dict(), type(hf_model).__name__, conv1d=True)


def read_hf_gpt2(directory: str | Path) -> tuple[GPT, BPETokenizer | None]:
    """The model in a HuggingFace GPT-2 directory, and its tokenizer if the directory has one."""
    directory = Path(directory)
    try:
        c = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"not a HuggingFace model directory (no config.json): {directory}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{directory / 'config.json'} is not valid JSON: {e}") from None
    model = GPT(gpt2_config(c))
    if (directory / "model.safetensors").is_file():
        path = directory / "model.safetensors"
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot load weights from {path}: {e}") from None
    elif (directory / "pytorch_model.bin").is_file():
        path = directory / "pytorch_model.bin"
        state = load_state_dict_file(path)
    else:
        raise CheckpointError(f"no model.safetensors or pytorch_model.bin in {directory}")
    prefix = "" if any(k.startswith("transformer.") for k in state) else "transformer."
    if prefix:  # a bare GPT2Model's weights: add the prefix the LM-head model uses
        state = {prefix + k: v for k, v in state.items()}
    return load_gpt2_state(model, state, path, conv1d=True), read_tokenizer(directory)


def read_tokenizer(directory: Path) -> BPETokenizer | None:
    """`tokenizer.json`, else GPT-2's `vocab.json` + `merges.txt`, else None."""
    try:
        if (directory / BPE_FILE).is_file():
            return BPETokenizer.from_file(directory / BPE_FILE)
        if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            return BPETokenizer.from_gpt2_files(directory / "vocab.json", directory / "merges.txt")
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    return None


def import_hf_gpt2(sources: list[Path], out: Path) -> Path:
    """`quill import hf-gpt2 DIR`: the directory must hold the tokenizer files too."""
    if len(sources) != 1:
        raise CheckpointError("hf-gpt2 takes one directory (config.json, model.safetensors, tokenizer files)")
    model, tokenizer = read_hf_gpt2(sources[0])
    if tokenizer is None:
        raise CheckpointError(f"no tokenizer in {sources[0]}: add tokenizer.json, or vocab.json and merges.txt")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}"
        )
    return save_model(out, model, tokenizer, provenance={"imported_from": "hf-gpt2", "source": str(sources[0])})
