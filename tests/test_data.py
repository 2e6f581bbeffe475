import hashlib
import warnings

import numpy as np
import pytest
import torch

from quillgpt.data import (
    REGISTRY,
    DataError,
    get_batch,
    get_dataset,
    load_text,
    read_text,
    resolve_data,
    sequential_windows,
    split_dataset,
    split_text,
    tokenize_splits,
)
from quillgpt.tokenizer import CharTokenizer


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUILL_CACHE_DIR", str(tmp_path / "cache"))


def test_latin1_file_is_decoded_with_a_warning_naming_it(shared_data):
    path = shared_data / "gutenberg" / "shakespeare-caesar.txt"
    with pytest.warns(UserWarning, match="shakespeare-caesar.txt is not valid UTF-8"):
        text = read_text(path)
    assert "Caesar" in text and "\ufffd" not in text


def test_crlf_is_normalised(shared_data):
    path = shared_data / "gutenberg" / "melville-moby_dick.txt"
    assert b"\r\n" in path.read_bytes()[:2000]
    text = read_text(path)
    assert "\r" not in text and "Call me Ishmael" in text


def test_standard_split_is_first_90_percent(shared_data):
    text = load_text(shared_data / "tinyshakespeare" / "input.txt")
    train, val = split_text(text)
    assert len(text) == 1115394 and len(train) == 1003854 and train + val == text


