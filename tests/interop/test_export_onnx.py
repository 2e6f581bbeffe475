"""`quill export onnx`: onnxruntime prefills and decodes with the KV-cache graph as our model does."""

import numpy as np
import pytest
import torch

from quillgpt.checkpoint import save_model
from quillgpt.cli import main
from quillgpt.generate import generate
from quillgpt.model import GPT
from quillgpt.sampling import SamplingParams
from quillgpt.tokenizer import CharTokenizer
from tests.conftest import SAMPLE_TEXT, tiny_config

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from quillgpt.interop.export_onnx import OnnxDecoder  # noqa: E402

MODERN = dict(
    pos_emb="rope", norm="rmsnorm", norm_affine=False, qk_norm=True, activation="relu2", bias=False,
    tie_embeddings=False, logit_softcap=15.0,
)  # fmt: skip
ORIGINAL = dict(qkv_bias=False, lm_head_bias=True, activation="relu", tie_embeddings=False, n_head=3, head_size=5)


@pytest.mark.parametrize("options", [MODERN, {}, ORIGINAL], ids=["modern", "gpt2", "quillgpt-v1"])
def test_prefill_and_decode_steps_match_our_logits(tmp_path, options):
    chars = CharTokenizer.from_text(SAMPLE_TEXT)
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=chars.vocab_size, block_size=32, **options)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    save_model(tmp_path / "m", model, chars)
    assert main(["export", "onnx", str(tmp_path / "m"), "--out", str(tmp_path / "m.onnx")]) == 0

    decoder = OnnxDecoder(tmp_path / "m.onnx")
    assert decoder.config == model.config and decoder.tokenizer_spec == chars.to_spec()
    ids = torch.tensor([chars.encode(SAMPLE_TEXT[:20]), chars.encode(SAMPLE_TEXT[40:60])])
    with torch.no_grad():
        expected = model(ids)[0].numpy()  # (2, 20, V), no cache
    np.testing.assert_allclose(decoder.prefill(ids[:, :12].numpy()), expected[:, 11], atol=1e-4, rtol=0)
    for t in range(12, 20):
        np.testing.assert_allclose(decoder.step(ids[:, t].numpy()), expected[:, t], atol=1e-4, rtol=0)
    assert decoder.length == 20

    prompts = ["All:\n", "Speak"]
    ours = generate(model, chars, prompts, SamplingParams(max_new_tokens=15, temperature=0))
    for prompt, completion in zip(prompts, ours):
        out = decoder.greedy(np.array([chars.encode(prompt)]), 15)
        assert chars.decode(out[0].tolist()) == prompt + completion.text
    with pytest.raises(ValueError, match="exceed the context of 32"):
        decoder.greedy(ids[:, :20].numpy(), 14)


def test_the_output_must_be_an_onnx_file(tmp_path, tiny_model_dir, capsys):
    assert main(["export", "onnx", str(tiny_model_dir), "--out", str(tmp_path / "m")]) == 2
    assert "must be a .onnx file" in capsys.readouterr().err
