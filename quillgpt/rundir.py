"""A training run's directory: the names of its files, its metrics read back, and where the run stands.

What `quill train --out RUN` writes (training writes it; the CLI and the playground read it):

    config.json, model.safetensors (+ tokenizer.json)   the best model by val loss (`quill generate RUN`)
    last/ (a model, and train_state.pt)                 the latest state, for --resume
    metrics.jsonl                                       one JSON line per step, per evaluation, and the final one
    loss.png                                            the losses, redrawn at each evaluation
    train_config.json                                   the exact resolved config
    recipe.json                                         the recipe's plan (`quill train --data`)

metrics.jsonl holds three kinds of record:

    {"step": 10, "loss": 2.31, "lr": 0.001, "tokens": 40960, "time_s": 3.2}      a training step
    {"step": 10, "eval": {"train": 2.30, "val": 2.33}, "time_s": 3.9}            an evaluation
    {"step": 500, "final_eval": {"val_loss": 1.47, ...}, "time_s": 310.0}        the whole val split
"""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from quillgpt.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from quillgpt.config import TrainConfig
from quillgpt.fileio import write_json
from quillgpt.tokenizer import BPE_FILE

RUNS_DIR = "runs"
"""Where runs go when no output directory is given (the CLI's default, the playground's runs)."""
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
LAST_DIR = "last"
STATE_FILE = "train_state.pt"
PLAN_FILE = "recipe.json"
"""The recipe's plan beside a `quill train --data` run: tokens, steps, epochs and the rate they assume."""
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, BPE_FILE, METRICS_FILE, PLOT_FILE, TRAIN_CONFIG_FILE, PLAN_FILE, LAST_DIR)
"""Everything a run writes at its top level: what marks a directory as holding a run."""


def train_config_path(run: Path) -> Path:
    return Path(run) / TRAIN_CONFIG_FILE


def write_train_config(run: Path, cfg: TrainConfig) -> None:
    write_json(train_config_path(run), cfg.to_dict())


def read_train_config(run: Path) -> dict:
    """The run's resolved config, as saved (raises OSError or ValueError when unreadable)."""
    return json.loads(train_config_path(run).read_text(encoding="utf-8"))


def read_plan(run: Path) -> dict:
    """The recipe's plan the run saved (raises OSError or ValueError when missing or unreadable)."""
    return json.loads((Path(run) / PLAN_FILE).read_text(encoding="utf-8"))


def state_path(run: Path) -> Path:
    """The training state that --resume continues from."""
    return Path(run) / LAST_DIR / STATE_FILE


def resumable(run: Path) -> bool:
    return state_path(run).is_file()


def holds_run(run: Path) -> bool:
    """Whether the directory holds any file of a run (so starting another there would overwrite it)."""
    return Path(run).is_dir() and any((Path(run) / name).exists() for name in RUN_FILES)


def clear_run(run: Path) -> None:
    """Remove a previous run's files (`--overwrite`); other files in the directory stay."""
    for name in RUN_FILES:
        p = Path(run) / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def model_dir(run: Path) -> Path | None:
    """The best model so far, or the latest state's model before the first evaluation saved one."""
    for d in (Path(run), Path(run) / LAST_DIR):
        if (d / CONFIG_FILE).is_file() and (d / WEIGHTS_FILE).is_file():
            return d
    return None


# ---------------------------------------------------------------- metrics


def read_records(path: Path) -> list[dict]:
    """The records of a metrics file, less a line torn by a crash or still being written; none if
    there is no file yet."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return _parse(data)


def _parse(data: bytes) -> list[dict]:
    records = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # torn by a crash, or still being written
            continue
    return records


@dataclass
class Metrics:
    """A run's metrics.jsonl, by kind of record."""

    steps: list[dict] = field(default_factory=list)
    """Per-step records: step, loss, lr, tokens, time_s."""
    evals: list[dict] = field(default_factory=list)
    """Evaluation records: step, eval {train, val}, time_s."""
    final: dict | None = None
    """The final evaluation's record (step, final_eval {val_loss, tokens, ...}, time_s), once the run finished."""

    def add(self, records: list[dict]) -> None:
        for r in records:
            if "loss" in r:
                self.steps.append(r)
            elif "eval" in r:
                self.evals.append(r)
            elif "final_eval" in r:
                self.final = r

    @property
    def final_val_loss(self) -> float | None:
        return self.final["final_eval"]["val_loss"] if self.final else None


