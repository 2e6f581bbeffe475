"""The Train page's runs: `quill train --data ... --minutes ...` in a detached process, and its state
read back from the run directory. No Streamlit here: the page (train_page.py) only draws this.

A run is a directory under the runs directory ($QUILL_RUNS_DIR, default `runs/`), named by the
page: `job.json` (what was started, the process id, its exit code once seen), `train.log` (the
trainer's output) and everything `quill train` writes (metrics.jsonl, train_config.json, the best
model, last/: `quillgpt.rundir`). The process runs in its own session, so a closed tab, a browser refresh or even a
restarted playground leaves it training; the page finds it again from the directory. Uploads are
stored as `uploads/<sha256 prefix>.txt` under the runs directory, never at a name the user gave.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from quillgpt.data import DataError, load_text
from quillgpt.fileio import write_bytes, write_json
from quillgpt.recipe import TextStats, describe, recipe
from quillgpt.rundir import RUNS_DIR, MetricsFollower, model_dir, read_plan, read_progress, resumable, train_config_path
from quillgpt.throughput import cached_rate

JOB_FILE = "job.json"
LOG_FILE = "train.log"
UPLOADS_DIR = "uploads"
MINUTES = (2, 5, 10, 20, 60)
MAX_UPLOAD_MB = 50
_children: dict[int, subprocess.Popen] = {}
"""Processes this process started, kept so their exit codes are read (and they leave no zombie)."""


class TrainingError(RuntimeError):
    """A run that cannot start, stop or resume, in words for the page."""


def runs_dir() -> Path:
    return Path(os.environ.get("QUILL_RUNS_DIR") or RUNS_DIR)


# ---------------------------------------------------------------- input


def save_upload(data: bytes, runs: Path) -> Path:
    """Check an uploaded text and store it as runs/uploads/<sha256 prefix>.txt; its path."""
    if not data.strip():
        raise TrainingError("The file is empty: upload a text to train on.")
    if len(data) > MAX_UPLOAD_MB * 1024 * 1024:
        raise TrainingError(f"The file is {len(data) / 2**20:.0f} MB: the limit is {MAX_UPLOAD_MB} MB.")
    if _looks_binary(data):
        raise TrainingError("This does not look like text (a binary file?): upload a plain .txt file, UTF-8.")
    path = runs / UPLOADS_DIR / f"{hashlib.sha256(data).hexdigest()[:16]}.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, data)
    return path


def _looks_binary(data: bytes) -> bool:
    """NUL bytes, or more than 1% control characters other than whitespace."""
    if b"\x00" in data[: 1 << 20]:
        return True
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    sample = text[: 1 << 20]
    control = sum(1 for c in sample if ord(c) < 32 and c not in "\n\r\t\f\v")
    return control > 0.01 * len(sample)


# ---------------------------------------------------------------- start, stop, resume


def start(data: str | Path, minutes: float, runs: Path, label: str | None = None, overrides=()) -> Path:
    """Start `quill train --data DATA --minutes M` into a new run directory; the directory.

    Refused while another run trains, and for a text the recipe cannot use (too short, unreadable).
    The plan shown until the run saves its own (recipe.json) reads the rates cached on this machine:
    the run times its chosen shape again as it plans."""
    if busy := active_run(runs):
        raise TrainingError(f"{busy.name} is still training: stop it, or wait for it to finish, first.")
    try:
        plan = recipe(TextStats.of(load_text(data)), minutes, rate=cached_rate)
    except (DataError, ValueError) as e:
        raise TrainingError(str(e)) from None
    run = _new_run_dir(runs, label or Path(str(data)).stem, minutes)
    data_arg = str(Path(data).resolve()) if Path(data).exists() else str(data)
    cmd = ["train", "--data", data_arg, "--minutes", f"{minutes:g}", "--out", str(run.resolve())]
    for item in overrides:
        cmd += ["--set", item]
    job = {"label": label or str(data), "data": data_arg, "minutes": minutes, "recipe": describe(plan, minutes)}
    _spawn(run, cmd, job)
    return run


def resume(run: Path) -> None:
    """Continue a stopped run where it left off (`quill train <its train_config.json> --resume`)."""
    if busy := active_run(run.parent):
        raise TrainingError(f"{busy.name} is still training: stop it, or wait for it to finish, first.")
    if not resumable(run):
        raise TrainingError(f"{run.name} has no saved state to resume from: start a new run.")
    cmd = ["train", str(train_config_path(run).resolve()), "--out", str(run.resolve()), "--resume"]
    _spawn(run, cmd, read_job(run))


def stop(run: Path) -> None:
    """Ask the run to stop: SIGINT, on which `quill train` saves its state and exits (130)."""
    pid = read_job(run).get("pid")
    if pid is not None and _alive(pid):
        os.kill(pid, signal.SIGINT)


def _new_run_dir(runs: Path, label: str, minutes: float) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:24] or "text"
    base = f"{slug}-{minutes:g}min-{time.strftime('%Y%m%d-%H%M%S')}"
    run, n = runs / base, 1
    while run.exists():
        n += 1
        run = runs / f"{base}-{n}"
    run.mkdir(parents=True)
    return run


def _spawn(run: Path, args: list[str], job: dict) -> None:
    cmd = [sys.executable, "-m", "quillgpt.cli", *args]
    with open(run / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
    _children[proc.pid] = proc
    job = {k: v for k, v in job.items() if k not in ("returncode",)}
    write_json(run / JOB_FILE, job | {"pid": proc.pid, "command": cmd, "started": time.time()})


# ---------------------------------------------------------------- state


def read_job(run: Path) -> dict:
    try:
        return json.loads((run / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie does not); a pid this process started is asked directly."""
    if pid in _children:
        return _children[pid].poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the signal
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and b"quillgpt" in cmdline


