"""The original QuillGPT's `GPTLanguageModel`, written here from its description, imports exactly."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quillgpt.checkpoint import CheckpointError, load_from_train_config, load_model
from quillgpt.cli import main
from quillgpt.model import GPT
from quillgpt.original import convert_state_dict, original_config
from tests.conftest import REPO, SAMPLE_TEXT


class Head(nn.Module):
    def __init__(self, n_embd, head_size, block_size):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))

    def forward(self, x):
        T = x.shape[1]
        k, q = self.key(x), self.query(x)
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5
        wei = F.softmax(wei.masked_fill(self.tril[:T, :T] == 0, float("-inf")), dim=-1)
        return wei @ self.value(x)


class MultiHeadAttention(nn.Module):
    def __init__(self, n_embd, n_head, block_size):
        super().__init__()
        head_size = n_embd // n_head
        self.heads = nn.ModuleList([Head(n_embd, head_size, block_size) for _ in range(n_head)])
        self.proj = nn.Linear(head_size * n_head, n_embd)

    def forward(self, x):
        return self.proj(torch.cat([h(x) for h in self.heads], dim=-1))


class FeedForward(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        return self.net(x)


class OriginalBlock(nn.Module):
    def __init__(self, n_embd, n_head, block_size):
        super().__init__()
        self.sa = MultiHeadAttention(n_embd, n_head, block_size)
        self.ffwd = FeedForward(n_embd)
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class GPTLanguageModel(nn.Module):
    def __init__(self, vocab_size, n_embd, n_head, n_layer, block_size):
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, n_embd)
        self.position_embedding_table = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*[OriginalBlock(n_embd, n_head, block_size) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size)

    def forward(self, idx):
        x = self.token_embedding_table(idx) + self.position_embedding_table(torch.arange(idx.shape[1]))
        return self.lm_head(self.ln_f(self.blocks(x)))


# the original books vocabulary had non-ASCII characters and a byte-order mark
CHARS = sorted(set(SAMPLE_TEXT) | set("éæ—\ufeff"))


def write_original(tmp_path, n_embd=100, n_head=12, n_layer=2, block_size=32):
    torch.manual_seed(0)
    model = GPTLanguageModel(len(CHARS), n_embd, n_head, n_layer, block_size).eval()
    with torch.no_grad():  # LayerNorms away from their identity init, so a wrong mapping shows
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    config = {
        "batch_size": 64,
        "block_size": block_size,
        "max_iters": 5000,
        "eval_interval": 500,
        "learning_rate": 3e-4,
        "eval_iters": 200,
        "n_embd": n_embd,
        "n_head": n_head,
        "n_layer": n_layer,
        "dropout": 0.2,
        "vocab_size": len(CHARS),
        "encode": {c: i for i, c in enumerate(CHARS)},
        "decode": {str(i): c for i, c in enumerate(CHARS)},
    }
    (tmp_path / "config").mkdir()
    config_path = tmp_path / "config" / "shakespearean_config.json"
    config_path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    weights = tmp_path / "GPT_model_char.pt"
    torch.save(model.state_dict(), weights)
    return model, config_path, weights


def ids(text):
    return torch.tensor([[CHARS.index(c) for c in text]])


def test_import_matches_the_original_logits_with_non_dividing_heads(tmp_path):
    original, config_path, weights = write_original(tmp_path)  # n_embd 100, 12 heads of 8: concat 96
    assert original.blocks[0].sa.proj.in_features == 96
    assert main(["import", "quillgpt-v1", str(config_path), str(weights), "--out", str(tmp_path / "m")]) == 0
    loaded = load_model(tmp_path / "m")
    x = ids("First Citizen:\néæ—\ufeffAll:")
    torch.testing.assert_close(loaded.model(x)[0], original(x), atol=1e-4, rtol=0)
    assert loaded.tokenizer.chars == CHARS
    assert loaded.model.config.head_size == 8 and loaded.model.num_params() == sum(
        p.numel() for p in original.parameters()
    )
    assert loaded.provenance["imported_from"] == "quillgpt-v1"


def test_the_226m_harpoon_geometry_counts_226_922_631_parameters():
    with torch.device("meta"):
        original = GPTLanguageModel(vocab_size=135, n_embd=1024, n_head=12, n_layer=18, block_size=256)
        state = original.state_dict()
        config = original_config(state)
        ours = GPT(config)
    assert (config.head_dim, config.n_head * config.head_dim) == (85, 1020)
    assert sum(p.numel() for p in original.parameters()) == 226_922_631
    assert ours.num_params() == 226_922_631
    converted = convert_state_dict(state, config)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_original_files_load_directly_everywhere(tmp_path, capsys):
    original, config_path, weights = write_original(tmp_path, n_embd=24, n_head=3, block_size=64)
    loaded = load_from_train_config(config_path, weights)
    x = ids("Before we proceed")
    torch.testing.assert_close(loaded.model(x)[0], original(x), atol=1e-4, rtol=0)

    greedy = [str(weights), "--prompt", "All:", "--max-new-tokens", "12", "--temperature", "0"]
    with pytest.raises(CheckpointError, match="put its config JSON"):
        load_model(weights)  # the config lives in config/, not beside the weights
    (tmp_path / "GPT_model_char.json").write_text(config_path.read_text(encoding="utf-8"), encoding="utf-8")
    assert main(["generate", "--model", *greedy, "--no-stream"]) == 0
    via_cli = capsys.readouterr().out
    expected = "All:"
    for _ in range(12):  # greedy decoding with the original model itself
        expected += CHARS[int(original(ids(expected))[0, -1].argmax())]
    assert via_cli == expected + "\n"

    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "inference_gpt.py"), "--config_path", str(config_path)]
        + ["--weights_path", str(weights), "--max_length", "12", "--prompt", "All:", "--temperature", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"


def test_train_init_from_original_weights(tmp_path):
    _, _, weights = write_original(tmp_path, n_embd=24, n_head=3, block_size=16)
    (tmp_path / "GPT_model_char.json").write_text(
        (tmp_path / "config" / "shakespearean_config.json").read_text(encoding="utf-8"), encoding="utf-8"
    )
    data = tmp_path / "t.txt"
    data.write_text(SAMPLE_TEXT * 10, encoding="utf-8")
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"max_iters": 2, "eval_interval": 2, "eval_iters": 1, "batch_size": 2, "block_size": 16}))
    out = tmp_path / "run"
    args = ["train", str(cfg), "--data", str(data), "--out", str(out), "--init-from", str(weights)]
    assert main(args) == 0
    tuned = load_model(out)
    assert tuned.model.config.lm_head_bias and tuned.model.config.qkv_bias is False
    assert tuned.tokenizer.chars == CHARS


def test_config_that_disagrees_with_the_weights_is_named(tmp_path):
    _, config_path, weights = write_original(tmp_path, n_embd=24, n_head=3)
    data = json.loads(config_path.read_text(encoding="utf-8"))
    data["n_layer"] = 5
    config_path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError, match="says n_layer=5 but the weights have 2"):
        load_from_train_config(config_path, weights)
