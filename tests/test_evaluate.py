import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quillgpt.checkpoint import load_model
from quillgpt.data import split_dataset, split_text
from quillgpt.evaluate import ADAPT_DECAY, evaluate, evaluate_ids, score_text
from quillgpt.infer.packed import PackedLinear
from quillgpt.infer.prepare import prepare_for_inference
from quillgpt.layout import reflow
from quillgpt.model import GPT
from quillgpt.tokenizer import CharTokenizer, TokenizerError
from tests.conftest import REPO, SAMPLE_TEXT, tiny_config


@pytest.fixture
def books(tmp_path):
    """A folder of three 'books' of different lengths and characters."""
    folder = tmp_path / "books"
    folder.mkdir()
    for name, text in [("a.txt", SAMPLE_TEXT * 8), ("b.txt", "All:\nSpeak, speak.\n" * 40), ("c.txt", "hear me " * 90)]:
        (folder / name).write_text(text)
    return folder


def test_per_file_split_holds_the_last_tenth_of_every_file(books):
    split = split_dataset(books, 0.1, "per_file")
    assert [name for name, _ in split.val_files] == ["a.txt", "b.txt", "c.txt"]
    for name, val in split.val_files:
        text = (books / name).read_text().strip("\n")
        assert val == split_text(text, 0.1)[1] and text.endswith(val)
    assert split.val == "\n\n".join(v for _, v in split.val_files)
    assert split.train == "\n\n".join(
        split_text((books / n).read_text().strip("\n"))[0] for n in "abc" for n in [n + ".txt"]
    )
    concat = split_dataset(books)  # the default: the last tenth of the joined text, mostly the last book
    assert concat.val_split == "concat" and len(concat.val_files) == 1 and "hear me" in concat.val
    assert "Citizen" not in concat.val and split.data_sha256 == concat.data_sha256
    assert "3 files" in split.describe() and concat.describe() == "first 90% train, last 10% val"
    one = books / "a.txt"
    assert split_dataset(one, 0.1, "per_file").val == split_dataset(one).val  # a single file: the same split


def test_unknown_character_costs_its_token_plus_8_bits_per_utf8_byte():
    tok = CharTokenizer.from_text("ab ", unk=True)
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=tok.vocab_size, block_size=16)).eval()
    text = "ab é€a b"  # é: 2 UTF-8 bytes, €: 3
    ids = tok.encode(text)
    assert ids.count(tok.unk_id) == 2
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    logp = F.log_softmax(logits[0, :-1].double(), dim=-1)
    model_bits = -sum(logp[t, ids[t + 1]].item() for t in range(len(ids) - 1)) / math.log(2)
    expected_bits = model_bits + 8 * 2 + 8 * 3  # every unknown character is spelled out after its token
    score = score_text(model, tok, text)
    scored = text[1:]
    assert score.unknown_characters == 2 and score.bytes == len(scored.encode("utf-8")) == 10
    assert score.bits == pytest.approx(expected_bits, rel=1e-5)
    assert score.summary()["bits_per_byte"] == pytest.approx(expected_bits / 10, rel=1e-5)
    assert score.summary()["bits_per_char"] == pytest.approx(expected_bits / len(scored), rel=1e-5)


def test_a_vocabulary_without_an_unknown_token_refuses_other_characters(tiny_model, char_tokenizer):
    with pytest.raises(TokenizerError, match="vocabulary: 'é' \\(it has no unknown token"):
        score_text(tiny_model, char_tokenizer, "First é")


def test_per_file_evaluation_reports_each_file_and_adds_them_up(books, char_tokenizer):
    tok = CharTokenizer(char_tokenizer.chars, unk=True)
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=tok.vocab_size, block_size=32)).eval()
    result = evaluate(model, tok, str(books), "val", val_split="per_file")
    files = result["files"]
    assert list(files) == ["a.txt", "b.txt", "c.txt"]
    for name, f in files.items():
        val = split_text((books / name).read_text().strip("\n"))[1]
        nll, tokens = evaluate_ids(model, np.asarray(tok.encode(val)))
        assert f["tokens"] == tokens and f["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(val[1:]))
    assert result["bytes"] == sum(f["bytes"] for f in files.values())
    total_bits = sum(f["bits_per_byte"] * f["bytes"] for f in files.values())
    assert result["bits_per_byte"] == pytest.approx(total_bits / result["bytes"])
    whole = evaluate(model, tok, str(books / "c.txt"), "all")
    assert whole["characters"] == len((books / "c.txt").read_text()) - 1 and "files" not in whole


def test_paragraph_layout_scores_the_reflowed_text(tmp_path, char_tokenizer):
    tok = CharTokenizer(char_tokenizer.chars, unk=True)
    wrapped = ("First Citizen speak hear me before we proceed any further now\n" * 3 + "\n") * 30
    path = tmp_path / "w.txt"
    path.write_text(wrapped)
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=tok.vocab_size, block_size=32)).eval()
    as_is = evaluate(model, tok, str(path), "val")
    flowed = evaluate(model, tok, str(path), "val", layout="paragraph")
    val = split_text(wrapped)[1]
    assert flowed["layout"] == "paragraph" and flowed["characters"] == len(reflow(val)) - 1
    assert flowed["bits_per_byte"] != as_is["bits_per_byte"]