@dataclass(frozen=True)
class Pace:
    """How fast a run trained, from its metrics: its steady steps and the start-up before them."""

    step_s: float
    """Seconds per optimizer step, the median gap between steps that were not followed by an evaluation."""
    tokens_per_s: float
    start_s: float
    """Seconds the first step took beyond a steady one: the start-up inside the budget (compiling, mostly)."""


def pace(metrics: Metrics) -> Pace | None:
    """The pace of a run's steps (None before it has taken three): what a plan's rate should have been."""
    steps = metrics.steps
    evaluated = {e["step"] for e in metrics.evals}
    gaps = sorted(b["time_s"] - a["time_s"] for a, b in zip(steps, steps[1:]) if a["step"] not in evaluated)
    if len(gaps) < 2 or gaps[len(gaps) // 2] <= 0:
        return None
    step_s = gaps[len(gaps) // 2]
    tokens_per_step = (steps[-1]["tokens"] - steps[0]["tokens"]) / (steps[-1]["step"] - steps[0]["step"])
    return Pace(step_s, tokens_per_step / step_s, max(steps[0]["time_s"] - step_s, 0.0))


def read_metrics(run: Path) -> Metrics:
    """The metrics of a run directory (none yet before its first step)."""
    metrics = Metrics()
    metrics.add(read_records(Path(run) / METRICS_FILE))
    return metrics


class MetricsFollower:
    """`read_metrics` for a reader that looks again and again while a run trains (the playground's Train
    page): each look parses only the whole lines appended since the last one, so watching leaves the CPU
    to the run. A line still being written waits for the next look; a file that shrank (a new run in the
    same place) is read anew. Safe to share between threads."""

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[int, Metrics]] = {}
        self._lock = threading.Lock()

    def read(self, run: Path) -> Metrics:
        path = Path(run) / METRICS_FILE
        with self._lock:
            offset, metrics = self._seen.get(path, (0, Metrics()))
            try:
                with open(path, "rb") as f:
                    size = f.seek(0, 2)
                    if size < offset:
                        offset, metrics = 0, Metrics()
                    f.seek(offset)
                    chunk = f.read(size - offset)
            except FileNotFoundError:
                self._seen.pop(path, None)
                return Metrics()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            metrics.add(_parse(complete))
            self._seen[path] = (offset + len(complete), metrics)
            return Metrics(list(metrics.steps), list(metrics.evals), metrics.final)


# ---------------------------------------------------------------- where a run stands


@dataclass
class RunProgress:
    """What a run directory says about its run, whoever started it (the CLI, the playground, torchrun)."""

    metrics: Metrics
    config: dict
    """The saved train_config.json ({} before the run wrote it, or if unreadable)."""
    resumable: bool
    """A saved state exists for --resume."""

    @property
    def finished(self) -> bool:
        """The run reached its end and evaluated its best model (with `final_eval` on)."""
        return self.metrics.final is not None

    @property
    def budget_s(self) -> float | None:
        minutes = self.config.get("max_minutes")
        return minutes * 60 if minutes else None

    @property
    def last_step(self) -> dict | None:
        return self.metrics.steps[-1] if self.metrics.steps else None


def read_progress(run: Path, follower: MetricsFollower | None = None) -> RunProgress:
    """Where the run in `run` stands; `follower` reads its metrics incrementally (see MetricsFollower)."""
    try:
        config = read_train_config(run)
    except (OSError, ValueError):
        config = {}
    metrics = follower.read(run) if follower is not None else read_metrics(run)
    return RunProgress(metrics, config, resumable(run))
