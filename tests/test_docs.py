"""Docs that cannot rot: every shell command in README.md and docs/*.md runs, or is listed here as not run.

The commands are collected from fenced ```bash, ```sh and ```console blocks (console: the lines that
start with `$ `). Each command is in exactly one table below, else the listing test fails:

- RUN: run as written, and must exit 0.
- SHORTENED: a long command (a 20-minute training) run with the override beside it, and its reason.
- SERVERS: a long-running server, started as written until its URL answers, then stopped with Ctrl-C.
- NOT_RUN: not run, with the reason (hours of training, a GPU, containers, a browser, the suite itself).

Each block runs in order in a fresh folder that looks like a checkout (links to the repository's files,
`../shared/data` linked to the data, `.venv` to this venv, `quill` on PATH, its own cache), so what a
command writes (`runs/`, `docs/figures/`, the dataset cache) lands in the temporary folder. `NAME=value`
lines are exported to the rest of their block. The C++ kernels are off (QUILL_KERNELS=0): their build
is tested in tests/test_kernels.py and would only slow this down.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
VENV = Path(sys.prefix)
DATA_DIR = Path(os.environ.get("QUILL_DATA_DIR") or REPO.parent / "shared" / "data")
SHELL_FENCES = {"bash", "sh", "shell", "console"}
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")
MAKE = f"make -o {VENV}/.installed VENV={VENV}"  # this venv, never reinstalled

RUN = {
    "quill data list",
    "quill data get tinyshakespeare --from ../shared/data",
    'quill generate --model runs/mine --prompt "JULIET:"',
    "quill eval models/harpoon --data novel.txt --split all --json",
    "quill eval models/harpoon --data novel.txt --split all --stride 128 --json",
    "quill eval models/harpoon --data novel.txt --split all --adapt --json",
    "quill eval runs/ft-blake --data $B --json",
    "python -m quillgpt.serve --help",
}
_TINY = (
    "--data my.txt --set batch_size=4 --set max_iters=2 --set eval_interval=1 --set eval_iters=1 --set compile=false"
)
SHORTENED = {  # docs command: (the command run here, why)
    "quill train --data my.txt --minutes 20": (
        "quill train --data my.txt --minutes 0.1",
        "20 minutes of training: the same recipe for 6 seconds",
    ),
    "quill train configs/shakespeare-char.json --out runs/mine": (
        f"quill train configs/shakespeare-char.json --out runs/mine {_TINY}",
        "48 minutes of training: 2 small steps of the same config, on a short text",
    ),
    "quill train configs/shakespeare-char.json --out runs/mine --resume": (
        "quill train configs/shakespeare-char.json --out runs/mine --resume " + _TINY.replace("iters=2", "iters=3"),
        "resumes the 2-step run for 1 more step",
    ),
    "quill train configs/harpoon.json --init-from harpoon --data $B --out runs/ft-blake --set max_minutes=5 "
    "--set compile=false --set eval_interval=5 --set eval_iters=10": (
        "quill train configs/harpoon.json --init-from harpoon --data $B --out runs/ft-blake --set max_minutes=5 "
        "--set compile=false --set eval_interval=1 --set eval_iters=1 --set max_iters=1 --set batch_size=2",
        "5 minutes of fine-tuning: 1 small step",
    ),
    "make figures MODEL=shakespeare-speedrun": (
        f"{MAKE} figures MODEL=shakespeare-speedrun",
        "as written, with this venv for the Makefile's",
    ),
}
SERVERS = {  # docs command: (the command run here, the URL that must answer)
    "make run": (f"{MAKE} PORT={{port}} run", "http://127.0.0.1:{port}"),
    "quill serve": ("quill serve --port {port}", "http://127.0.0.1:{port}/ready"),
}
NOT_RUN = {
    "make test": "the test suite this test is part of",
    "quill train configs/harpoon.json --out runs/harpoon-bpe --set threads=1": "100 minutes of training",
    "quill train configs/harpoon-char.json --out runs/harpoon-char --set threads=1": "100 minutes of training",
    "quill eval models/harpoon --data gutenberg --json": "the 13.8M model over 600 kB of text: minutes on 2 cores",
    "quill eval models/harpoon --data gutenberg --layout paragraph --json": "as above, re-flowed",
    "quill train configs/harpoon.json --data $B --out runs/scratch-blake --set max_minutes=5 --set compile=false "
    "--set eval_interval=5 --set eval_iters=10": "5 minutes; the fine-tuning beside it runs, shortened",
    "quill train --data $B --minutes 5 --out runs/recipe-blake": "5 minutes; the recipe runs shortened above",
    "quill playground": "a long-running server: the same page as `make run`, which runs here",
    "quill playground --model path/to/model": "a long-running server, and path/to/model is the reader's",
    "quill playground --api-url http://127.0.0.1:8080": "a long-running server that needs a running `quill serve`",
    "streamlit run app.py -- --model path/to/model": "a long-running server; the browser test runs it (its first test)",
    ".venv/bin/python -m pytest tests/test_playground.py": "part of `make test`",
    ".venv/bin/python -m pytest tests/test_playground_live.py": "part of `make test`",
    ".venv/bin/python -m pytest tests/test_playground_train.py": "part of `make test`",
    ".venv/bin/python -m pytest tests/e2e/test_playground_browser.py": "part of `make test` (needs Chromium)",
    "QUILL_SCREENSHOT_MODEL=shakespeare-char QUILL_SCREENSHOT_TO=docs/figures/playground.png "
    ".venv/bin/python -m pytest tests/e2e/test_playground_browser.py": "needs Chromium; redraws a docs figure",
    "for m in 5 10; do quill train --data tinyshakespeare --minutes $m --out runs/recipe-ts-$m; done": (
        "15 minutes of training"
    ),
    "for m in 5 10 20; do quill train --data gutenberg --minutes $m --out runs/recipe-gutenberg-$m "
    "quill train --data tinystories --minutes $m --out runs/recipe-tinystories-$m done": "70 minutes of training",
    "quill serve --model shakespeare-char --model fast=runs/tiny --port 9000": (
        "a long-running server; runs/tiny is the reader's model"
    ),
    "python main.py": "a long-running server: `quill serve` under its original name (tests/serve/test_server.py)",
    "QUILL_API_KEY=s3cret QUILL_HOST=0.0.0.0 quill serve": "a long-running server on every interface",
    "./run.sh start-dev": "needs podman or docker",
    "./run.sh logs [api]": "needs podman or docker",
    "./run.sh stop-dev": "needs podman or docker",
    "docker run -p 8080:8080 -e QUILL_API_KEY=s3cret quillgpt:latest": "needs docker and the built image",
    "python benchmarks/serve.py --model shakespeare-char --clients 1,16 --duration 30": "a 1-minute benchmark",
    "python benchmarks/serve.py --model shakespeare-char --clients 64 --duration 60": "a 1-minute soak",
}


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    commands: tuple[str, ...]  # assignments (NAME=value) included, in order


def _strip_comment(line: str) -> str:
    """`line` without its `# comment` (a # at the start or after a space, outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _commands(body: str, console: bool) -> list[str]:
    """Whole commands: comments dropped, `\\` continuations and for/do...done loops joined, spaces squeezed."""
    lines = body.splitlines()
    if console:
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    commands, pending, depth = [], "", 0
    for raw in lines:
        line = _strip_comment(raw)
        if not line and not pending:
            continue
        continued = line.endswith("\\")
        pending = f"{pending} {line.removesuffix(chr(92))}".strip()
        words = re.findall(r"[^\s;]+", line)
        depth += sum(w == "do" for w in words) - sum(w == "done" for w in words)
        if not continued and depth == 0 and pending:
            commands.append(" ".join(pending.split()))
            pending = ""
    assert not pending, f"an unfinished command: {pending!r}"
    return commands


def collect(paths: list[Path] = DOCS) -> list[Block]:
    blocks = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"^```([\w-]*)[^\n]*\n(.*?)^```", text, re.M | re.S):
            if m.group(1) in SHELL_FENCES:
                line = text.count("\n", 0, m.start()) + 1
                commands = _commands(m.group(2), console=m.group(1) == "console")
                if commands:
                    name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
                    blocks.append(Block(str(name), line, tuple(commands)))
    return blocks


