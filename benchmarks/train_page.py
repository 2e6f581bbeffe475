"""What watching costs a training run: the Train page's run with Chromium watching it to the end, against
the same run with nobody watching, and each one's tokens seen against the recipe's plan.

Unwatched: the run the Train page would start (`quill train --data DATA --minutes N`, through the
playground's own `training.start`), with no server and no browser. Watched: `quill playground`'s
server at its default threads and a real Chromium (Playwright, headless) on the same machine, which
opens the Train page, picks the minutes, presses Train and keeps the page open until "Finished".
Both read the throughput cache the first one fills, so both plan the same shape and tokens.

For each run: tokens planned (its recipe.json), tokens seen (its last step in metrics.jsonl), and its
training rate (tokens per second of its median step, the pauses for evaluation left out). Targets: seen
within 15% of planned, and the watched rate ≥ 90% of the unwatched one.
Prints human-readable lines, then one JSON line.

    python benchmarks/train_page.py [--data tinyshakespeare] [--minutes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from machine import cpu_info
from playground import CHROMIUM, CHROMIUM_ARGS, default_threads_env, playground

from quillgpt.playground import training
from quillgpt.rundir import METRICS_FILE, pace, read_metrics, read_plan


def run_figures(run: Path) -> dict:
    """Planned and seen tokens of a finished run, and its rate over training steps alone (`pace`)."""
    plan = read_plan(run)
    metrics = read_metrics(run)
    seen = metrics.steps[-1]["tokens"]
    return {
        "planned_tokens": plan["tokens"],
        "seen_tokens": seen,
        "seen_over_planned": round(seen / plan["tokens"], 3),
        "tokens_per_s": round(pace(metrics).tokens_per_s),
        "plan": plan["description"],
    }


def unwatched(data: str, minutes: float, runs: Path) -> Path:
    run = training.start(data, minutes, runs)
    deadline = time.monotonic() + minutes * 60 + 300
    while training.active_run(runs) is not None or not (run / METRICS_FILE).is_file():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{run} did not finish")
        time.sleep(1)
    return run


def watched(minutes: float, runs: Path, env: dict[str, str]) -> Path:
    from playwright.sync_api import sync_playwright

    with playground([], env) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1100})
            page.goto(url)
            page.get_by_label("Prompt").wait_for(timeout=120_000)
            page.get_by_text("Train", exact=True).click()
            page.get_by_role("button", name="Train", exact=True).wait_for()
            page.get_by_text(f"{minutes:g}", exact=True).click()
            page.get_by_role("button", name="Train", exact=True).click()
            page.get_by_text("Finished").wait_for(timeout=int((minutes * 60 + 300) * 1000))
        finally:
            browser.close()
    (run,) = training.list_runs(runs)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="tinyshakespeare", help="a registered dataset the Train page offers")
    ap.add_argument("--minutes", type=float, default=2.0, choices=training.MINUTES)
    args = ap.parse_args()
    cpu = cpu_info()
    print(f"CPU: {cpu['cpu']} ({os.cpu_count()} cores), the run and the server at default threads")
    for name in set(os.environ) - set(default_threads_env()):
        del os.environ[name]  # the unwatched run's `quill train` at default threads too
    with tempfile.TemporaryDirectory() as tmp:
        figures = {}
        for mode in ("unwatched", "watched"):
            runs = Path(tmp) / mode
            runs.mkdir()
            os.environ["QUILL_RUNS_DIR"] = str(runs)
            run = (
                unwatched(args.data, args.minutes, runs)
                if mode == "unwatched"
                else watched(args.minutes, runs, dict(os.environ))
            )
            figures[mode] = run_figures(run)
    for mode, f in figures.items():
        print(f"{mode}: {f['seen_tokens']:,} tokens seen of {f['planned_tokens']:,} planned "
              f"({f['seen_over_planned']:.2f}×; target within 15%), {f['tokens_per_s']:,} tokens/s")  # fmt: skip
    ratio = figures["watched"]["tokens_per_s"] / figures["unwatched"]["tokens_per_s"]
    print(f"plan: {figures['unwatched']['plan']}")
    print(f"watched / unwatched tokens/s: {ratio:.0%} (target ≥ 90%)")
    record = {"benchmark": "train_page", "data": args.data, "minutes": args.minutes, **figures,
              "watched_over_unwatched": round(ratio, 3), **cpu}  # fmt: skip
    print(json.dumps(record))


if __name__ == "__main__":
    main()
