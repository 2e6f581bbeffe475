"""scripts/make_model_card.py: the card states what `quill eval` measures, book by book and in both layouts."""

import json
import re

from quillgpt.checkpoint import load_model, save_model
from quillgpt.data import split_dataset
from quillgpt.evaluate import score_text
from quillgpt.layout import reflow
from quillgpt.model import GPT
from quillgpt.tokenizer import CharTokenizer
from tests.conftest import REPO, tiny_config
from tests.test_cli import run, script


def test_card_per_book_table_matches_quill_eval(tmp_path, shared_data, capsys):
    books = tmp_path / "books"
    books.mkdir()
    for name in ("austen-persuasion.txt", "melville-moby_dick.txt"):
        (books / name).write_bytes((shared_data / "gutenberg" / name).read_bytes()[30_000:36_000])
    tokenizer = CharTokenizer.from_text((books / "austen-persuasion.txt").read_text(encoding="utf-8"), unk=True)
    model = GPT(tiny_config(vocab_size=tokenizer.vocab_size, block_size=32))
    provenance = {
        "data": str(books),
        "val_split": "per_file",
        "split": "per book",
        "steps": 3,
        "tokens": 96,
        "wall_time_s": 60.0,
        "val_loss_full_split": 4.0,
        "val_tokens": 1200,
        "val_bits_per_byte": 5.8,
        "default_prompt": "CHAPTER I\n\n",
    }
    save_model(tmp_path / "m", model, tokenizer, provenance=provenance)
    (tmp_path / "m" / "metrics.jsonl").write_text('{"step": 3, "loss": 4.0, "time_s": 90.0}\n', encoding="utf-8")

    done = script(
        "make_model_card.py",
        str(tmp_path / "m"),
        "--config",
        str(REPO / "configs" / "harpoon.json"),
        "--title",
        "Tiny Harpoon",
        "--layouts",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    card = (tmp_path / "m" / "README.md").read_text(encoding="utf-8")
    assert card.startswith("# Tiny Harpoon") and "a 1.5-minute run" in card and "1.0 minutes" in card
    assert "CHAPTER I" in card and "characters, " in card and "unknown-character token" in card

    for column, layout in ((1, "original"), (2, "paragraph")):
        code, out, _ = run(
            "eval", str(tmp_path / "m"), "--data", str(books), "--layout", layout, "--json", capsys=capsys
        )
        assert code == 0
        result = json.loads(out.strip().splitlines()[-1])
        for name, scores in [*result["files"].items(), ("**all**", result)]:
            row = re.search(
                rf"^\| {re.escape(name)} \| ([0-9,]+) \| \**([0-9.]+)\** \| \**([0-9.]+)\** \|$", card, re.M
            )
            assert row is not None, name
            assert row.group(1) == f"{scores['bytes']:,}"
            assert row.group(1 + column) == f"{scores['bits_per_byte']:.3f}"


def test_shipped_harpoon_card_states_what_quill_eval_measures(shared_data):
    """The shipped card's per-book rows for its two smallest books, scored again in both layouts."""
    loaded = load_model("harpoon")
    card = (REPO / "models" / "harpoon" / "README.md").read_text(encoding="utf-8")
    val = dict(split_dataset(shared_data / "gutenberg", 0.1, "per_file").val_files)
    for name in ("blake-poems.txt", "shakespeare-macbeth.txt"):
        row = re.search(rf"^\| {re.escape(name)} \| ([0-9,]+) \| ([0-9.]+) \| ([0-9.]+) \|$", card, re.M)
        assert row is not None, name
        stored = score_text(loaded.model, loaded.tokenizer, val[name]).summary()
        reflowed = score_text(loaded.model, loaded.tokenizer, reflow(val[name])).summary()
        assert row.group(1) == f"{stored['bytes']:,}"  # the bytes as stored (re-flowing drops trailing spaces)
        assert row.group(2) == f"{stored['bits_per_byte']:.3f}" and row.group(3) == f"{reflowed['bits_per_byte']:.3f}"
