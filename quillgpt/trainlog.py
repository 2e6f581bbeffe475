"""A training run's log as it is written: `metrics.jsonl` (its records: `quillgpt.rundir`), the
`loss.png` drawn from it, and the progress bar on the terminal."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from quillgpt.fileio import atomic_write, write_text
from quillgpt.rundir import METRICS_FILE, read_metrics, read_records

FLUSH_SECONDS = 1.0


class MetricsLog:
    """Appends records to a run's metrics.jsonl; on resume, first drops those logged after the checkpoint."""

    def __init__(self, run: str | Path, resume_step: int | None = None):
        self.path = Path(run) / METRICS_FILE
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_records(self.path) if r["step"] <= resume_step]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._flushed = time.monotonic()

    def step(self, step: int, loss: float, lr: float, tokens: int, time_s: float) -> None:
        self._write({"step": step, "loss": round(loss, 5), "lr": lr, "tokens": tokens, "time_s": round(time_s, 2)})
        if time.monotonic() - self._flushed > FLUSH_SECONDS:  # readers (the Train page) follow the run live
            self._file.flush()
            self._flushed = time.monotonic()

    def eval(self, step: int, losses: dict[str, float], time_s: float) -> None:
        self._write({"step": step, "eval": losses, "time_s": round(time_s, 2)})
        self._file.flush()

    def final_eval(self, step: int, result: dict[str, Any], time_s: float) -> None:
        self._write({"step": step, "final_eval": result, "time_s": round(time_s, 2)})

    def close(self) -> None:
        self._file.close()

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")


def progress_bar(max_iters: int, step: int, time_budgeted: bool):
    """Steps, loss, tokens/s and ETA; a time-budgeted run shows the minutes left instead of an ETA."""
    total = None if time_budgeted else max_iters
    return tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)


def update_bar(bar, loss: float, tokens: int, elapsed: float, budget: float | None) -> None:
    bar.update(1)
    info = {"loss": f"{loss:.4f}", "tok_s": f"{tokens / max(elapsed, 1e-9):,.0f}"}
    if budget:
        info["min_left"] = f"{max(budget - elapsed, 0) / 60:.1f}"
    bar.set_postfix(info, refresh=False)


def plot_metrics(run: str | Path, png_path: str | Path, title: str | None = None) -> None:
    """A run's train loss per step (smoothed) and eval train/val losses, written atomically as a PNG."""
    import matplotlib  # start-up time: training and the playground import this module, few runs plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(Path(run))
    steps, evals = metrics.steps, metrics.evals
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if steps:
        xs = [r["step"] for r in steps]
        ys, ema = [], None
        for r in steps:
            ema = r["loss"] if ema is None else 0.95 * ema + 0.05 * r["loss"]
            ys.append(ema)
        ax.plot(xs, ys, color="tab:blue", alpha=0.5, lw=1, label="train (batch, smoothed)")
    for split, colour in (("train", "tab:blue"), ("val", "tab:orange")):
        ys = [r["eval"][split] for r in evals]
        ax.plot([r["step"] for r in evals], ys, "o-", color=colour, ms=3, label=f"{split} (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, png_path)
    plt.close(fig)


def save_figure(fig, path: str | Path) -> None:
    """Write a matplotlib figure atomically, in the format its file name says (PNG by default)."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png"))
