"""HuggingFace GPT-2 directories (saved by transformers itself) import with their tokenizer."""

import pytest
import torch

from quillgpt.checkpoint import CheckpointError, load_model
from quillgpt.cli import main
from quillgpt.interop.hf_gpt2 import read_hf_gpt2
from quillgpt.tokenizer import BPETokenizer
from tests.conftest import SAMPLE_TEXT
from tests.interop.conftest import random_gpt2


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_import_matches_transformers_logits_and_tokenizer(tmp_path, activation):
    tok = BPETokenizer.train([SAMPLE_TEXT * 5], vocab_size=300)
    hf = random_gpt2(vocab_size=tok.vocab_size, activation=activation)
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    tok.tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    assert main(["import", "hf-gpt2", str(tmp_path / "hf"), "--out", str(tmp_path / "m")]) == 0
    loaded = load_model(tmp_path / "m")
    ids = loaded.tokenizer.encode(SAMPLE_TEXT[:60])
    assert ids == tok.encode(SAMPLE_TEXT[:60])
    x = torch.tensor([ids[:32]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x)[0], hf(x).logits, atol=1e-4, rtol=0)


def test_options_without_an_equivalent_are_refused(tmp_path):
    random_gpt2(scale_attn_by_inverse_layer_idx=True).save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="cannot reproduce: scale_attn_by_inverse_layer_idx"):
        read_hf_gpt2(tmp_path / "hf")


def test_a_directory_without_a_tokenizer_is_refused(tmp_path, capsys):
    random_gpt2().save_pretrained(tmp_path / "hf")
    assert main(["import", "hf-gpt2", str(tmp_path / "hf"), "--out", str(tmp_path / "m")]) == 2
    assert "no tokenizer in" in capsys.readouterr().err
