"""nanoGPT checkpoints (model_args + model, `_orig_mod.` keys, meta.pkl) against HF GPT-2 with exact GELU."""

import pickle

import pytest
import torch

from quillgpt.checkpoint import CheckpointError, load_model
from quillgpt.cli import main
from quillgpt.interop.nanogpt import read_meta
from tests.conftest import SAMPLE_TEXT
from tests.interop.conftest import random_gpt2

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def nanogpt_checkpoint(hf, bias=True, compiled=True):
    """What nanoGPT's train.py saves for the model `hf` (same weights as nn.Linear)."""
    c = hf.config
    state = {}
    for k, v in hf.state_dict().items():
        if not bias and k.endswith(".bias"):
            continue
        state[k] = v.t().contiguous() if k.endswith(CONV1D) else v
    for i in range(c.n_layer):  # the causal-mask buffer older torch versions kept
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(c.n_positions, c.n_positions))[None, None]
    if compiled:
        state = {"_orig_mod." + k: v for k, v in state.items()}
    args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions)
    args.update(bias=bias, vocab_size=c.vocab_size, dropout=0.0)
    return {"model": state, "model_args": args, "iter_num": 10, "best_val_loss": torch.tensor(2.5), "config": {}}


@pytest.mark.parametrize("bias, compiled", [(True, True), (False, False)])
def test_import_matches_reference_logits(tmp_path, bias, compiled):
    chars = sorted(set(SAMPLE_TEXT))
    hf = random_gpt2(vocab_size=64, activation="gelu", bias=bias)  # nanoGPT: nn.GELU(), the erf form
    torch.save(nanogpt_checkpoint(hf, bias, compiled), tmp_path / "ckpt.pt")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    out = tmp_path / "m"
    assert main(["import", "nanogpt", str(tmp_path / "ckpt.pt"), str(tmp_path / "meta.pkl"), "--out", str(out)]) == 0
    loaded = load_model(out)
    x = torch.tensor([loaded.tokenizer.encode(SAMPLE_TEXT[:32])])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x)[0], hf(x).logits, atol=1e-4, rtol=0)
    assert loaded.tokenizer.chars == chars and loaded.model.config.bias is bias
    assert loaded.model.config.vocab_size == 64  # nanoGPT pads the vocabulary; the tokenizer stays 39


def test_meta_pkl_with_anything_but_plain_data_is_refused(tmp_path):
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"stoi": {"a": 0}, "when": range(3)}))
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*meta.pkl: it references builtins.range"):
        read_meta(tmp_path / "meta.pkl")


def test_not_a_nanogpt_checkpoint(tmp_path):
    torch.save({"weights": {}}, tmp_path / "ckpt.pt")
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"stoi": {"a": 0}}))
    with pytest.raises(CheckpointError, match="not a nanoGPT checkpoint"):
        from quillgpt.interop.nanogpt import import_nanogpt

        import_nanogpt([tmp_path / "ckpt.pt", tmp_path / "meta.pkl"], tmp_path / "m")
