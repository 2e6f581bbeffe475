"""A pickle that would run code is refused by every import path, and runs nothing."""

import json
import pickle

import pytest
import torch

from quillgpt.cli import main
from tests.conftest import SAMPLE_TEXT


class CreatesAFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def evil(tmp_path):
    """(a torch file and a plain pickle that would create `marker`, a good config, a good meta.pkl, marker)."""
    marker = tmp_path / "pwned"
    (tmp_path / "hf").mkdir()
    for path in (tmp_path / "evil.pt", tmp_path / "hf" / "pytorch_model.bin"):
        torch.save({"model": {"w": CreatesAFile(marker)}}, path)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"stoi": CreatesAFile(marker)}))
    chars = sorted(set(SAMPLE_TEXT))
    config = {"n_embd": 16, "n_head": 2, "n_layer": 1, "block_size": 16, "encode": {c: i for i, c in enumerate(chars)}}
    (tmp_path / "evil.json").write_text(json.dumps(config))
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "vocab_size": 40, "n_positions": 16, "n_embd": 16, "n_layer": 1, "n_head": 2})
    )
    torch.save(
        {"model_args": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16}, "model": {}}, tmp_path / "ckpt.pt"
    )
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"stoi": {c: i for i, c in enumerate(chars)}}))
    (tmp_path / "train.json").write_text(json.dumps({"max_iters": 1, "block_size": 16}))
    (tmp_path / "t.txt").write_text(SAMPLE_TEXT * 5)
    return tmp_path, marker


def test_every_import_path_refuses_the_pickle_and_runs_nothing(evil, capsys):
    d, marker = evil
    out = ["--out", str(d / "m")]
    commands = {
        "evil.pt": [
            ["import", "quillgpt-v1", str(d / "evil.json"), str(d / "evil.pt"), *out],
            ["import", "nanogpt", str(d / "evil.pt"), str(d / "meta.pkl"), *out],
            ["generate", "--model", str(d / "evil.pt"), "--max-new-tokens", "2"],  # config beside it: evil.json
            [
                "train",
                str(d / "train.json"),
                "--data",
                str(d / "t.txt"),
                "--out",
                str(d / "run"),
                "--init-from",
                str(d / "evil.pt"),
            ],
        ],
        "evil.pkl": [["import", "nanogpt", str(d / "ckpt.pt"), str(d / "evil.pkl"), *out]],
        "pytorch_model.bin": [["import", "hf-gpt2", str(d / "hf"), *out]],
    }
    for name, runs in commands.items():
        for argv in runs:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "refusing to " in err and name in err, (argv, err)
            assert not marker.exists(), argv
    assert not (d / "m").exists()


def test_inference_script_path_refuses_it(evil):
    from quillgpt.checkpoint import CheckpointError, load_from_train_config

    d, marker = evil
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil.pt: it needs arbitrary unpickling"):
        load_from_train_config(d / "evil.json", d / "evil.pt")
    assert not marker.exists()
