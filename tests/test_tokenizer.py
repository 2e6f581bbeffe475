import json

import pytest

from quillgpt.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    TextStreamer,
    TokenizerError,
    iter_text_pieces,
    tokenizer_from_spec,
)

TEXT = "Hello, wörld! — naïve café 北京 🎭\nsecond line"


def test_char_round_trip_including_non_ascii():
    tok = CharTokenizer.from_text(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.vocab_size == len(set(TEXT))
    assert tok.chars == sorted(tok.chars)


def test_char_unknown_characters_are_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError, match=r"2 character\(s\).*'x', 'z'"):
        tok.encode("abxcz")


def test_char_unknown_token_is_the_last_id_and_survives_the_spec():
    tok = CharTokenizer.from_text("abcab", unk=True)
    assert tok.vocab_size == 4 and tok.unk_id == 3
    assert tok.encode("abzé") == [0, 1, 3, 3] and tok.decode([0, 3]) == "a\ufffd"
    assert tok.unknown("abzéz") == ["z", "é"]
    again = tokenizer_from_spec(json.loads(json.dumps(tok.to_spec())))
    assert again.encode("cz") == [2, 3] and again.fingerprint() == tok.fingerprint()
    assert again.fingerprint() != CharTokenizer.from_text("abc").fingerprint()


def test_char_min_count_leaves_rare_characters_to_the_unknown_token():
    tok = CharTokenizer.from_text("aa b b!", unk=True, min_count=2)
    assert tok.chars == [" ", "a", "b"] and tok.encode("!") == [tok.unk_id]


def test_char_loads_original_quillgpt_maps():
    encode = {"\n": 0, " ": 1, "a": 2, "b": 3}
    decode = {str(v): k for k, v in encode.items()}
    tok = CharTokenizer.from_maps(encode, decode)
    assert tok.encode("ab a\n") == [2, 3, 1, 2, 0]
    with pytest.raises(TokenizerError, match="disagree"):
        CharTokenizer.from_maps(encode, {**decode, "0": "x"})
    with pytest.raises(TokenizerError, match="without gaps"):
        CharTokenizer.from_maps({"a": 0, "b": 2})


def test_char_spec_round_trip():
    tok = CharTokenizer.from_text(TEXT)
    again = tokenizer_from_spec(json.loads(json.dumps(tok.to_spec())))
    assert again.encode(TEXT) == tok.encode(TEXT)


def test_gpt2_bpe_matches_huggingface(shared_data):
    transformers = pytest.importorskip("transformers")
    vocab, merges = shared_data / "gpt2" / "vocab.json", shared_data / "gpt2" / "merges.txt"
    ours = BPETokenizer.from_gpt2_files(vocab, merges)
    reference = transformers.GPT2TokenizerFast.from_pretrained(str(shared_data / "gpt2"))  # HF's own GPT-2
    text = (
        (shared_data / "tinyshakespeare" / "input.txt").read_text()[:20000]
        + "\n"
        + TEXT
        + "  double  spaces\t\ttabs 1234"
    )
    assert ours.vocab_size == 50257 and ours.eot_id == 50256
    assert ours.encode(text) == reference(text)["input_ids"]
    assert ours.decode(ours.encode(text)) == text


def test_trained_bpe_round_trip_and_file(tmp_path):
    tok = BPETokenizer.train([TEXT * 50, "the quick brown fox " * 100], vocab_size=300)
    assert 257 <= tok.vocab_size <= 300
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    tok.tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert tokenizer_from_spec(tok.to_spec(), tmp_path).encode(TEXT) == ids


def test_streamer_never_splits_a_character():
    tok = BPETokenizer.train(["plain ascii text only"], vocab_size=260)
    ids = tok.encode("ab 🎭 北京 é")
    assert len(ids) > len("ab 🎭 北京 é")  # multi-byte characters span several byte tokens
    pieces = list(iter_text_pieces(tok, ids))
    assert "".join(pieces) == "ab 🎭 北京 é"
    assert all("\ufffd" not in p for p in pieces)
    streamer = TextStreamer(tok)
    first_byte_of_emoji = tok.encode("🎭")[0]
    assert streamer.push(first_byte_of_emoji) == ""  # held back, not a broken character


def test_bad_specs_and_files(tmp_path):
    with pytest.raises(TokenizerError, match="unknown tokenizer type"):
        tokenizer_from_spec({"type": "words"})
    with pytest.raises(TokenizerError, match="not found"):
        tokenizer_from_spec({"type": "bpe", "file": "tokenizer.json"}, tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read tokenizer file"):
        tokenizer_from_spec({"type": "bpe", "file": "tokenizer.json"}, tmp_path)


def test_bpe_is_trained_on_the_training_split_only(tmp_path):
    from quillgpt.config import TrainConfig
    from quillgpt.data import split_dataset
    from quillgpt.vocab import build_tokenizer

    train = "the cat sat on the mat and the dog sat on the log\n" * 60
    for name, val in [("a", "zyzzyva quixotic zyzzyva quixotic " * 40), ("b", "the cat sat " * 120)]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "book.txt").write_text(train + val[: len(train) // 9])
    splits = [split_dataset(tmp_path / name / "book.txt") for name in "ab"]
    assert splits[0].train == splits[1].train and splits[0].val != splits[1].val
    cfg = TrainConfig(tokenizer="bpe", bpe_vocab_size=400)
    first, second = (build_tokenizer(cfg, s) for s in splits)
    assert first.tokenizer.to_str() == second.tokenizer.to_str()  # the validation text changed no merge
    vocab = first.tokenizer.get_vocab()
    assert 257 < first.vocab_size <= 400 and not any("zy" in t or "quix" in t for t in vocab)
    alone = BPETokenizer.train([splits[0].train], 400)
    assert alone.tokenizer.to_str() == first.tokenizer.to_str()
    leaky = BPETokenizer.train([splits[0].train + splits[0].val], 400).tokenizer.get_vocab()
    assert any("zy" in t or "quix" in t for t in leaky)  # what the validation text would have added
