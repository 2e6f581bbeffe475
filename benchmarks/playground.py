"""The playground's speed as a user times it: from the click on Generate to the last token painted,
next to the library's own stream rate for the same model, prompt and settings, in the same run.

A real Chromium (Playwright, headless) drives `quill playground`'s page, served with the default
thread count (OMP_NUM_THREADS is removed from the server's environment). Each timed generation
opens a fresh page with the model already loaded, sets the seed, clicks Generate and waits until
the status line says "finished". The browser records both ends itself: the click event's
timestamp, and a moment after the frame that first shows the status line (a MutationObserver,
then the next animation frame) — nothing the server reports is trusted.

The library's rate is `quillgpt.generate.stream` (what `quill generate` runs) in a process of its own
at default threads, timed from before its first token (prefill included) to its last, after
each page's run, once the closed page has settled (SETTLE_SECONDS): this VM's speed drifts by tens
of percent between minutes, so each page run is set against the library run beside it, and the
ratio is the median of those pairs.

Then, on one page, the first Generate after selecting another model against the second one.
Prints human-readable lines, then one JSON line.

    python benchmarks/playground.py [--model shakespeare-char] [--runs 3] [--tokens 300]

With `--against DIR` (another checkout of this repository, e.g. a `git worktree` of the last commit),
it measures two versions of the page instead, fresh pages taken in turn from a server of each, every
page paired with a library run, and prints both medians and their round-by-round difference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from machine import cpu_info

from quillgpt.playground.launch import PAGE, SERVER, streamlit_command

REPO = Path(__file__).resolve().parents[1]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]  # fmt: skip

# Installed before the page's own scripts: the click's event time, and the first frame showing "finished".
TIMING_JS = """
window.__quill = {click: null, gone: false, finished: null};
document.addEventListener("click", (e) => {
  const b = e.target.closest && e.target.closest("button");
  if (b && b.innerText.trim() === "Generate") { window.__quill = {click: e.timeStamp, gone: false, finished: null}; }
}, true);
new MutationObserver(() => {
  const q = window.__quill;
  if (q.click === null || q.finished !== null) return;
  const shown = [...document.querySelectorAll('.quill-status, [data-testid="stCaptionContainer"]')]
    .some((c) => c.checkVisibility() && /^finished.* tokens\\/s/.test(c.textContent));
  if (!shown) { q.gone = true; return; }  // the last run's status line must go first
  if (!q.gone) return;
  q.finished = -1;
  requestAnimationFrame(() => setTimeout(() => { q.finished = performance.now(); }, 0));
}).observe(document, {childList: true, subtree: true, characterData: true});
"""

# Between a page's run and the library's: closing the tab (Chromium) and the session (the server) take
# CPU for a moment, and the library run right after a closed page ran about 13% slower than one started
# a second later (828 against 950 tokens/s, medians of 8 alternated; docs/results.md). The library's
# rate is the model's on a quiet machine.
SETTLE_SECONDS = 1.0

# `quill generate`'s path, timed on request: a line on stdin, a rate on stdout (the model stays loaded).
LIBRARY_RATE = """
import sys, time
from quillgpt.checkpoint import load_model
from quillgpt.generate import stream
from quillgpt.sampling import SamplingParams
m = load_model(sys.argv[1], weights="auto")
params = SamplingParams(max_new_tokens=int(sys.argv[2]), seed=1)
next(stream(m.model, m.tokenizer, "ROMEO:", SamplingParams(max_new_tokens=2)))  # the kernels' first load
print("ready", flush=True)
for _ in sys.stdin:
    t0 = time.perf_counter()
    n = sum(1 for _ in stream(m.model, m.tokenizer, "ROMEO:", params))
    print(f"{int(sys.argv[2]) / (time.perf_counter() - t0):.1f}", flush=True)
