"""`quill playground`: start the page with `streamlit run` in a subprocess.

This module does not import Streamlit (nor the page): the CLI stays quick to start, and the page
runs in Streamlit's own process, the way `streamlit run app.py` runs it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().with_name("page.py")
SERVER = PAGE.with_name("server.py")
"""What `streamlit run` runs: the page, with its own routes on the same port."""


def streamlit_command(
    models: list[str], api_url: str | None = None, host: str = "127.0.0.1", port: int = 8501
) -> list[str]:
    """`python -m streamlit run` for the page and its routes, headless on host:port, with the page's own
    arguments after `--`."""
    args: list[str] = []
    for m in models:
        p = Path(m).expanduser()
        args += ["--model", str(p.resolve()) if p.exists() else m]
    if api_url:
        args += ["--api-url", api_url]
    return [
        sys.executable, "-m", "streamlit", "run", str(SERVER),
        "--server.headless=true",
        f"--server.address={host}",
        f"--server.port={port}",
        "--browser.gatherUsageStats=false",
        "--server.fileWatcherType=none",
        "--client.toolbarMode=minimal",
        "--runner.postScriptGC=false",  # as .streamlit/config.toml says, for `streamlit run app.py`
        "--", *args,
    ]  # fmt: skip


def launch(models: list[str], api_url: str | None = None, host: str = "127.0.0.1", port: int = 8501) -> int:
    """Run the page with `streamlit run` (headless, bound to host:port) until interrupted; its exit code."""
    cmd = streamlit_command(models, api_url, host, port)
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    print(f"QuillGPT playground: http://{shown}:{port}", flush=True)
    proc = subprocess.Popen(cmd)
    try:  # a SIGTERM to us stops Streamlit too, rather than leaving it running
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.terminate())
    except ValueError:  # not the main thread: signals cannot be handled here
        previous = None
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl+C reaches Streamlit too; give it time to stop
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
