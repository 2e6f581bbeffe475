import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from quillgpt.checkpoint import load_model, save_model
from quillgpt.config import load_train_config, train_config_from_dict
from quillgpt.device import autocast_context
from quillgpt.generate import generate
from quillgpt.model import GPT
from quillgpt.optim import lr_factor
from quillgpt.rundir import read_metrics
from quillgpt.sampling import SamplingParams
from quillgpt.tokenizer import CharTokenizer
from quillgpt.train import TrainError, train
from tests.conftest import REPO, SAMPLE_TEXT, tiny_config

TINY = dict(
    batch_size=8,
    block_size=16,
    n_layer=2,
    n_head=2,
    n_embd=32,
    eval_iters=2,
    learning_rate=3e-3,
    warmup_iters=2,
    dropout=0.1,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUILL_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(SAMPLE_TEXT * 30)
    return path


def config(**kw):
    return train_config_from_dict({**TINY, **kw})


def test_tiny_model_overfits_small_text(text_file, tmp_path):
    s = train(
        config(max_iters=150, eval_interval=50, dropout=0.0, learning_rate=1e-2, n_embd=48),
        tmp_path / "run",
        data=text_file,
        progress=False,
    )
    assert s.steps == 150 and s.tokens == 150 * 8 * 16
    assert s.last_train_loss < 0.8 and s.best_val_loss < 0.8  # from ln(27) = 3.3 at the start
    loaded = load_model(tmp_path / "run")
    assert loaded.provenance["val_loss"] == round(s.best_val_loss, 4)
    assert loaded.provenance["val_loss_full_split"] == round(s.full_val_loss, 4) and s.full_val_loss < 0.8
    assert {"metrics.jsonl", "loss.png", "train_config.json", "last"} <= {p.name for p in (tmp_path / "run").iterdir()}
    metrics = read_metrics(tmp_path / "run")
    steps, evals = metrics.steps, metrics.evals
    assert len(steps) == 150 and [e["step"] for e in evals] == [50, 100, 150]
    assert metrics.final["step"] == 150 and metrics.final_val_loss == s.full_val_loss


def test_muon_trains_too(text_file, tmp_path):
    cfg = config(
        max_iters=60,
        eval_interval=60,
        optimizer="muon",
        pos_emb="rope",
        norm="rmsnorm",
        norm_affine=False,
        qk_norm=True,
        activation="relu2",
        zero_init_proj=True,
        tie_embeddings=False,
        logit_softcap=15.0,
        lr_schedule="trapezoid",
    )
    s = train(cfg, tmp_path / "run", data=text_file, progress=False)
    assert s.best_val_loss < 2.0


def test_bfloat16_autocast_trains_with_float32_weights(text_file, tmp_path):
    """bfloat16 runs the matmuls in lower precision: the losses move a little away from float32's
    but follow them, and the weights and the saved model stay float32."""
    losses = {"float32": [], "bfloat16": []}
    for dtype, seen in losses.items():
        cfg = config(max_iters=40, eval_interval=40, dropout=0.0, dtype=dtype, final_eval=False)
        train(
            cfg,
            tmp_path / dtype,
            data=text_file,
            progress=False,
            on_step=lambda step, loss, seen=seen: seen.append(loss),
        )
    losses = {dtype: torch.tensor(seen) for dtype, seen in losses.items()}
    assert not torch.equal(losses["float32"], losses["bfloat16"])  # autocast really ran in bfloat16
    torch.testing.assert_close(losses["bfloat16"], losses["float32"], rtol=0, atol=0.05)
    assert losses["bfloat16"][-5:].mean() < losses["bfloat16"][:5].mean() - 0.5
    saved = load_model(tmp_path / "bfloat16").model
    assert all(p.dtype == torch.float32 for p in saved.parameters())


def test_autocast_context_picks_the_matmul_precision():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    cpu = torch.device("cpu")
    with autocast_context("bfloat16", cpu):
        assert layer(x).dtype == torch.bfloat16
    for dtype in ("float32", "auto"):  # auto is bfloat16 on CUDA only
        with autocast_context(dtype, cpu):
            assert layer(x).dtype == torch.float32


@pytest.mark.parametrize(
    "extra",
    [{}, {"ema_decay": 0.9, "ema_start": 0.3}, {"save_dtype": "bfloat16"}, {"save_dtype": "int8"}],
    ids=["plain", "ema", "best-stored-in-bfloat16", "best-stored-in-int8"],
)
def test_resume_continues_exactly(text_file, tmp_path, extra):
    cfg = config(max_iters=30, eval_interval=10, **extra)
    train(cfg, tmp_path / "straight", data=text_file, progress=False)

    stop = threading.Event()
    first = train(
        cfg,
        tmp_path / "split",
        data=text_file,
        progress=False,
        stop=stop,
        on_step=lambda step, loss: stop.set() if step == 15 else None,
    )
    assert first.interrupted and first.steps == 15
    second = train(cfg, tmp_path / "split", data=text_file, progress=False, resume=True)
    assert second.steps == 30 and not second.interrupted
    a, b = read_metrics(tmp_path / "straight").steps, read_metrics(tmp_path / "split").steps
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    for sub in ("last", "."):  # the latest weights, and the best (the average once it runs, with EMA)
        wa = load_model(tmp_path / "straight" / sub).model.state_dict()
        wb = load_model(tmp_path / "split" / sub).model.state_dict()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    stored = {sub: safe_open(tmp_path / "split" / sub / "model.safetensors", "pt") for sub in ("last", ".")}
    best = {stored["."].get_slice(k).get_dtype() for k in stored["."].keys()}
    assert {stored["last"].get_slice(k).get_dtype() for k in stored["last"].keys()} == {"F32"}  # resume: exact
    assert best == {"bfloat16": {"BF16"}, "int8": {"I8", "F32"}}.get(extra.get("save_dtype"), {"F32"})


def test_ema_is_the_moving_average_of_the_weights(text_file, tmp_path):
    """At a constant LR a run of k steps is the first k steps of a longer one, so the average can be
    rebuilt from the latest weights W_k of shorter runs. Starting at half of 4 steps, it is W_3, then
    d * W_3 + (1 - d) * W_4."""
    same = dict(lr_schedule="constant", warmup_iters=0, dropout=0.0, final_eval=False)
    weights = {}
    for k in (3, 4):
        train(config(max_iters=k, eval_interval=k, **same), tmp_path / f"w{k}", data=text_file, progress=False)
        weights[k] = load_model(tmp_path / f"w{k}" / "last").model.state_dict()
    d = 0.75
    cfg = config(max_iters=4, eval_interval=4, ema_decay=d, ema_start=0.5, **same)
    train(cfg, tmp_path / "ema", data=text_file, progress=False)
    raw = load_model(tmp_path / "ema" / "last")
    averaged = load_model(tmp_path / "ema")
    assert averaged.provenance["ema_decay"] == d and "ema_decay" not in raw.provenance
    for name, w in averaged.model.state_dict().items():
        assert torch.equal(raw.model.state_dict()[name], weights[4][name])
        expected = d * weights[3][name] + (1 - d) * weights[4][name]
        torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(averaged.model.state_dict()[n], weights[4][n]) for n in weights[4])