def _returncode(run: Path, job: dict) -> int | None:
    """The exit code, when this process started the run (and remembered in job.json)."""
    if "returncode" in job:
        return job["returncode"]
    proc = _children.get(job.get("pid", -1))
    if proc is None or proc.poll() is None:
        return None
    write_json(run / JOB_FILE, job | {"returncode": proc.returncode})
    return proc.returncode


@dataclass
class RunStatus:
    """A run as the page shows it, read from its directory."""

    run: Path
    state: str
    """starting, running, finished, stopped or failed."""
    label: str = ""
    minutes: float = 0.0
    recipe: str = ""
    budget_s: float | None = None
    elapsed_s: float = 0.0
    step: int = 0
    tokens: int = 0
    loss: float | None = None
    steps: list[dict] = field(default_factory=list)
    """Per-step records of metrics.jsonl: step, loss, lr, tokens, time_s."""
    evals: list[dict] = field(default_factory=list)
    """Evaluation records: step, eval {train, val}, time_s."""
    final_val: float | None = None
    parameters: int | None = None
    log_tail: str = ""

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running")

    @property
    def fraction(self) -> float:
        if self.state == "finished":
            return 1.0
        return min(self.elapsed_s / self.budget_s, 1.0) if self.budget_s else 0.0

    @property
    def seconds_left(self) -> float | None:
        return max(self.budget_s - self.elapsed_s, 0.0) if self.budget_s else None

    @property
    def model_dir(self) -> Path | None:
        """The best model so far, or the latest state's model before the first evaluation."""
        return model_dir(self.run)

    @property
    def resumable(self) -> bool:
        return self.state == "stopped" and resumable(self.run)


_metrics = MetricsFollower()
"""The page's sessions share one follower: a refresh parses only what each run's metrics gained."""


def status(run: Path) -> RunStatus:
    job = read_job(run)
    s = RunStatus(run, "failed", job.get("label", run.name), job.get("minutes", 0.0), job.get("recipe", ""))
    with contextlib.suppress(OSError, ValueError, AttributeError):  # the run's own plan, once it has saved it
        s.recipe = read_plan(run).get("description") or s.recipe
    progress = read_progress(run, _metrics)
    s.steps, s.evals, s.final_val = progress.metrics.steps, progress.metrics.evals, progress.metrics.final_val_loss
    if last := progress.last_step:
        s.step, s.tokens, s.loss, s.elapsed_s = last["step"], last["tokens"], last["loss"], last["time_s"]
    if progress.config:
        s.budget_s = progress.budget_s
        s.parameters = _parameters(progress.config)
    alive = job.get("pid") is not None and _alive(job["pid"])
    code = None if alive else _returncode(run, job)
    if alive:
        s.state = "running" if s.steps else "starting"
    elif progress.finished or code == 0:
        s.state = "finished"
    elif progress.resumable and code in (None, 130):
        s.state = "stopped"
    s.log_tail = _tail(run / LOG_FILE) if s.state == "failed" else ""
    return s


def _parameters(cfg: dict) -> int | None:
    """Parameters of the run's model, counted on the meta device (no memory), once per config."""
    return _count_parameters(json.dumps(cfg, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _count_parameters(cfg_json: str) -> int | None:
    import torch  # start-up time: the page imports this module, and only a run's card needs PyTorch

    from quillgpt.config import train_config_from_dict
    from quillgpt.model import GPT

    cfg = json.loads(cfg_json)
    try:
        model_cfg = train_config_from_dict(cfg).model
        model_cfg.vocab_size = cfg.get("vocab_size") or model_cfg.vocab_size
        with torch.device("meta"):
            return GPT(model_cfg).num_params()
    except (ValueError, TypeError):
        return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


# ---------------------------------------------------------------- the runs directory


def list_runs(runs: Path) -> list[Path]:
    """Runs started from the page, newest first."""
    if not runs.is_dir():
        return []
    found = [d for d in runs.iterdir() if (d / JOB_FILE).is_file()]
    return sorted(found, key=lambda d: read_job(d).get("started", 0.0), reverse=True)


def active_run(runs: Path) -> Path | None:
    return next((r for r in list_runs(runs) if (pid := read_job(r).get("pid")) is not None and _alive(pid)), None)


def trained_models(runs: Path) -> list[str]:
    """The models of the page's runs, newest first, for the model picker."""
    return [str(d) for r in list_runs(runs) if (d := model_dir(r)) is not None]


def sample(model_path: Path, chars: int = 240, seed: int = 0) -> str:
    """A short sample from a model directory, from its start token, seeded."""
    from quillgpt.checkpoint import load_model  # start-up time, as in _parameters
    from quillgpt.generate import generate
    from quillgpt.sampling import SamplingParams

    loaded = load_model(model_path)
    (completion,) = generate(loaded.model, loaded.tokenizer, "", SamplingParams(max_new_tokens=chars, seed=seed))
    return completion.text
