"""A run directory read back: its metrics (the final evaluation included), its progress, its model,
and `quill train --resume` finding the run's own config there."""

import json
import threading

from quillgpt.checkpoint import save_model
from quillgpt.cli import main
from quillgpt.config import train_config_from_dict
from quillgpt.rundir import (
    RUN_FILES,
    holds_run,
    model_dir,
    pace,
    read_metrics,
    read_progress,
    read_train_config,
    state_path,
)
from quillgpt.train import train
from tests.conftest import SAMPLE_TEXT

STEP = {"step": 1, "loss": 3.2, "lr": 0.001, "tokens": 512, "time_s": 0.5}
EVAL = {"step": 2, "eval": {"train": 3.0, "val": 3.1}, "time_s": 1.2}
FINAL = {"step": 2, "final_eval": {"val_loss": 2.9, "tokens": 400}, "time_s": 2.0}


def write_metrics(run, records, tail=""):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_metrics_by_kind_with_the_final_evaluation(tmp_path):
    write_metrics(tmp_path / "run", [STEP, {**STEP, "step": 2}, EVAL, FINAL])
    m = read_metrics(tmp_path / "run")
    assert [r["step"] for r in m.steps] == [1, 2] and m.evals == [EVAL]
    assert m.final == FINAL and m.final_val_loss == 2.9


def test_metrics_of_a_run_under_way_or_not_started(tmp_path):
    write_metrics(tmp_path / "run", [STEP, EVAL], tail='{"step": 2, "loss": 3.')  # a line being written
    m = read_metrics(tmp_path / "run")
    assert m.steps == [STEP] and m.evals == [EVAL] and m.final is None and m.final_val_loss is None
    empty = read_metrics(tmp_path / "nothing-yet")
    assert empty.steps == [] and empty.evals == [] and empty.final is None


def test_the_pace_of_a_run_leaves_out_its_start_up_and_its_evaluations(tmp_path):
    """A first step of 3 s (compiling), then a step every 0.5 s but for a 2 s evaluation after step 4."""
    times = [3.0, 3.5, 4.0, 4.5, 7.0, 7.5, 8.0]
    steps = [{**STEP, "step": i + 1, "tokens": 4096 * (i + 1), "time_s": t} for i, t in enumerate(times)]
    write_metrics(tmp_path / "run", [*steps[:4], {**EVAL, "step": 4}, *steps[4:]])
    got = pace(read_metrics(tmp_path / "run"))
    assert got.step_s == 0.5 and got.tokens_per_s == 8192 and got.start_s == 2.5
    write_metrics(tmp_path / "young", steps[:2])
    assert pace(read_metrics(tmp_path / "young")) is None  # one gap is not a pace


def test_progress_reads_the_budget_the_last_step_and_the_end(tmp_path):
    run = tmp_path / "run"
    write_metrics(run, [STEP, {**STEP, "step": 2, "time_s": 0.9}])
    p = read_progress(run)
    assert p.config == {} and p.budget_s is None and p.last_step["time_s"] == 0.9
    assert not p.finished and not p.resumable
    (run / "train_config.json").write_text(json.dumps({"max_minutes": 2.5}))
    write_metrics(run, [STEP, EVAL, FINAL])
    state_path(run).parent.mkdir()
    state_path(run).write_bytes(b"")
    p = read_progress(run)
    assert p.budget_s == 150.0 and p.finished and p.resumable


def test_the_model_is_the_best_one_else_the_last_state(tmp_path, tiny_model, char_tokenizer):
    run = tmp_path / "run"
    assert model_dir(run) is None and not holds_run(run)
    save_model(run / "last", tiny_model, char_tokenizer)
    assert model_dir(run) == run / "last" and holds_run(run)
    save_model(run, tiny_model, char_tokenizer)
    assert model_dir(run) == run
    assert "last" in RUN_FILES and "train_config.json" in RUN_FILES


def test_quill_train_resume_takes_the_runs_own_config(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 30)
    cfg = train_config_from_dict(
        dict(batch_size=4, block_size=16, n_layer=1, n_head=1, n_embd=16, eval_iters=1, max_iters=6, eval_interval=3)
    )
    stop = threading.Event()
    run = tmp_path / "run"
    s = train(cfg, run, data=text, progress=False, stop=stop, on_step=lambda step, loss: step == 2 and stop.set())
    assert s.interrupted and s.steps == 2
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert read_train_config(run)["max_iters"] == 6
    assert [r["step"] for r in read_metrics(run).steps] == [1, 2, 3, 4, 5, 6]
