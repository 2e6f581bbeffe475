"""Property-based fuzzing of a real `quill serve` through its own OpenAPI schema (schemathesis).

Every route, a fixed seed: requests valid and invalid by the schema, odd bodies, headers and query
strings. The server must never answer 5xx, and every response must match the schema (status code,
content type, body, each server-sent event). `SCHEMATHESIS_MAX_EXAMPLES=500` runs it longer.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25"))
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
# Small caps keep each generated request cheap; the schema states them, so the fuzzer stays inside.
LIMITS = {"QUILL_MAX_TOKENS_CAP": "8", "QUILL_MAX_CHOICES": "3", "QUILL_MAX_PROMPT_CHARS": "256"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def quill_serve(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUILL_") or k == "QUILL_DATA_DIR"}
    env |= LIMITS | {"OMP_NUM_THREADS": "1"}
    command = [BIN / "quill", "serve", "--model", "shakespeare-char", "--port", str(port), "--torch-threads", "1"]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "quill serve did not get ready in 60 s"
            time.sleep(0.2)
        yield url, tmp_path / "serve.log"
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_fuzzing_finds_no_5xx_and_no_schema_violation(quill_serve, tmp_path):
    url, server_log = quill_serve
    command = [
        BIN / "schemathesis", "run", url + "/openapi.json",
        "--checks", CHECKS, "--seed", "0", "--max-examples", str(MAX_EXAMPLES), "--workers", "1",
        "--generation-database", "none", "--no-color", "--request-timeout", "30",
    ]  # fmt: skip
    started = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    seconds = time.monotonic() - started
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    generated = re.search(r"(\d+) generated", report)
    operations = re.search(r"Tested: (\d+)", report)
    assert generated and operations, report[-3000:]
    paths = httpx.get(url + "/openapi.json").json()["paths"]
    assert int(operations.group(1)) == sum(len(methods) for methods in paths.values())  # every route
    assert "Traceback" not in server_log.read_text()
    print(f"schemathesis: {generated.group(1)} requests over {operations.group(1)} operations in {seconds:.0f} s")
