"""The playground's Train mode: the run manager (real `quill train` processes) and the page's states (AppTest)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import quillgpt.checkpoint as checkpoint
from quillgpt.checkpoint import save_model
from quillgpt.playground import training
from quillgpt.playground.launch import PAGE
from quillgpt.playground.training import TrainingError, save_upload, status
from quillgpt.recipe import TextStats, recipe, reference_rate
from quillgpt.rundir import read_plan
from tests.conftest import PAGE_SCRIPT

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, and the dog sleeps on.\n" for i in range(60))
TINY = ["n_layer=1", "n_embd=32", "n_head=1", "eval_interval=5", "eval_iters=2", "max_minutes=0.5", "compile=false"]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint, "REPO_MODELS_DIR", tmp_path / "no-bundled-models")
    for var in ("QUILL_MODELS_DIR", "QUILL_PLAYGROUND_MODELS", "QUILL_API_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QUILL_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr("sys.argv", [str(PAGE)])


def wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)
    return value


# --- the run manager -----------------------------------------------------------------------------------


def test_uploads_are_checked_and_stored_under_a_generated_name(tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(TrainingError, match="empty"):
        save_upload(b"  \n", runs)
    with pytest.raises(TrainingError, match="binary"):
        save_upload(bytes(range(256)) * 10, runs)
    path = save_upload(TEXT.encode(), runs)
    assert path.parent == runs / "uploads" and len(path.stem) == 16 and path.read_text() == TEXT
    assert save_upload(TEXT.encode(), runs) == path  # the same text, the same file


def test_start_stop_resume_a_real_run(tmp_path):
    runs = tmp_path / "runs"
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    run = training.start(data, 2, runs, label="My text!", overrides=TINY)
    assert run.parent == runs and run.name.startswith("my-text-2min-")
    try:
        with pytest.raises(TrainingError, match="still training"):
            training.start(data, 2, runs, overrides=TINY)
        wait_for(lambda: status(run).evals, "a first evaluation")
        running = status(run)
        assert running.state == "running" and running.budget_s == 30 and 0 < running.fraction < 1
        assert running.parameters and running.tokens > 0 and running.recipe.startswith("recipe for 2 min")
        assert running.recipe == read_plan(run)["description"]  # the run's own plan, once saved
        training.stop(run)
        stopped = wait_for(lambda: (s := status(run)).state == "stopped" and s, "the run to stop", 30)
        assert stopped.resumable and stopped.model_dir is not None
        assert training.trained_models(runs) == [str(stopped.model_dir)]
        assert training.sample(stopped.model_dir, chars=20)

        training.resume(run)
        wait_for(lambda: status(run).step > stopped.step, "the resumed run to step on")
        assert status(run).active
    finally:
        training.stop(run)
        wait_for(lambda: not status(run).active, "the run to end", 30)
    assert json.loads((run / "train_config.json").read_text())["n_layer"] == 1


def test_a_text_too_short_is_refused_before_anything_starts(tmp_path):
    data = tmp_path / "short.txt"
    data.write_text("Too short.")
    with pytest.raises(TrainingError, match="too short"):
        training.start(data, 2, tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_status_reads_only_what_the_metrics_gained_and_waits_for_a_line_being_written(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "loss": 3.0 - s / 10, "lr": 0.003, "tokens": s * 64, "time_s": s * 0.1} for s in (1, 2, 3)]
    records.append({"step": 3, "eval": {"train": 2.8, "val": 2.9}, "time_s": 0.4})
    text = "".join(json.dumps(r) + "\n" for r in records)
    metrics = run / "metrics.jsonl"
    metrics.write_text(text[: len(text) - 20])  # the evaluation's line half written
    first = status(run)
    assert [r["step"] for r in first.steps] == [1, 2, 3] and first.evals == []
    with open(metrics, "a") as f:
        f.write(
            text[len(text) - 20 :] + json.dumps({"step": 4, "loss": 2.5, "lr": 0.003, "tokens": 256, "time_s": 0.5})
        )
        f.write("\n")
    second = status(run)
    assert second.steps == [json.loads(line) for line in metrics.read_text().splitlines() if "loss" in line]
    assert second.evals == [records[-1]] and second.step == 4 and first.steps == records[:3]  # earlier looks kept
    metrics.write_text(text.splitlines(keepends=True)[0])  # a new run in the same place: a shorter file
    assert [r["step"] for r in status(run).steps] == [1]


# --- the page -----------------------------------------------------------------------------------------


def train_app() -> AppTest:
    at = AppTest.from_string(PAGE_SCRIPT, default_timeout=30).run()
    at.radio(key="mode").set_value("Train").run()
    return at


def fake_run(runs: Path, tiny_model, char_tokenizer, *, alive: bool, finished: bool) -> Path:
    """A run directory as `quill train` leaves it, with a stand-in process (alive or already gone)."""
    run = runs / "story-2min-20250101-120000"
    cfg = recipe(TextStats.of(TEXT * 20), 2, data_path="story.txt", rate=reference_rate).config.to_dict()
    run.mkdir(parents=True)
    (run / "train_config.json").write_text(json.dumps(cfg | {"max_minutes": 2.0, "vocab_size": 30}))
    lines = [
        {"step": s, "loss": 3.0 - s / 100, "lr": 0.003, "tokens": s * 1024, "time_s": s * 0.5} for s in range(1, 121)
    ]
    lines += [{"step": s, "eval": {"train": 2.5 - s / 200, "val": 2.6 - s / 200}, "time_s": s * 0.5} for s in (50, 100)]
    if finished:
        lines.append({"step": 120, "final_eval": {"val_loss": 2.01, "tokens": 500}, "time_s": 60.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    save_model(run, tiny_model, char_tokenizer, provenance={"data": "story.txt", "steps": 120, "val_loss": 2.1})
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "quillgpt-stand-in"])
    if not alive:
        proc.kill()
        proc.wait()
    job = {"label": "story", "data": "story.txt", "minutes": 2, "recipe": "recipe for 2 min: …", "pid": proc.pid}
    (run / "job.json").write_text(json.dumps(job | {"started": time.time()}))
    return run, proc


def test_page_idle_offers_datasets_uploads_and_minutes():
    at = train_app()
    assert not at.exception and not at.error
    assert "No run yet" in at.info[0].value
    assert at.radio(key="train_minutes").options == ["2", "5", "10", "20", "60"]
    assert "tinyshakespeare" in at.selectbox(key="train_dataset").options
    at.radio(key="train_source").set_value("Upload a .txt file").run()
    assert "up to 50 MB" in at.get("file_uploader")[0].label


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (bytes(range(256)) * 40, "binary"), (b"Far too short.\n", "too short")],
)
def test_page_bad_upload_says_why_and_starts_nothing(tmp_path, content, message):
    at = train_app()
    at.radio(key="train_source").set_value("Upload a .txt file").run()
    at.get("file_uploader")[0].set_value(("mine.txt", content, "text/plain")).run()
    at.button(key="train_start").click().run()
    assert not at.exception
    assert any(message in e.value for e in at.error)
    assert training.list_runs(tmp_path / "runs") == []


def test_page_running_shows_progress_curve_sample_and_refuses_a_second_run(tmp_path, tiny_model, char_tokenizer):
    run, proc = fake_run(tmp_path / "runs", tiny_model, char_tokenizer, alive=True, finished=False)
    try:
        at = train_app()
        assert not at.exception and not at.error
        (bar,) = at.get("progress")
        assert "left" in bar.proto.text and 0 < bar.proto.value < 100
        assert {m.label: m.value for m in at.metric}["Step"] == "120"
        assert at.get("vega_lite_chart")  # the loss curve
        assert at.button(key="train_stop").label == "Stop training"
        assert not at.code  # sampling takes the run's cores: only when asked
        at.button(key=f"sample_{run.name}").click().run()
        assert at.code[0].value  # a sample from the best model so far
        at.button(key="train_start").click().run()  # a second run while this one trains
        assert any("still training" in e.value for e in at.error)
        assert training.list_runs(tmp_path / "runs") == [run]
    finally:
        proc.kill()
        proc.wait()


def test_page_finished_run_opens_in_generate(tmp_path, tiny_model, char_tokenizer):
    run, _ = fake_run(tmp_path / "runs", tiny_model, char_tokenizer, alive=False, finished=True)
    at = train_app()
    assert not at.exception and not at.error
    assert "2.0100" in at.get("progress")[0].proto.text
    assert at.success
    assert at.code[0].value  # the run is over: its sample is shown unasked
    at.button(key="train_generate").click().run()
    assert at.radio(key="mode").value == "Generate"
    assert at.selectbox(key="model_a").value == str(run)
    at.button(key="generate").click().run()
    assert not at.exception and at.session_state["result_a"].status == "done"
