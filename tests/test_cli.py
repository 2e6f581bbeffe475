import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quillgpt.checkpoint import load_model
from quillgpt.cli import main
from tests.conftest import REPO, SAMPLE_TEXT


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUILL_CACHE_DIR", str(tmp_path / "cache"))


def run(*argv, capsys):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_and_is_reproducible(tiny_model_dir, capsys):
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", "All:", "--max-new-tokens", "20", "--seed", "3"]
    code, streamed, _ = run(*args, capsys=capsys)
    assert code == 0 and streamed.startswith("All:") and len(streamed) == len("All:") + 20 + 1
    assert run(*args, "--no-stream", capsys=capsys)[1] == streamed


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature", "-1"], "temperature must be in [0, 100]"),
        (["--top-p", "0"], "top_p must be in [1e-06, 1]"),
        (["--top-k", "0"], "top_k must be an integer >= 1"),
        (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
        (["--prompt", "Zed"], "not in the model's vocabulary: 'Z'"),
        (["--device", "cuda"], "CUDA is not available"),
    ],
)
def test_generate_errors_are_one_line(tiny_model_dir, capsys, extra, message):
    code, out, err = run("generate", "--model", str(tiny_model_dir), *extra, capsys=capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_model_is_one_line(capsys):
    code, _, err = run("generate", "--model", "no-such-model", capsys=capsys)
    assert code == 2 and "no model directory or bundled model named 'no-such-model'" in err


def test_info_and_init(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 16}))
    code, out, _ = run("init", "--config", str(cfg), "--out", str(tmp_path / "m"), "--chars", "abc \n", capsys=capsys)
    assert code == 0 and "randomly initialised" in out
    code, out, _ = run("info", str(tmp_path / "m"), "--json", capsys=capsys)
    info = json.loads(out)
    assert info["parameters"] == load_model(tmp_path / "m").model.num_params()
    assert info["tokenizer"] == {"type": "char", "vocab_size": 5} and info["config"]["n_embd"] == 8