"""


def default_threads_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def playground(models: list[str], env: dict[str, str], checkout: Path | None = None) -> Iterator[str]:
    """`quill playground`'s server on a free port until the block ends; its URL. With `checkout`, the
    page and the package of that other checkout of this repository."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = streamlit_command(models, port=port)
    if checkout is not None:
        # what that checkout's `quill playground` runs: its server, or its page before the page had routes
        server = checkout / SERVER.relative_to(REPO)
        cmd[cmd.index(str(SERVER))] = str(server if server.is_file() else checkout / PAGE.relative_to(REPO))
        env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), env.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "streamlit.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=checkout)
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"streamlit did not start:\n{log_path.read_text()}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/_stcore/health", timeout=1).text == "ok":
                        break
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1440, "height": 1100})
    page.add_init_script(TIMING_JS)
    page.goto(url)
    page.get_by_label("Prompt").wait_for(timeout=120_000)
    return page


def set_field(page, role: str, name: str, value: str) -> None:
    box = page.get_by_role(role, name=name)
    box.fill(value)
    box.press("Enter")


def click_to_finished(page) -> tuple[int, float, str]:
    """Click Generate, wait for "finished": (tokens, seconds from the click to the painted status, status line)."""
    page.wait_for_timeout(300)  # the widgets' reruns settle
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_function("() => window.__quill.finished > 0", timeout=300_000, polling=100)
    q = page.evaluate("window.__quill")
    status = page.get_by_text(re.compile(r"^finished.* tokens/s$")).inner_text()
    n = int(re.search(r"(\d+) tokens ·", status).group(1))
    return n, (q["finished"] - q["click"]) / 1000, status


def page_then_library(browser, url: str, tokens: int, library_run) -> tuple[float, str, float]:
    """One fresh page's Generate, then the library's run once the closed page has settled:
    (the page's tokens/s from the click to "finished" painted, its status line, the library's tokens/s)."""
    page = open_page(browser, url)
    set_field(page, "textbox", "Seed", "1")
    set_field(page, "spinbutton", "Max new tokens", str(tokens))
    n, seconds, status = click_to_finished(page)
    assert n == tokens, status
    page.close()
    time.sleep(SETTLE_SECONDS)  # Chromium closing the tab, the server dropping its session
    return n / seconds, status, library_run()