def test_stride_one_predicts_every_token_from_its_full_context(tmp_path, char_tokenizer):
    """Overlapping windows against the definition: each token scored once, from the context-length
    tokens before it (fewer at the start), by a forward pass of its own."""
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=char_tokenizer.vocab_size, block_size=16)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    text = SAMPLE_TEXT[:70]
    ids = np.asarray(char_tokenizer.encode(text))
    expected = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            window = torch.tensor(ids[max(0, t - 16) : t])[None]
            expected -= F.log_softmax(model(window)[0][0, -1].double(), dim=-1)[ids[t]].item()
    nll, tokens = evaluate_ids(model, ids, stride=1)
    assert tokens == len(ids) - 1 and nll == pytest.approx(expected, rel=1e-5)
    default, _ = evaluate_ids(model, ids)
    assert evaluate_ids(model, ids, stride=16)[0] == pytest.approx(default)
    assert evaluate_ids(model, ids, stride=5)[1] == tokens and default != pytest.approx(expected, rel=1e-3)
    path = tmp_path / "t.txt"
    path.write_text(text)
    result = evaluate(model, char_tokenizer, str(path), "all", stride=1)
    assert result["stride"] == 1 and result["loss"] == pytest.approx(expected / tokens, rel=1e-5)
    assert evaluate(model, char_tokenizer, str(path), "all")["stride"] == 16
    with pytest.raises(ValueError, match="stride must be between 1 and the model's context length 16, not 17"):
        evaluate(model, char_tokenizer, str(path), "all", stride=17)


def test_adapting_scores_each_window_before_learning_from_it(char_tokenizer):
    """Dynamic evaluation against its definition, written out with torch.optim.Adam: window 1 is
    scored by the model's own weights, window 2 by the weights after one step on window 1's loss
    and the pull back toward the model's own."""
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=char_tokenizer.vocab_size, block_size=16)).eval()
    ids = np.asarray(char_tokenizer.encode(SAMPLE_TEXT[:33]))  # two windows of 16 targets
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = GPT(model.config).eval()
    reference.load_state_dict(before)
    optimizer = torch.optim.Adam(reference.parameters(), lr=5e-2)
    x = torch.tensor(ids, dtype=torch.long)
    first = F.cross_entropy(reference(x[None, :16])[0][0], x[1:17], reduction="sum")
    (first / 16).backward()
    optimizer.step()
    with torch.no_grad():
        for p, p0 in zip(reference.parameters(), (model.get_parameter(n) for n, _ in reference.named_parameters())):
            p.copy_(p + ADAPT_DECAY * (p0 - p))  # pulled back toward the model's own weights
        second = F.cross_entropy(reference(x[None, 16:32])[0][0], x[17:33], reduction="sum")
    nll, tokens = evaluate_ids(model, ids, adapt_lr=5e-2)
    assert tokens == 32 and nll == pytest.approx(first.item() + second.item(), rel=1e-5)
    plain_second = evaluate_ids(model, ids[16:])[0]
    assert abs(second.item() - plain_second) > 1e-3  # the step changed what window 2 costs
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's weights back
    assert all(p.grad is None for p in model.parameters())


def test_adapting_learns_a_repetitive_text_and_refuses_what_it_cannot_train(tmp_path, char_tokenizer):
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=char_tokenizer.vocab_size, block_size=16)).eval()
    path = tmp_path / "t.txt"
    path.write_text("First Citizen:\nSpeak, speak.\n" * 12)
    plain = evaluate(model, char_tokenizer, str(path), "all")
    adapted = evaluate(model, char_tokenizer, str(path), "all", adapt_lr=1e-2)
    strided = evaluate(model, char_tokenizer, str(path), "all", stride=8, adapt_lr=1e-2)
    assert plain["adapt_lr"] is None and adapted["adapt_lr"] == 1e-2 and adapted["tokens"] == plain["tokens"]
    assert adapted["bits_per_byte"] < 0.8 * plain["bits_per_byte"]  # it learned the refrain while reading
    assert strided["tokens"] == plain["tokens"] and strided["bits_per_byte"] < 0.8 * plain["bits_per_byte"]
    assert evaluate(model, char_tokenizer, str(path), "all") == plain  # nothing it learned stayed behind
    for lr in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="learning rate must be a positive number"):
            evaluate(model, char_tokenizer, str(path), "all", adapt_lr=lr)
    prepare_for_inference(model, "float32")
    if any(isinstance(m, PackedLinear) for m in model.modules()):  # CPUs with oneDNN
        with pytest.raises(ValueError, match="needs the model's float32 weights"):
            evaluate(model, char_tokenizer, str(path), "all", adapt_lr=1e-2)


def test_shakespeare_char_scores_exactly_as_before(shared_data, tmp_path):
    """The shipped 65-character model (no unknown token) on text it covers: the old arithmetic."""
    loaded = load_model(REPO / "models" / "shakespeare-char")
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:1500]
    path = tmp_path / "s.txt"
    path.write_text(text)
    result = evaluate(loaded.model, loaded.tokenizer, str(path), "all")
    nll, tokens = evaluate_ids(loaded.model, np.asarray(loaded.tokenizer.encode(text)))
    assert result["loss"] == nll / tokens and result["tokens"] == len(text) - 1
    assert result["bits_per_byte"] == nll / len(text[1:].encode("utf-8")) / math.log(2)
    assert result["unknown_characters"] == 0
