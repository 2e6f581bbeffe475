"""nanoGPT checkpoints: `ckpt.pt` (`model_args` + `model`, the state dict with or without the
`_orig_mod.` prefix torch.compile adds) and the character vocabulary of its `meta.pkl`.

nanoGPT names its weights as GPT-2 does, with `nn.Linear` like ours, and uses the exact (erf)
GELU. `ckpt.pt` is read with torch.load(weights_only=True) and `meta.pkl` with an unpickler that
admits plain data only. Without `meta.pkl` nanoGPT used GPT-2's BPE: give its files instead.
"""

from __future__ import annotations

from pathlib import Path

from quillgpt.checkpoint import CheckpointError, save_model
from quillgpt.config import ConfigError, GPTConfig
from quillgpt.interop.hf_gpt2 import load_gpt2_state, read_tokenizer
from quillgpt.model import GPT
from quillgpt.tokenizer import BPETokenizer, CharTokenizer
from quillgpt.weights import load_plain_pickle, load_torch_file

MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")


def read_nanogpt(ckpt_path: str | Path) -> GPT:
    ckpt = load_torch_file(ckpt_path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_args"), dict) or "model" not in ckpt:
        raise CheckpointError(f"{ckpt_path} is not a nanoGPT checkpoint (needs 'model_args' and 'model')")
    args = {k: v for k, v in ckpt["model_args"].items() if k in MODEL_ARGS}
    try:
        config = GPTConfig(**args, activation="gelu_exact")
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{ckpt_path}: model_args {e}") from None
    return load_gpt2_state(GPT(config), ckpt["model"], ckpt_path, conv1d=False, prefix="_orig_mod.")


def read_meta(path: str | Path) -> CharTokenizer:
    """nanoGPT's `meta.pkl`: {'vocab_size', 'itos': {id: char}, 'stoi': {char: id}}."""
    meta = load_plain_pickle(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("stoi"), dict):
        raise CheckpointError(f"{path} has no 'stoi' map")
    itos = meta.get("itos")
    try:
        return CharTokenizer.from_maps(meta["stoi"], {str(k): v for k, v in itos.items()} if itos else None)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def import_nanogpt(sources: list[Path], out: Path) -> Path:
    """`quill import nanogpt ckpt.pt meta.pkl` (char models) or `ckpt.pt DIR` (DIR: GPT-2's tokenizer files)."""
    ckpts = [s for s in sources if s.suffix in (".pt", ".pth")]
    rest = [s for s in sources if s not in ckpts]
    if len(ckpts) != 1 or len(rest) != 1:
        raise CheckpointError("nanogpt takes ckpt.pt and its tokenizer: meta.pkl, or a folder with GPT-2's files")
    tokenizer: CharTokenizer | BPETokenizer | None
    tokenizer = read_meta(rest[0]) if rest[0].suffix == ".pkl" else read_tokenizer(rest[0])
    if tokenizer is None:
        raise CheckpointError(f"no tokenizer.json, or vocab.json and merges.txt, in {rest[0]}")
    model = read_nanogpt(ckpts[0])
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}"
        )
    return save_model(out, model, tokenizer, provenance={"imported_from": "nanogpt", "source": str(ckpts[0])})
