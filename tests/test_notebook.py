"""The notebooks run top to bottom (on tiny models and tiny data, so they cannot rot)."""

import os
import re

import pytest

from quillgpt.checkpoint import save_model
from quillgpt.model import GPT
from quillgpt.tokenizer import CharTokenizer
from tests.conftest import REPO, tiny_config

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def run_notebook(name: str, monkeypatch, **env: str) -> list[dict]:
    """Execute notebooks/NAME with the environment variables given; its code cells' outputs."""
    for key, value in {"OMP_NUM_THREADS": "1", **env}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors[0].get("evalue") if errors else None
    return outputs


def test_notebook_executes(tmp_path, monkeypatch):
    tokenizer = CharTokenizer(SHAKESPEARE_CHARS)
    model = GPT(tiny_config(vocab_size=tokenizer.vocab_size, block_size=32))
    save_model(tmp_path / "tiny", model, tokenizer)
    outputs = run_notebook(
        "shakespeare.ipynb", monkeypatch, QUILL_NOTEBOOK_MODEL=str(tmp_path / "tiny"), QUILL_NOTEBOOK_TOKENS="20"
    )
    text = "".join(o.get("text", "") for o in outputs)
    assert "tiny:" in text and "ROMEO:" in text
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "<span title=" in html  # the coloured per-character view
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the probability chart


def test_harpoon_notebook_scores_books_in_both_layouts_and_fine_tunes(tmp_path, monkeypatch, shared_data):
    """Two books cut short stand in for the selection, and a poem file for the reader's own text."""
    books = tmp_path / "books"
    books.mkdir()
    for name in ("austen-emma.txt", "melville-moby_dick.txt"):  # the second has CRLF line ends
        (books / name).write_bytes((shared_data / "gutenberg" / name).read_bytes()[20_000:26_000])
    own = tmp_path / "poems.txt"
    own.write_bytes((shared_data / "gutenberg" / "blake-poems.txt").read_bytes()[:4_000] + "Æsop’s ﬁsh\n".encode())
    tokenizer = CharTokenizer.from_text((books / "austen-emma.txt").read_text(encoding="utf-8"), unk=True)
    model = GPT(tiny_config(vocab_size=tokenizer.vocab_size, block_size=32))
    save_model(tmp_path / "tiny", model, tokenizer, provenance={"default_prompt": "CHAPTER I\n\n"})
    outputs = run_notebook(
        "harpoon.ipynb",
        monkeypatch,
        QUILL_NOTEBOOK_MODEL=str(tmp_path / "tiny"),
        QUILL_NOTEBOOK_DATA=str(books),
        QUILL_NOTEBOOK_FINETUNE=str(own),
        QUILL_NOTEBOOK_FINETUNE_SECONDS="3",
        QUILL_NOTEBOOK_TOKENS="20",
    )
    text = "".join(o.get("text", "") for o in outputs)
    assert "tiny:" in text and "CHAPTER I" in text
    table = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| austen-emma.txt |" in table and "| melville-moby_dick.txt |" in table and "| **all** |" in table
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the per-book chart
    before, after = (float(x) for x in re.search(r"([0-9.]+) bits/byte before, ([0-9.]+) after", text).groups())
    assert after < before  # even three seconds of fine-tuning a random model helps
    plain, adapted = (
        float(x) for x in re.search(r"([0-9.]+) bits/byte plain, ([0-9.]+) learning as it reads", text).groups()
    )
    assert plain == before and adapted < plain  # a random model learns from the poems as it reads them