BLOCKS = collect()


def _listed() -> dict[str, str]:
    tables = {"RUN": RUN, "SHORTENED": SHORTENED, "SERVERS": SERVERS, "NOT_RUN": NOT_RUN}
    where: dict[str, str] = {}
    for name, table in tables.items():
        for command in table:
            assert command not in where, f"{command!r} is in both {where[command]} and {name}"
            where[command] = name
    return where


def test_the_collector_reads_blocks_as_a_shell_does(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "```bash\nquill a --x 'b # c'   # comment\nquill d \\\n    --e f\n\nX=1\n"
        "for m in 1 2; do\n  echo $m\ndone\n```\n"
        "```python\nprint(1)\n```\n"
        "```console\n$ quill g\noutput\n```\n"
    )
    assert [b.commands for b in collect([doc])] == [
        ("quill a --x 'b # c'", "quill d --e f", "X=1", "for m in 1 2; do echo $m done"),
        ("quill g",),
    ]


def test_every_docs_command_is_run_or_listed():
    """A command new to the docs must be run here or listed as not run; a listed one the docs lost, removed."""
    listed = _listed()
    in_docs = {c for b in BLOCKS for c in b.commands if not ASSIGNMENT.fullmatch(c)}
    new = sorted(f"{b.doc}:{b.line}: {c}" for b in BLOCKS for c in b.commands if c in in_docs - set(listed))
    assert not new, "commands in the docs that this test neither runs nor lists:\n" + "\n".join(new)
    stale = sorted(set(listed) - in_docs)
    assert not stale, f"listed here but no longer in the docs: {stale}"
    assert all(reason for reason in NOT_RUN.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workspace(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A folder that looks like a checkout, with `../shared/data`; the environment to run commands in."""
    work = tmp_path / "repo"
    work.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in {".git", ".venv", "docs", "runs"}:
            (work / entry.name).symlink_to(entry)
    (work / "docs").mkdir()
    (work / "docs" / "figures").mkdir()  # make figures writes here, not into the checkout
    (work / ".venv").symlink_to(VENV)
    (tmp_path / "shared").mkdir()
    if DATA_DIR.is_dir():
        (tmp_path / "shared" / "data").symlink_to(DATA_DIR)
    text = (REPO / "models" / "shakespeare-char" / "README.md").read_text()  # for the reader's own texts
    (work / "my.txt").write_text((text * 10)[:20_000])
    (work / "novel.txt").write_text(text[:3_000])
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUILL_")}
    env |= {
        "PATH": f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "QUILL_CACHE_DIR": str(tmp_path / "cache"),
        "QUILL_DATA_DIR": str(tmp_path / "shared" / "data"),
        "QUILL_KERNELS": "0",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }
    return work, env


def _run_server(command: str, url: str, work: Path, env: dict[str, str], log: Path) -> None:
    with log.open("w") as out:
        server = subprocess.Popen(
            command, shell=True, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{command}: {url} did not answer in 90 s\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C, to the whole process group as a terminal sends it
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            pytest.fail(f"{command}: still running 30 s after Ctrl-C")


def _needs_data(block: Block) -> bool:
    return any("shared/data" in c or "$B" in c for c in block.commands)


RUNNABLE = [b for b in BLOCKS if any(c in RUN or c in SHORTENED or c in SERVERS for c in b.commands)]


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"{b.doc}:{b.line}" for b in RUNNABLE])
def test_docs_block_runs(block, tmp_path):
    if _needs_data(block) and not DATA_DIR.is_dir():
        pytest.skip(f"needs the datasets in {DATA_DIR}")
    work, env = _workspace(tmp_path)
    for command in block.commands:
        if ASSIGNMENT.fullmatch(command):
            name, value = command.split("=", 1)
            env[name] = value
        elif command in SERVERS:
            run, url = SERVERS[command]
            port = _free_port()
            log = tmp_path / "server.log"
            _run_server(run.format(port=port), url.format(port=port), work, env, log)
            if command == "make run":  # the README promises the URL on the terminal
                assert f"http://127.0.0.1:{port}" in log.read_text()
        elif command in RUN or command in SHORTENED:
            run = SHORTENED[command][0] if command in SHORTENED else command
            done = subprocess.run(
                run, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=240, executable="bash"
            )
            assert done.returncode == 0, f"{block.doc}:{block.line}: {run}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