def test_registry_takes_a_local_copy_and_verifies_it(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("QUILL_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="run `quill data get tinyshakespeare`"):
        get_dataset("tinyshakespeare", download=False)
    folder = get_dataset("tinyshakespeare", source=shared_data)
    cached = folder / "input.txt"
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == REGISTRY["tinyshakespeare"].files[0].sha256
    assert get_dataset("tinyshakespeare", download=False) == folder  # now served from the cache
    bad = tmp_path / "bad" / "tinyshakespeare"
    bad.mkdir(parents=True)
    (bad / "input.txt").write_text("not shakespeare")
    with pytest.raises(DataError, match="does not match the registered sha256"):
        get_dataset("tinyshakespeare", source=tmp_path / "bad")
    with pytest.raises(DataError, match="unknown dataset 'shakespear'"):
        get_dataset("shakespear")


def test_names_resolve_through_the_data_dir(shared_data, monkeypatch):
    monkeypatch.setenv("QUILL_DATA_DIR", str(shared_data))
    files = resolve_data("gutenberg")
    assert len(files) == 13
    with pytest.warns(UserWarning, match="caesar"):
        text = load_text("gutenberg")
    assert "Ishmael" in text and "Hamlet" in text


def test_folders_and_bad_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b.txt").write_text("beta\n")
    (tmp_path / "skip.md").write_text("not text")
    assert load_text(tmp_path) == "alpha\n\nbeta"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt files"):
        load_text(tmp_path / "empty")
    (tmp_path / "empty" / "blank.txt").write_text("\n\n")
    with pytest.raises(DataError, match="is empty"):
        load_text(tmp_path / "empty")
    with pytest.raises(DataError, match="data not found"):
        load_text(tmp_path / "nowhere.txt")


def test_tokens_are_cached_by_content(tmp_path):
    text = "hello world, " * 200
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text(text + "!")
    tok = CharTokenizer.from_text(text)
    first = tokenize_splits(split_dataset(tmp_path / "a.txt"), tok)
    assert isinstance(first.train, np.memmap) and first.train.dtype == np.uint16
    assert tok.decode(first.train.tolist()) + tok.decode(first.val.tolist()) == text
    mtime = (tmp_path / "cache").stat().st_mtime_ns
    files = sorted((tmp_path / "cache" / "tokens").rglob("*.bin"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = tokenize_splits(split_dataset(tmp_path / "a.txt"), tok)
    assert [f.stat().st_mtime_ns for f in files] == stamps and np.array_equal(again.val, first.val)
    other = tokenize_splits(split_dataset(tmp_path / "b.txt"), CharTokenizer.from_text(text + "!"))
    assert (
        len(list((tmp_path / "cache" / "tokens").iterdir())) == 2 and mtime and other.data_sha256 != first.data_sha256
    )


def test_batches_are_shifted_windows():
    data = np.arange(100, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(data, 4, 8, g)
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    full = get_batch(data, 4, 8, torch.Generator().manual_seed(0))[0]
    half = get_batch(data, 4, 8, torch.Generator().manual_seed(0), rows=slice(2, 4))[0]
    assert torch.equal(full[2:], half)
    with pytest.raises(DataError, match="cannot fill one window"):
        get_batch(data[:8], 1, 8, g)


@pytest.mark.parametrize("stride", [None, 8, 5, 1])
@pytest.mark.parametrize("length", [8, 9, 50])
def test_sequential_windows_score_every_token_once(stride, length):
    data = np.arange(length, dtype=np.uint16)  # each token is its own position
    targets = []
    for x, y in sequential_windows(data, block_size=8, batch_size=3, stride=stride):
        assert x.shape[1] <= 8
        for row_x, row_y in zip(x, y):
            for j in (row_y >= 0).nonzero().flatten().tolist():
                assert row_y[j] == row_x[j] + 1  # the next token
                if row_x[0] > 0:  # past the first window: at least 8 - stride tokens before the target
                    assert j >= 8 - (stride or 8)
                targets.append(int(row_y[j]))
    assert targets == list(range(1, length))
    assert list(sequential_windows(data[:1], block_size=8, batch_size=3, stride=stride)) == []  # nothing to predict
    with pytest.raises(ValueError, match="stride must be between 1 and the context length 8, not 9"):
        next(sequential_windows(data, block_size=8, batch_size=3, stride=9))


def test_download_verifies_the_checksum(tmp_path, monkeypatch):
    """The download path, hermetically: a file:// URL stands in for the public one."""
    from quillgpt import data

    source = tmp_path / "remote.txt"
    source.write_text("To be, or not to be\n" * 50)
    good = hashlib.sha256(source.read_bytes()).hexdigest()
    entry = data.Dataset(
        "poem", "a test poem", "public domain", (data.DataFile("poem/poem.txt", good, source.as_uri()),)
    )
    monkeypatch.setitem(data.REGISTRY, "poem", entry)
    monkeypatch.setenv("QUILL_DATA_DIR", str(tmp_path / "nowhere"))
    folder = get_dataset("poem", quiet=True)
    assert (folder / "poem.txt").read_bytes() == source.read_bytes()
    assert load_text("poem").startswith("To be, or not to be")

    bad = data.Dataset("bad", "tampered", "none", (data.DataFile("bad/x.txt", "0" * 64, source.as_uri()),))
    monkeypatch.setitem(data.REGISTRY, "bad", bad)
    with pytest.raises(DataError, match="does not match its registered sha256"):
        get_dataset("bad", quiet=True)
    assert not (tmp_path / "cache" / "datasets" / "bad" / "x.txt").exists()
    gone = data.Dataset("gone", "missing", "none", (data.DataFile("gone/x.txt", good, (tmp_path / "no").as_uri()),))
    monkeypatch.setitem(data.REGISTRY, "gone", gone)
    with pytest.raises(DataError, match="cannot download .* use --from"):
        get_dataset("gone", quiet=True)


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"
BAD_DATA = {
    # name: (what is at the path, words of the one-line error)
    "empty": (b"", "is empty"),
    "png": (PNG * 50, "a PNG image"),
    "nul bytes": (("Speak, speak. " * 40 + "\x00").encode(), "NUL bytes"),
    "utf-16": (("Speak, speak. " * 40).encode("utf-16"), "UTF-16"),
    "no .txt in the folder": ({"notes.md": b"Speak."}, "no .txt files"),
    "shorter than the context": (b"Speak.", "too short"),
    "missing": (None, "not found"),
}


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_one_clear_line(tmp_path, capsys, tiny_model_dir, command, case):
    from quillgpt.cli import main

    content, words = BAD_DATA[case]
    path = tmp_path / "data.txt"
    if isinstance(content, dict):
        path.mkdir()
        for name, data in content.items():
            (path / name).write_bytes(data)
    elif content is not None:
        path.write_bytes(content)
    out = tmp_path / "run"
    if command == "train":
        config = tmp_path / "tiny.json"
        config.write_text('{"n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 16, "max_iters": 2}')
        args = ["train", str(config), "--data", str(path), "--out", str(out)]
    else:
        args = ["eval", str(tiny_model_dir), "--data", str(path)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would be a second line
        code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"quill {command}: error: ") and words in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()  # nothing half-written
