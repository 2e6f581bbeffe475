"""The Shakespeare notebook runs top to bottom (on a tiny model, so it cannot rot)."""

import os

import pytest

from quillgpt.checkpoint import save_model
from quillgpt.model import GPT
from quillgpt.tokenizer import CharTokenizer
from tests.conftest import REPO, tiny_config

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def test_notebook_executes(tmp_path, monkeypatch):
    tokenizer = CharTokenizer(SHAKESPEARE_CHARS)
    model = GPT(tiny_config(vocab_size=tokenizer.vocab_size, block_size=32))
    save_model(tmp_path / "tiny", model, tokenizer)
    monkeypatch.setenv("QUILL_NOTEBOOK_MODEL", str(tmp_path / "tiny"))
    monkeypatch.setenv("QUILL_NOTEBOOK_TOKENS", "20")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(REPO / "notebooks" / "shakespeare.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "tiny:" in text and "ROMEO:" in text
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "<span title=" in html  # the coloured per-character view
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the probability chart
