import copy
import dataclasses
import math

import pytest
import torch

import quillgpt.model
from quillgpt import kernels
from quillgpt.config import ConfigError, GPTConfig, load_train_config
from quillgpt.interop.hf_gpt2 import gpt_from_hf_gpt2
from quillgpt.model import (
    GPT,
    HALF_ROWS,
    KERNEL_ROWS,
    Int8Linear,
    KVCache,
    PackedLinear,
    activate,
    fbgemm_half,
    fbgemm_half_linear,
    prepare_for_inference,
    quantize_rows,
)
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


def test_cached_forward_matches_full_forward():
    torch.manual_seed(0)
    for variant in ("gpt2", "modern"):
        model = GPT(tiny_config(**VARIANTS[variant])).eval()
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2)
        idx = torch.randint(0, 40, (2, 10))
        full, _ = model(idx)
        cache = KVCache.allocate(model.config, 2)
        first, _ = model(idx[:, :6], cache=cache)
        steps = [model(idx[:, t : t + 1], pos=torch.full((2, 1), t), cache=cache)[0] for t in range(6, 10)]
        torch.testing.assert_close(torch.cat([first] + steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_is_not_in_state_dict(tiny_model):
    assert not any("cache" in k or "rotary" in k for k in tiny_model.state_dict())


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


@pytest.mark.parametrize("variant", ["gpt2", "modern", "odd-heads"])
def test_inference_weights_float32_is_exact_and_bfloat16_close(variant):
    torch.manual_seed(0)
    model = GPT(tiny_config(**VARIANTS[variant])).eval()
    for p in model.parameters():  # zero-initialised projections would hide a wrong packed weight
        p.data.normal_(0, 0.3)
    idx = torch.randint(0, model.config.vocab_size, (3, model.config.block_size))
    reference, _ = model(idx)
    packed = prepare_for_inference(copy.deepcopy(model), "float32")
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    assert packed.num_params() == model.num_params()
    assert torch.allclose(packed(idx)[0], reference, atol=1e-5)
    bf16 = prepare_for_inference(copy.deepcopy(model), "bfloat16")
    logits, _ = bf16(idx)
    assert logits.dtype == torch.float32  # bfloat16 weights, float32 activations
    assert 0 < (logits - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize("bias,width", [(False, 96), (True, 96), (True, 24)])  # 24: no int8 kernel
def test_int8_linear_multiplies_by_its_rounded_weight_on_both_paths(bias, width):
    """Few rows go through the int8 kernel, many through the packed copy: both must compute
    x @ (int8 * scale).T + bias, checked against that product in float64. One large entry per row
    makes the int8 steps coarse, so the rounded weight is far from the original."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(width, 40, bias=bias)
    linear.weight.data[:, 0] = 10.0
    linear.weight.data[3] = 0.0  # an all-zero row has no largest magnitude to scale by
    layer = Int8Linear(linear)
    assert (layer.few_rows > 0) == (width % 16 == 0)
    q, scale = quantize_rows(linear.weight)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and (q[3] == 0).all()
    assert (q.float() * scale[:, None] - linear.weight).abs().max() <= scale.max() / 2 + 1e-6  # half a step
    rounded = q.double() * layer.scale.double()[:, None]  # the scale as the kernel holds it
    for rows in sorted({1, max(layer.few_rows, 1), layer.few_rows + 1, 37}):
        x = torch.randn(rows, width).to(torch.bfloat16).float()  # as the kernels see it
        reference = x.double() @ rounded.T + (linear.bias.double() if bias else 0)
        y = layer(x.view(rows, 1, width)).view(rows, 40)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), reference, atol=0.05, rtol=0.01)  # both round to bfloat16
        assert (y.double() - (x.double() @ linear.weight.double().T)).abs().max() > 0.3  # not the original
    if kernels.int8_linear_op() is None:
        return
    for rows in range(1, KERNEL_ROWS + 2):  # decoding (no gradients): QuillGPT's kernel up to KERNEL_ROWS
        x = torch.randn(rows, 1, width)  # float32 throughout: no rounding of x or y to bfloat16
        reference = x.double() @ rounded.T + (linear.bias.double() if bias else 0)
        with torch.no_grad():
            y = layer(x).double()
        error = (y - reference).abs().max().item()
        if rows <= KERNEL_ROWS:
            assert error < 1e-5 * reference.abs().max().item(), (rows, error)
        else:  # past it, a packed copy that rounds x to bfloat16 where that is native
            torch.testing.assert_close(y, reference, atol=0.1, rtol=0.01)


@pytest.mark.skipif(not fbgemm_half(), reason="this PyTorch has no FBGEMM")
@pytest.mark.parametrize("bias,width", [(False, 96), (True, 96), (True, 24)])  # 24: no int8 kernel
def test_int8_linear_without_native_bfloat16_multiplies_batches_by_a_float16_copy(monkeypatch, bias, width):
    """On AVX2-only CPUs 5 to HALF_ROWS rows (from 1 where the int8 kernel cannot take the width) go
    through FBGEMM's float16 copy of the rounded weight: float32 activations and sums, so closer to
    the float64 product than the int8 kernel's bfloat16 rounding of the activations. Each activation,
    fused or not, matches it applied to the float64 product."""
    monkeypatch.setattr(quillgpt.model, "native_bfloat16", lambda: False)
    torch.manual_seed(0)
    linear = torch.nn.Linear(width, 40, bias=bias)
    linear.weight.data[:, 0] = 10.0
    layer = Int8Linear(linear)
    assert layer.float16_copy is not None and layer.dtype == torch.float32
    assert layer.few_rows == (4 if width % 16 == 0 else 0)
    rounded = layer.qweight.double() * layer.scale.double()[:, None]
    for rows in (1, 4, 5, 16, HALF_ROWS, HALF_ROWS + 1, 64):
        x = torch.randn(rows, 1, width)
        reference = (x.double() @ rounded.T + (linear.bias.double() if bias else 0)).view(rows, 1, 40)
        error = (layer(x).double() - reference).abs().max().item()
        if layer.few_rows < rows <= HALF_ROWS:  # float16 weights: 11 bits; the int8 kernel's inputs keep 8
            assert 1e-4 < error < 0.01, (rows, error)  # and their rounding shows: not the float32 copy
        else:
            assert error < 0.1, (rows, error)
        for activation in ("none", "gelu", "gelu_exact", "relu", "relu2"):
            y = layer.activated(x, activation)
            assert y.dtype == torch.float32 and y.shape == (rows, 1, 40)
            expected = activate(reference, activation) if activation != "none" else reference
            torch.testing.assert_close(y.double(), expected, atol=0.1, rtol=0.01)
            if layer.few_rows < rows <= HALF_ROWS:
                torch.testing.assert_close(y.double(), expected, atol=0.02, rtol=0.002)
    huge = torch.nn.Linear(96, 8)
    huge.weight.data[0, 0] = 1e6  # past float16's range: no float16 copy, the float32 one instead
    layer = Int8Linear(huge)
    assert layer.float16_copy is None and layer.few_rows == 16
    x = torch.randn(17, 96)  # past the int8 kernel's rows: the float32 copy
    reference = x.double() @ (layer.qweight.double() * layer.scale.double()[:, None]).T + huge.bias.double()
    torch.testing.assert_close(layer(x).double(), reference, atol=1e-3, rtol=1e-5)  # row 0 is in millions


@pytest.mark.skipif(not fbgemm_half(), reason="this PyTorch has no FBGEMM")
def test_fbgemm_half_linear_past_python_dispatch_equals_torch_ops():
    """The dispatcher's own entry point gives FBGEMM's result bit for bit, relu fused or not, and a
    tensor subclass still goes through `torch.ops` (its own `__torch_function__` runs)."""
    torch.manual_seed(0)
    weight, bias, x = torch.randn(40, 96), torch.randn(40), torch.randn(16, 96)
    packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)
    assert torch.equal(fbgemm_half_linear(x, packed), torch.ops.quantized.linear_dynamic_fp16(x, packed))
    relu = torch.ops.quantized.linear_relu_dynamic_fp16(x, packed)
    assert torch.equal(fbgemm_half_linear(x, packed, relu=True), relu) and (relu == 0).any()

    class Seen(torch.Tensor):
        calls = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.calls.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    y = fbgemm_half_linear(x.as_subclass(Seen), packed)
    assert Seen.calls and torch.equal(y.as_subclass(torch.Tensor), torch.ops.quantized.linear_dynamic_fp16(x, packed))


@pytest.mark.parametrize("activation", ["gelu", "gelu_exact", "relu", "relu2"])
def test_packed_linears_apply_the_mlp_activation_as_they_multiply(activation):
    """oneDNN applies the activation to each product before rounding it (`PackedLinear.activated`):
    the same as the activation on the float32 product, to the output's own rounding."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 48)
    layers = {"float32": PackedLinear(linear), "bfloat16": PackedLinear(linear, torch.bfloat16)}
    layers["int8"] = Int8Linear(linear)
    for name, layer in layers.items():
        for rows in (1, 17):  # int8: the int8 kernel, then the packed copy (past 4 or 16 rows)
            x = torch.randn(rows, 1, 32).to(torch.bfloat16).float()
            y = layer.activated(x, activation)
            assert y.dtype == (torch.float32 if name == "int8" and rows <= layer.few_rows else layer.dtype)
            exact = activate(layer(x), activation)  # the unfused path this replaces
            tolerance = 1e-5 if name == "float32" else 0.02
            torch.testing.assert_close(y.float(), exact, atol=tolerance, rtol=tolerance)
            if activation.startswith("relu"):
                assert (y >= 0).all() and (y == 0).any()


@pytest.mark.parametrize("cpu", ["this", "without-native-bfloat16"])
@pytest.mark.parametrize("variant", ["gpt2", "modern"])
def test_int8_inference_weights_keep_the_model_and_stay_close(monkeypatch, variant, cpu):
    if cpu != "this":  # AVX2-only CPUs: float32 copies, and a float16 one for 5 to 48 rows
        monkeypatch.setattr(quillgpt.model, "native_bfloat16", lambda: False)
    torch.manual_seed(0)
    model = GPT(tiny_config(**{**VARIANTS[variant], "tie_embeddings": True})).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    keys, n = list(model.state_dict()), model.num_params()
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    reference, _ = model(idx)
    int8 = prepare_for_inference(copy.deepcopy(model), "int8")
    assert not any(type(m) is torch.nn.Linear for m in int8.modules())
    assert list(int8.state_dict()) == keys and int8.num_params() == n  # counts and saves like the model
    assert int8.lm_head.weight is int8.transformer.wte.weight  # still tied
    auto = prepare_for_inference(copy.deepcopy(model), "auto")  # what the CLI, server and playground use
    assert any(isinstance(m, Int8Linear) for m in auto.modules())
    logits, _ = int8(idx)
    assert 0 < (logits - reference).abs().max() < 0.05 * reference.abs().max()
    last, _ = int8(idx[:1, :3])  # one row of three tokens: the int8 kernel's few-rows path
    torch.testing.assert_close(last, logits[:1, :3], atol=0.05 * reference.abs().max().item(), rtol=0)


def test_inference_weights_decode_with_the_cache_like_the_plain_model(char_tokenizer):
    from quillgpt.generate import generate
    from quillgpt.sampling import SamplingParams

    torch.manual_seed(0)
    model = GPT(tiny_config(**MODERN, vocab_size=char_tokenizer.vocab_size)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    params = SamplingParams(max_new_tokens=40, temperature=0)
    plain = [c.text for c in generate(model, char_tokenizer, ["All:", "Speak", "S"], params)]
    packed = prepare_for_inference(copy.deepcopy(model), "float32")
    assert [c.text for c in generate(packed, char_tokenizer, ["All:", "Speak", "S"], params)] == plain


def test_unknown_inference_weights_are_refused():
    with pytest.raises(ValueError, match="float32, bfloat16"):
        prepare_for_inference(GPT(tiny_config()), "float16")


def test_the_226m_config_has_the_original_shape_and_size():
    cfg = load_train_config(REPO / "configs" / "harpoon-226m.json")
    c = dataclasses.replace(cfg.model, vocab_size=135)  # the original's vocabulary came from its own text
    assert (c.n_embd, c.n_head, c.head_dim, c.n_layer, c.block_size) == (1024, 12, 85, 18, 256)
    with torch.device("meta"):
        model = GPT(c)
    # the original's biases: none on q/k/v, one on every output projection and on its LM head
    assert model.num_params() == 226_922_631
