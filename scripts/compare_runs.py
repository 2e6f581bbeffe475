"""Plot validation loss against wall time for several runs (their `metrics.jsonl`), on one chart.

    python scripts/compare_runs.py models/shakespeare-speedrun runs/baseline \
        --label "speedrun recipe" --label "plain GPT-2 recipe" --out docs/figures/speedrun-vs-baseline.png

Each run's periodic evaluations are drawn as a line; its final whole-split score, if it has one,
as a star at the end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from quillgpt.rundir import read_metrics  # noqa: E402
from quillgpt.trainlog import save_figure  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run or model directories holding metrics.jsonl")
    p.add_argument("--label", action="append", default=[])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="Tiny Shakespeare, 2 CPU cores: validation loss by wall time")
    args = p.parse_args()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for i, run in enumerate(args.runs):
        label = args.label[i] if i < len(args.label) else run.name
        metrics = read_metrics(run)
        evals = metrics.evals
        line = ax.plot([r["time_s"] / 60 for r in evals], [r["eval"]["val"] for r in evals], "o-", ms=3, label=label)
        if (final := metrics.final) is not None:
            loss = metrics.final_val_loss
            ax.plot([final["time_s"] / 60], [loss], "*", ms=12, color=line[0].get_color())
            ax.annotate(
                f"{loss:.4f} (whole split)",
                (final["time_s"] / 60, loss),
                textcoords="offset points",
                xytext=(-10, -14),
                ha="right",
                fontsize=8,
                color=line[0].get_color(),
            )
    ax.axhline(1.47, color="grey", ls="--", lw=1, label="1.47 (nanoGPT on an A100: 1.4697)")
    ax.set_xlabel("wall time (minutes)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