def test_output_dir_holding_a_run_is_refused(text_file, tmp_path):
    train(config(max_iters=4, eval_interval=4), tmp_path / "run", data=text_file, progress=False)
    with pytest.raises(TrainError, match="already holds a run; use --resume .* or --overwrite"):
        train(config(max_iters=4, eval_interval=4), tmp_path / "run", data=text_file, progress=False)
    s = train(config(max_iters=2, eval_interval=2), tmp_path / "run", data=text_file, progress=False, overwrite=True)
    assert s.steps == 2 and len(read_metrics(tmp_path / "run").steps) == 2
    with pytest.raises(TrainError, match="different model shape \\(n_embd\\)"):
        train(config(max_iters=4, n_embd=64), tmp_path / "run", data=text_file, progress=False, resume=True)
    with pytest.raises(TrainError, match="nothing to resume"):
        train(config(), tmp_path / "fresh", data=text_file, progress=False, resume=True)


@pytest.mark.parametrize(
    "content, kw, message",
    [
        (None, {}, "data not found"),
        ("", {}, "is empty"),
        ("abc", {}, "too short for block_size"),
        ("x" * 170, {}, "validation split has 17 tokens: too short"),
        ("hello there " * 50, {"vocab_size": 65}, "vocab_size is 65 but the tokenizer has"),
    ],
)
def test_bad_data_is_refused_before_training(tmp_path, content, kw, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TrainError, match=message):
        train(config(**kw), tmp_path / "out", data=path, progress=False)
    assert not (tmp_path / "out").exists()


