"""`quill export hf`: transformers' Auto classes load the directory; logits, greedy text and ids match."""

import pytest
import torch

from quillgpt.checkpoint import load_model, save_model
from quillgpt.cli import main
from quillgpt.model import GPT
from quillgpt.tokenizer import BPETokenizer, CharTokenizer
from tests.conftest import SAMPLE_TEXT, tiny_config
from tests.interop.conftest import transformers


def shakespeare(shared_data, n=3000) -> str:
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    return text[-n:]  # from the validation split


def export(model_dir, tmp_path, remote_code=False):
    out = tmp_path / "hf"
    assert main(["export", "hf", str(model_dir), "--out", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote_code).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=remote_code)
    return hf, tok


def check_greedy_text(hf, tok, model_dir, prompt, capsys, n=40):
    capsys.readouterr()
    argv = ["generate", "--model", str(model_dir), "--prompt", prompt, "--temperature", "0"]
    assert main([*argv, "--max-new-tokens", str(n), "--no-stream"]) == 0
    ours = capsys.readouterr().out.removesuffix("\n")
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=n, do_sample=False)
    assert tok.decode(out[0]) == ours
    assert len(ours) > len(prompt)


def randomised(model: GPT, std=0.3) -> GPT:
    """Weights far from init (zero-initialised projections, unit norms), so every tensor matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * std)
    return model.eval()


@pytest.mark.parametrize(
    "options",
    [dict(), dict(bias=False, activation="gelu_exact", tie_embeddings=False, norm_affine=False)],
    ids=["gpt2", "no-bias-erf-untied"],
)
def test_gpt2_style_models_become_gpt2lmheadmodel(tmp_path, options, capsys):
    chars = CharTokenizer.from_text(SAMPLE_TEXT)
    model = randomised(GPT(tiny_config(vocab_size=chars.vocab_size, block_size=64, **options)))
    save_model(tmp_path / "m", model, chars)
    hf, tok = export(tmp_path / "m", tmp_path)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    ids = tok(SAMPLE_TEXT[:64])["input_ids"]
    assert ids == chars.encode(SAMPLE_TEXT[:64])
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-4, rtol=0)
    check_greedy_text(hf, tok, tmp_path / "m", "All:\n", capsys)


def test_the_shipped_model_exports_with_remote_code(tmp_path, shared_data, capsys):
    loaded = load_model("shakespeare-char")
    hf, tok = export("shakespeare-char", tmp_path, remote_code=True)
    assert type(hf).__name__ == "QuillGPTForCausalLM"
    text = shakespeare(shared_data)
    ids = tok(text)["input_ids"]
    assert ids == loaded.tokenizer.encode(text) and tok.decode(ids) == text
    x = torch.tensor([ids[: loaded.model.config.block_size]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, loaded.model(x)[0], atol=1e-4, rtol=0)
    check_greedy_text(hf, tok, "shakespeare-char", "ROMEO:\n", capsys)


def test_gpt2_bpe_tokenizer_exports_with_the_same_ids(tmp_path, shared_data):
    tok = BPETokenizer.from_gpt2_files(shared_data / "gpt2" / "vocab.json", shared_data / "gpt2" / "merges.txt")
    model = randomised(GPT(tiny_config(vocab_size=tok.vocab_size, n_embd=8, n_head=2)), std=0.05)
    save_model(tmp_path / "m", model, tok)
    hf, hf_tok = export(tmp_path / "m", tmp_path)
    text = shakespeare(shared_data, 2000) + " naïve café — ünïcödé"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf.config.eos_token_id == tok.eot_id == 50256
    x = torch.tensor([tok.encode(text)[:16]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-4, rtol=0)


def test_an_option_no_architecture_reproduces_is_refused(tmp_path, capsys):
    chars = CharTokenizer.from_text(SAMPLE_TEXT)
    save_model(tmp_path / "m", GPT(tiny_config(vocab_size=chars.vocab_size, activation="swiglu")), chars)
    assert main(["export", "hf", str(tmp_path / "m"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no transformers architecture reproduces this model" in err
    assert "activation='swiglu'" in err and not (tmp_path / "hf").exists()
