import copy

import pytest
import torch

from quillgpt.checkpoint import load_model, save_model
from quillgpt.evaluate import evaluate_ids
from quillgpt.infer import int8 as int8_module
from quillgpt.infer.int8 import Int8Linear
from quillgpt.infer.packed import PackedLinear, PreparedModelError
from quillgpt.infer.prepare import prepare_for_inference
from quillgpt.interop.export_onnx import export_onnx
from quillgpt.model import GPT
from tests.conftest import tiny_config
from tests.test_model import MODERN, VARIANTS


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


@pytest.mark.parametrize("cpu", ["this", "with-a-batch-copy", "without-native-bfloat16"])
@pytest.mark.parametrize("variant", ["gpt2", "modern"])
def test_int8_inference_weights_keep_the_model_and_stay_close(monkeypatch, variant, cpu):
    if cpu != "this":  # the int8 kernel for a few rows, a bfloat16 copy past them
        monkeypatch.setattr(int8_module, "kernel_serves_batches", lambda: False)
    if cpu == "without-native-bfloat16":  # AVX2-only CPUs: float32 copies, and a float16 one for 5 to 48 rows
        monkeypatch.setattr(int8_module, "native_bfloat16", lambda: False)
    torch.manual_seed(0)
    model = GPT(tiny_config(**{**VARIANTS[variant], "tie_embeddings": True})).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    n = model.num_params()
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    reference, _ = model(idx)
    int8 = prepare_for_inference(copy.deepcopy(model), "int8")
    assert not any(type(m) is torch.nn.Linear for m in int8.modules())
    assert int8.num_params() == n  # counts like the model (saving is refused: see below)
    assert int8.lm_head.weight is int8.transformer.wte.weight  # still tied
    auto = prepare_for_inference(copy.deepcopy(model), "auto")  # what the CLI, server and playground use
    assert any(isinstance(m, Int8Linear) for m in auto.modules())
    copies = [m.packed is not None for m in int8.modules() if isinstance(m, Int8Linear)]
    if cpu == "this" and int8_module.kernel_serves_batches():
        assert not any(copies)  # the int8 weights alone
    else:
        assert all(copies)
    logits, _ = int8(idx)  # 24 rows: the kernel's bfloat16 tiles, or the packed copy
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


@pytest.mark.parametrize("weights", ["int8", "bfloat16", "float32"])
def test_prepared_models_hold_what_decoding_reads_and_refuse_what_needs_the_rest(tiny_model_dir, tmp_path, weights):
    """No linear keeps its float32 weight beside the copies decoding reads (a tied one stays: the
    embedding reads it); the model still counts and scores, and refuses saving, exporting, moving
    and training with one clear error instead of writing or training placeholders."""
    plain = load_model(tiny_model_dir)
    prepared = load_model(tiny_model_dir)
    model = prepare_for_inference(prepared.model, weights)
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert linears and not any(type(m) is torch.nn.Linear for m in model.modules())
    wte = model.transformer.wte.weight
    assert all(m.weight.device.type == "meta" or m.weight is wte for m in linears)
    assert model.lm_head.weight is wte  # tied: kept, as the embedding reads it
    assert model.num_params() == plain.model.num_params()
    ids = torch.randint(0, model.config.vocab_size, (200,)).numpy()
    (nll, count), (plain_nll, plain_count) = evaluate_ids(model, ids), evaluate_ids(plain.model, ids)
    assert count == plain_count and abs(nll - plain_nll) < 0.01 * plain_nll
    refusal = "prepared for decoding.*weights='float32'"
    with pytest.raises(PreparedModelError, match=refusal):
        save_model(tmp_path / "saved", model, prepared.tokenizer)
    assert not (tmp_path / "saved" / "model.safetensors").exists()
    with pytest.raises(PreparedModelError, match=refusal):
        model.state_dict()
    with pytest.raises(PreparedModelError, match=refusal):
        model.load_state_dict(plain.model.state_dict())
    with pytest.raises(PreparedModelError, match=refusal):
        model.float()
    with pytest.raises(PreparedModelError, match=refusal):
        model.train()
    model.eval()  # still allowed
    pytest.importorskip("onnx")
    with pytest.raises(PreparedModelError, match=refusal):
        export_onnx(prepared, tmp_path / "m.onnx")