def against(args, env: dict[str, str], library_run, browser_type, cpu: dict) -> None:
    """`--against DIR`: this checkout's page and DIR's, fresh pages taken in turn (which goes first
    alternates by round), each paired with a library run; a change to the page measured within one
    sitting, where separate sittings drift by more than most changes are worth."""
    other = Path(args.against).resolve()
    if not (other / PAGE.relative_to(REPO)).is_file():
        raise SystemExit(f"--against {other}: no {PAGE.relative_to(REPO)} there")
    ratios: dict[str, list[float]] = {"this": [], "against": []}
    with playground([args.model], env) as this_url, playground([args.model], env, other) as other_url:
        browser = browser_type.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            sides = [("this", this_url), ("against", other_url)]
            for url in (this_url, other_url):  # each server's first Generate (its first rerun) is not timed
                page_then_library(browser, url, args.tokens, library_run)
            for i in range(args.runs):
                for name, url in sides if i % 2 == 0 else sides[::-1]:
                    page, _, library = page_then_library(browser, url, args.tokens, library_run)
                    ratios[name].append(page / library)
                print(f"round {i + 1}: this {ratios['this'][-1]:.0%}, against {ratios['against'][-1]:.0%}", flush=True)
        finally:
            browser.close()
    diffs = [a - b for a, b in zip(ratios["this"], ratios["against"])]
    for name, label in (("this", str(REPO)), ("against", str(other))):
        print(f"{label}: page / library median {statistics.median(ratios[name]):.1%} "
              f"({', '.join(f'{r:.0%}' for r in ratios[name])})")  # fmt: skip
    print(f"this - against, round by round: median {statistics.median(diffs):+.1%}; "
          f"this ahead in {sum(d > 0 for d in diffs)} of {len(diffs)} rounds")  # fmt: skip
    record = {
        "benchmark": "playground_against",
        "model": args.model,
        "tokens": args.tokens,
        "against": str(other),
        "this_over_library_per_run": [round(r, 3) for r in ratios["this"]],
        "against_over_library_per_run": [round(r, 3) for r in ratios["against"]],
        "this_over_library": round(statistics.median(ratios["this"]), 3),
        "against_over_library": round(statistics.median(ratios["against"]), 3),
        "median_difference": round(statistics.median(diffs), 3),
        **cpu,
    }
    print(json.dumps(record))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shakespeare-char")
    ap.add_argument("--other", default="shakespeare-speedrun", help="the model selected for first-vs-second")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--against", metavar="DIR", help="another checkout: its page and this one's, in turn (an A/B)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    env = default_threads_env()
    cpu = cpu_info()
    print(f"CPU: {cpu['cpu']} ({os.cpu_count()} cores), server and library at default threads")
    cmd = [sys.executable, "-c", LIBRARY_RATE, args.model, str(args.tokens)]
    library_proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert library_proc.stdout.readline().strip() == "ready"

    def library_run() -> float:
        library_proc.stdin.write("go\n")
        library_proc.stdin.flush()
        return float(library_proc.stdout.readline())

    pages, library, statuses, first_second = [], [], [], None
    try:
        if args.against:
            with sync_playwright() as pw:
                against(args, env, library_run, pw.chromium, cpu)
            return
        with playground([args.model, args.other], env) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                for _ in range(args.runs):
                    one_page, status, one_library = page_then_library(browser, url, args.tokens, library_run)
                    pages.append(one_page)
                    statuses.append(status)
                    library.append(one_library)
                page = open_page(browser, url)
                page.get_by_role("combobox", name="Model").first.click()
                page.get_by_role("option", name=args.other).click()
                page.get_by_role("heading", name=args.other).wait_for(timeout=120_000)  # its card: loaded
                set_field(page, "textbox", "Seed", "1")
                set_field(page, "spinbutton", "Max new tokens", str(args.tokens))
                first = click_to_finished(page)
                second = click_to_finished(page)
                first_second = (first[1], second[1])
            finally:
                browser.close()
    finally:
        library_proc.stdin.close()
        library_proc.wait(timeout=30)
    ratios = [p / q for p, q in zip(pages, library)]
    page_rate, library_rate, ratio = statistics.median(pages), statistics.median(library), statistics.median(ratios)
    print(f"model {args.model}, {args.tokens} tokens, seed 1, prompt ROMEO:")
    print(f"page, click to finished painted: {', '.join(f'{r:.0f}' for r in pages)} tokens/s (median {page_rate:.0f})")
    print(f"page's status lines: {' | '.join(statuses)}")
    print(f"library (stream, first token included), each a second after the page's run: "
          f"{', '.join(f'{r:.0f}' for r in library)} tokens/s (median {library_rate:.0f})")  # fmt: skip
    print(f"page / library, run by run: {', '.join(f'{r:.0%}' for r in ratios)}; median {ratio:.0%} (target ≥ 80%)")
    f, s = first_second
    print(f"{args.other}: first Generate after selecting it {f:.2f} s, second {s:.2f} s ({f / s:.2f}×; target ≤ 1.2×)")
    record = {
        "benchmark": "playground",
        "model": args.model,
        "tokens": args.tokens,
        "page_tokens_per_s": [round(r, 1) for r in pages],
        "library_tokens_per_s": library,
        "page_over_library_per_run": [round(r, 3) for r in ratios],
        "page_over_library": round(ratio, 3),
        "first_generate_s": round(f, 3),
        "second_generate_s": round(s, 3),
        "first_over_second": round(f / s, 3),
        **cpu,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