def test_train_then_eval_json(tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text(SAMPLE_TEXT * 20)
    cfg = tmp_path / "c.json"
    cfg.write_text(
        json.dumps(
            {
                "batch_size": 4,
                "block_size": 16,
                "max_iters": 6,
                "eval_interval": 3,
                "eval_iters": 2,
                "n_layer": 1,
                "n_head": 2,
                "n_embd": 16,
            }
        )
    )
    code, out, err = run(
        "train", str(cfg), "--data", str(data), "--out", str(tmp_path / "run"), "--set", "max_iters=4", capsys=capsys
    )
    assert code == 0 and "done: 4 steps" in out and "tokens/s" in out
    code, out, _ = run("eval", str(tmp_path / "run"), "--data", str(data), "--json", capsys=capsys)
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and {"val_loss", "bits_per_char", "tokens"} <= set(result)
    assert result["tokens"] == len(SAMPLE_TEXT * 20) - int(len(SAMPLE_TEXT * 20) * 0.9) - 1
    code, _, err = run("train", str(cfg), "--data", str(data), "--out", str(tmp_path / "run"), capsys=capsys)
    assert code == 2 and "already holds a run" in err
    code, _, err = run("train", str(cfg), "--set", "lerning_rate=1", capsys=capsys)
    assert code == 2 and "did you mean 'learning_rate'" in err


def test_data_list(capsys):
    code, out, _ = run("data", "list", capsys=capsys)
    assert code == 0 and "tinyshakespeare" in out and "86c4e6aa9db7" in out


def test_data_get_from_local_copy(shared_data, capsys):
    code, out, _ = run("data", "get", "tinyshakespeare", "--from", str(shared_data), capsys=capsys)
    assert code == 0 and "ready in" in out
    code, _, err = run("data", "get", "tinyshakespeare", "--from", "/nonexistent", capsys=capsys)
    assert code == 2 and "does not exist" in err


def script(name, *args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_original_scripts_keep_working(tmp_path, char_tokenizer, tiny_model):
    """scripts/train_gpt.py and scripts/inference_gpt.py with the original QuillGPT's flags."""
    data = tmp_path / "t.txt"
    data.write_text(SAMPLE_TEXT * 20)
    original = {
        "vocab_size": char_tokenizer.vocab_size,
        "batch_size": 4,
        "block_size": 32,
        "max_iters": 3,
        "eval_interval": 3,
        "learning_rate": 1e-3,
        "eval_iters": 1,
        "n_embd": 16,
        "n_head": 2,
        "n_layer": 2,
        "dropout": 0.0,
        "encode": char_tokenizer.stoi,
        "decode": {str(i): c for i, c in enumerate(char_tokenizer.chars)},
    }
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(original))
    done = script(
        "train_gpt.py",
        "--config_path",
        str(cfg),
        "--data_path",
        str(data),
        "--output_dir",
        str(tmp_path / "out"),
        "--name",
        "mine",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert load_model(tmp_path / "out" / "mine").tokenizer.chars == char_tokenizer.chars

    torch.save(tiny_model.state_dict(), tmp_path / "weights.pt")  # a legacy .pt state dict
    done = script(
        "inference_gpt.py",
        "--config_path",
        str(cfg),
        "--weights_path",
        str(tmp_path / "weights.pt"),
        "--max_length",
        "15",
        "--prompt",
        "All:",
        "--temperature",
        "0.8",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("All:") and len(done.stdout) == len("All:") + 15 + 1
    model_dir = tmp_path / "out" / "mine"
    done = script(
        "inference_gpt.py",
        "--config_path",
        str(model_dir / "config.json"),
        "--weights_path",
        str(model_dir / "model.safetensors"),
        "--max_length",
        "5",
        "--prompt",
        "Al",
        cwd=tmp_path,
    )
    assert done.returncode == 0 and done.stdout.startswith("Al")
    done = script(
        "inference_gpt.py", "--config_path", str(cfg), "--weights_path", str(tmp_path / "nope.pt"), cwd=tmp_path
    )
    assert done.returncode == 2 and "weights file not found" in done.stderr and "Traceback" not in done.stderr


def test_console_script_is_installed():
    done = subprocess.run([str(Path(sys.executable).parent / "quill"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "generate" in done.stdout and "train" in done.stdout


def test_eval_takes_the_models_own_per_file_split_and_layout(tmp_path, capsys):
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text(SAMPLE_TEXT * 12)
    (books / "b.txt").write_text(SAMPLE_TEXT[::-1] * 12)
    cfg = tmp_path / "c.json"
    cfg.write_text(
        json.dumps(
            {"batch_size": 4, "block_size": 16, "max_iters": 2, "eval_interval": 2, "eval_iters": 1}
            | {"n_layer": 1, "n_head": 2, "n_embd": 16, "val_split": "per_file", "reflow_fraction": 0.5}
        )
    )
    code, _, _ = run("train", str(cfg), "--data", str(books), "--out", str(tmp_path / "run"), capsys=capsys)
    assert code == 0
    prov = load_model(tmp_path / "run").provenance
    assert prov["val_split"] == "per_file" and "of each of 2 files" in prov["split"]
    code, out, _ = run("eval", str(tmp_path / "run"), "--data", str(books), "--json", capsys=capsys)
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["val_split"] == "per_file" and list(result["files"]) == ["a.txt", "b.txt"]
    assert round(result["bits_per_byte"], 4) == prov["val_bits_per_byte"] and "a.txt: " in out
    code, out, _ = run(
        "eval", str(tmp_path / "run"), "--data", str(books), "--val-split", "concat", "--json", capsys=capsys
    )
    assert "files" not in json.loads(out.strip().splitlines()[-1])
    code, out, _ = run("eval", str(tmp_path / "run"), "--data", str(books), "--layout", "paragraph", capsys=capsys)
    assert code == 0 and "paragraph layout" in out
    code, out, _ = run("eval", str(tmp_path / "run"), "--data", str(books), "--stride", "4", "--json", capsys=capsys)
    strided = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and "stride 4" in out and strided["stride"] == 4 and strided["tokens"] == result["tokens"]
    code, _, err = run("eval", str(tmp_path / "run"), "--data", str(books), "--stride", "17", capsys=capsys)
    assert code != 0 and "--stride must be between 1 and the model's context length 16, not 17" in err
    code, out, _ = run("eval", str(tmp_path / "run"), "--data", str(books), "--adapt", "--json", capsys=capsys)
    adapted = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and "adapting as it reads with lr 0.0005" in out and adapted["adapt_lr"] == 5e-4
    assert adapted["tokens"] == result["tokens"] and result["adapt_lr"] is None
    for flags, message in [
        (["--adapt", "0"], "--adapt's learning rate must be a positive number, not 0.0"),
        (
            ["--adapt", "--weights", "int8"],
            "--adapt trains the model's float32 weights; it cannot run with --weights int8",
        ),
    ]:
        code, _, err = run("eval", str(tmp_path / "run"), "--data", str(books), *flags, capsys=capsys)
        assert code == 2 and message in err
