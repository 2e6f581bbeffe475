import dataclasses
import math

import pytest
import torch

from quillgpt.config import ConfigError, GPTConfig, load_train_config
from quillgpt.interop.hf_gpt2 import gpt_from_hf_gpt2
from quillgpt.model import GPT
from tests.conftest import REPO, tiny_config

MODERN = dict(
    pos_emb="rope",
    norm="rmsnorm",
    norm_affine=False,
    qk_norm=True,
    activation="relu2",
    logit_softcap=15.0,
    zero_init_proj=True,
    tie_embeddings=False,
    bias=False,
)
VARIANTS = {
    "gpt2": {},
    "modern": MODERN,
    "swiglu": dict(activation="swiglu", norm="rmsnorm", bias=False),
    "relu-untied": dict(activation="relu", tie_embeddings=False),
    "odd-heads": dict(n_embd=24, n_head=3, head_size=5),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_causality(variant):
    torch.manual_seed(0)
    model = GPT(tiny_config(**VARIANTS[variant])).eval()
    if model.config.zero_init_proj:  # zero projections would hide any leak from the future
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2)
    idx = torch.randint(0, 40, (2, 12))
    logits, loss = model(idx)
    assert logits.shape == (2, 12, 40) and loss is None
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 40
    logits2, _ = model(changed)
    torch.testing.assert_close(logits[:, :7], logits2[:, :7])
    assert not torch.allclose(logits[:, 7:], logits2[:, 7:])


@pytest.mark.parametrize("variant", ["gpt2", "modern"])
def test_initial_loss_is_uniform(variant):
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=65, n_embd=64, n_head=4, **VARIANTS[variant]))
    idx = torch.randint(0, 65, (8, 16))
    _, loss = model(idx, torch.randint(0, 65, (8, 16)))
    assert abs(loss.item() - math.log(65)) < 0.05


def test_head_size_may_differ_from_width():
    # the original QuillGPT's 226M shape in miniature: 12 heads of 85 over a 1024-wide stream
    config = GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=12, n_embd=1024, head_size=85)
    model = GPT(config)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (3 * 12 * 85, 1024)
    assert model(torch.zeros(1, 8, dtype=torch.long))[0].shape == (1, 8, 10)


def test_param_count_counts_tied_weights_once():
    V, T, L, C = 65, 256, 6, 384
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=6, n_embd=C))
    per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    assert model.num_params() == V * C + T * C + L * per_block + 2 * C  # the 10.7M Shakespeare shape
    assert model.num_params(non_embedding=True) == model.num_params() - T * C


def test_matches_huggingface_gpt2():
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(
        vocab_size=97,
        n_positions=32,
        n_embd=48,
        n_layer=3,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # make biases and norms non-trivial so the mapping is really checked
        for name, p in hf.named_parameters():
            if "ln" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model = gpt_from_hf_gpt2(hf).eval()
    idx = torch.randint(0, 97, (3, 32))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = model(idx)
    assert (logits - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=30, n_head=4), "not divisible"),
        (dict(n_layer=0), "n_layer must be >= 1"),
        (dict(dropout=1.5), "dropout"),
        (dict(attn_dropout=-0.1), "attn_dropout"),
        (dict(pos_emb="alibi"), "pos_emb"),
        (dict(pos_emb="rope", n_embd=18, n_head=2), "even head size"),
        (dict(n_head=2.5), "n_head"),
        (dict(bias="yes"), "bias"),
    ],
)
def test_impossible_configs_are_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**kwargs)


def test_too_long_input_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny_model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("variant", ["gpt2", "modern"])
def test_attention_maps_match_the_fused_attention(variant):
    torch.manual_seed(0)
    model = GPT(tiny_config(**VARIANTS[variant])).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    idx = torch.randint(0, 40, (1, 10))
    maps = model.attention_maps(idx)
    assert len(maps) == 2 and maps[0].shape == (2, 10, 10)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 10))
    assert maps[0].triu(1).abs().max() == 0  # nothing attends to the future
    # the first layer's output, rebuilt from the explicit probabilities, equals the model's own
    block = model.transformer.h[0]
    x = model.transformer.wte(idx) + (model.transformer.wpe(torch.arange(10)) if model.transformer.wpe else 0)
    rope = model.rotary(None, 10) if model.rotary is not None else None
    _, _, v = block.attn.qkv(block.ln_1(x), rope)
    y = (maps[0][None] @ v).transpose(1, 2).reshape(1, 10, -1)
    torch.testing.assert_close(block.attn.c_proj(y), block.attn(block.ln_1(x), rope), atol=1e-5, rtol=1e-5)


def test_the_226m_config_has_the_original_shape_and_size():
    cfg = load_train_config(REPO / "configs" / "harpoon-226m.json")
    c = dataclasses.replace(cfg.model, vocab_size=135)  # the original's vocabulary came from its own text
    assert (c.n_embd, c.n_head, c.head_dim, c.n_layer, c.block_size) == (1024, 12, 85, 18, 256)
    with torch.device("meta"):
        model = GPT(c)
    # the original's biases: none on q/k/v, one on every output projection and on its LM head
    assert model.num_params() == 226_922_631