def test_output_path_that_is_a_file(text_file, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainError, match="not a directory"):
        train(config(), tmp_path / "file", data=text_file, progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(text_file, tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(TrainError, match="not writable"):
        train(config(), tmp_path / "ro" / "out", data=text_file, progress=False)


def _char_base(directory: Path, unk: bool = False) -> CharTokenizer:
    tok = CharTokenizer.from_text(SAMPLE_TEXT, unk=unk)
    torch.manual_seed(0)
    save_model(directory, GPT(tiny_config(vocab_size=tok.vocab_size, n_embd=32)), tok)
    return tok


def test_fine_tuning_reuses_the_tokenizer_and_names_unseen_characters(text_file, tmp_path):
    tok = _char_base(tmp_path / "base")
    s = train(config(max_iters=5, eval_interval=5), tmp_path / "ft", data=text_file, init_from=tmp_path / "base")
    assert s.steps == 5 and load_model(tmp_path / "ft").tokenizer.chars == tok.chars
    other = tmp_path / "other.txt"
    other.write_text(SAMPLE_TEXT * 10 + "Zounds! #42")
    with pytest.raises(TrainError, match="no unknown token\\): '!', '#', '2', '4', 'Z'"):
        train(config(), tmp_path / "ft2", data=other, init_from=tmp_path / "base", progress=False)


def test_fine_tuning_a_vocabulary_with_an_unknown_token_maps_new_characters_to_it(tmp_path):
    tok = _char_base(tmp_path / "base", unk=True)
    other = tmp_path / "other.txt"
    other.write_text(SAMPLE_TEXT * 10 + "Zounds! #42 — café")
    new = "'!', '#', '2', '4', 'Z', 'é', '—'"
    with pytest.warns(UserWarning, match=f"7 character\\(s\\) outside .* unknown token: {new}"):
        s = train(config(max_iters=3, eval_interval=3), tmp_path / "ft", data=other, init_from=tmp_path / "base")
    tuned = load_model(tmp_path / "ft")
    assert s.steps == 3 and tuned.tokenizer.chars == tok.chars and tuned.tokenizer.unk_id == tok.unk_id
    ids = tuned.tokenizer.encode("café")
    assert ids[-1] == tok.unk_id and tuned.tokenizer.decode(ids) == "caf\ufffd"


def test_schedules():
    cfg = config(warmup_iters=10, learning_rate=1.0, min_lr=0.1)
    assert lr_factor(cfg, 0, 0.0) == pytest.approx(1 / 11)
    assert lr_factor(cfg, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 500, 1.0) == pytest.approx(0.1)
    assert lr_factor(cfg, 500, 0.5) == pytest.approx(0.55)
    trap = config(lr_schedule="trapezoid", decay_frac=0.4, learning_rate=1.0, min_lr=0.0)
    assert lr_factor(trap, 100, 0.5) == 1.0 and lr_factor(trap, 100, 0.8) == pytest.approx(0.5)


DDP_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
import torch.distributed as dist
from quillgpt.config import load_train_config, train_config_from_dict
from quillgpt.generate import generate
from quillgpt.sampling import SamplingParams
from quillgpt.train import train
import quillgpt.trainstate as t

cfg = train_config_from_dict({cfg!r})
captured = {{}}
real_destroy = dist.destroy_process_group
def keep_params():
    captured["params"] = [p.detach().clone() for p in t._last_model.parameters()]
    real_destroy()
dist.destroy_process_group = keep_params
orig_build = t.build_optimizers
def build(model, c):
    t._last_model = model
    return orig_build(model, c)
t.build_optimizers = build
train(cfg, sys.argv[1], data=sys.argv[2], progress=False)
torch.save(captured["params"], sys.argv[1] + f"-rank{{int(__import__('os').environ['RANK'])}}.pt")
"""


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(text_file, tmp_path):
    per_rank = {**TINY, "batch_size": 4, "max_iters": 12, "eval_interval": 12, "dropout": 0.0}
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(cfg=per_rank))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(tmp_path / "ddp"),
        str(text_file),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"ddp-rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(r0, r1))  # replicas never drift apart

    single = train(config(**{**per_rank, "batch_size": 8}), tmp_path / "single", data=text_file, progress=False)
    ddp_steps, one_steps = read_metrics(tmp_path / "ddp").steps, read_metrics(tmp_path / "single").steps
    # Same global batches; only the order of float additions differs (gradients averaged across ranks).
    for a, b in zip(ddp_steps, one_steps):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-3)
    assert single.steps == len(ddp_steps) == 12
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["provenance"]["steps"] == 12


def test_sigterm_saves_a_checkpoint_and_resume_finishes(text_file, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**TINY, "max_iters": 100000, "eval_interval": 100000}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "quillgpt.cli",
        "train",
        str(cfg),
        "--data",
        str(text_file),
        "--out",
        str(tmp_path / "run"),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 5) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; resume with --resume" in out
    steps = json.loads((tmp_path / "run" / "last" / "config.json").read_text())["provenance"]["steps"]
    assert steps >= 5 and len(read_metrics(tmp_path / "run").steps) == steps
    cfg.write_text(json.dumps({**TINY, "max_iters": steps + 3, "eval_interval": 100000}))
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"done: {steps + 3} steps" in done.stdout


def test_the_226m_geometry_trains_and_generates_at_reduced_depth_and_width(text_file, tmp_path):
    """configs/harpoon-226m.json with heads that do not divide the width (3 x 17 = 51 of 64, as 12 x 85
    = 1020 of 1024), fewer layers and a short context: a few steps, then generation."""
    small = ["n_layer=2", "n_embd=64", "n_head=3", "head_size=17", "block_size=32", "batch_size=4"]
    steps = ["max_iters=3", "eval_interval=3", "eval_iters=1", "learning_rate=1e-3"]
    cfg = load_train_config(REPO / "configs" / "harpoon-226m.json", small + steps)
    assert cfg.model.n_embd % cfg.model.n_head and cfg.model.n_head * cfg.model.head_size != cfg.model.n_embd
    s = train(cfg, tmp_path / "run", data=text_file, progress=False)
    loaded = load_model(tmp_path / "run")
    c = loaded.model.config
    assert s.steps == 3 and math.isfinite(s.last_train_loss)
    assert (c.activation, c.pos_emb, c.norm, c.bias, c.tie_embeddings, c.dropout) == (
        "relu",
        "learned",
        "layernorm",
        True,
        False,
        0.3,
    )
    assert loaded.model.transformer.h[0].attn.c_attn.weight.shape == (3 * 51, 64)
    (completion,) = generate(loaded.model, loaded.tokenizer, "First", SamplingParams(max_new_tokens=20, seed=0))
    assert len(loaded.tokenizer.encode(completion.text)) == 20


# Runs `quill train` in a child that SIGKILLs itself at step 7, or at one point of the third checkpoint (step 12).
KILLER = """
import io, os, signal, sys
import torch
import quillgpt.fileio, quillgpt.train, quillgpt.trainstate
from quillgpt.cli import main

where, calls = sys.argv[1], {"n": 0}
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

def count(name):
    calls[name] = calls.get(name, 0) + 1
    return calls[name]

step, save, atomic_write, replace = (
    quillgpt.train._Stepper.__call__, torch.save, quillgpt.trainstate.atomic_write, os.replace
)

def optimizer_step(*a, **k):
    if where == "mid-step" and count("step") == 7:
        die()
    return step(*a, **k)

def state_write(path, write):  # out/last.tmp/train_state.pt, after the weights of the same checkpoint
    if where == "before the state" and path.name == "train_state.pt" and count("state") == 3:
        die()
    return atomic_write(path, write)

def torch_save(obj, f):
    if where == "half the state" and count("save") == 3:
        buffer = io.BytesIO()
        save(obj, buffer)
        open(f, "wb").write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        die()
    return save(obj, f)

def os_replace(src, dst):  # the new last/ never arrives: last.old must be put back
    if where == "between the renames" and str(src).endswith("last.tmp") and count("swap") == 3:
        die()
    return replace(src, dst)

quillgpt.train._Stepper.__call__, quillgpt.trainstate.atomic_write = optimizer_step, state_write
torch.save, os.replace = torch_save, os_replace
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_at_any_point_resumes_from_the_last_complete_checkpoint(text_file, tmp_path):
    from quillgpt.cli import main

    settings = {**TINY, "max_iters": 15, "eval_interval": 4, "final_eval": False}
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(settings))
    train(config(**settings), tmp_path / "straight", data=text_file, progress=False)
    want = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "straight").steps]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    runs = {}
    for where in ("mid-step", "before the state", "half the state", "between the renames"):
        out = tmp_path / where.replace(" ", "-")
        args = ["train", str(cfg), "--data", str(text_file), "--out", str(out)]
        child = subprocess.Popen([sys.executable, "-c", KILLER, where, *args], env=env, stderr=subprocess.PIPE)
        runs[where] = (out, args, child)  # the children start side by side: most of their time is imports
    for where, (out, args, child) in runs.items():
        _, err = child.communicate(timeout=120)
        assert child.returncode == -signal.SIGKILL, err.decode()[-2000:]
        load_model(out)  # the best model so far always loads
        assert main([*args, "--resume"]) == 0
        steps = json.loads((out / "last" / "config.json").read_text())["provenance"]["steps"]
        got = [(r["step"], r["loss"]) for r in read_metrics(out).steps]
        assert steps == 15 and got == want, where
        assert not (out / "last.tmp").exists() and not (out / "last.old").exists()
        a, b = (load_model(d / "last").model.state_dict() for d in (tmp_path / "straight", out))
        assert all(torch.equal(a[k], b[k]) for k in a), where


@pytest.mark.parametrize(
    "change", [{"bias": False}, {"norm": "rmsnorm"}, {"qk_norm": True}, {"tie_embeddings": False}], ids=str
)
def test_resume_with_another_architecture_is_refused(text_file, tmp_path, change):
    train(config(max_iters=2, eval_interval=2), tmp_path / "run", data=text_file, progress=False)
    (name,) = change
    with pytest.raises(TrainError, match=f"different model shape \\({name}\\) than the run in"):
        train(config(max_iters=4, **change), tmp_path / "run", data=text_file, progress=False, resume=True)
    assert (
        train(config(max_iters=4, dropout=0.1), tmp_path / "run", data=text_file, progress=False, resume=True).steps
        == 4
    )
