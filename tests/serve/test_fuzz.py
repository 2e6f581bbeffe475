"""Property-based fuzzing of a real `quill serve` through its own OpenAPI schema (schemathesis).

Every route, a fixed seed: requests valid and invalid by the schema, odd bodies, headers and query
strings. The server must never answer 5xx, and every response must match the schema (status code,
content type, body, each server-sent event). `SCHEMATHESIS_MAX_EXAMPLES=500` runs it longer.

Then every check schemathesis has, once with no API key and once with one (the fuzzer given the
key): the schema must tell the truth about authentication, so no check may report an auth finding.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25"))
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
# Small caps keep each generated request cheap; the schema states them, so the fuzzer stays inside.
LIMITS = {"QUILL_MAX_TOKENS_CAP": "8", "QUILL_MAX_CHOICES": "3", "QUILL_MAX_PROMPT_CHARS": "256"}
KEY = "fuzz-key"
# The all-checks runs: fewer examples, as they add the coverage and stateful phases and run twice.
ALL_CHECKS_EXAMPLES = min(MAX_EXAMPLES, 10)
# The one finding the all-checks runs accept: a request the schema allows but the server refuses with
# a 4xx, for the limits the schema cannot state (across fields, the model's vocabulary): see openapi.py.
ACCEPTED = {"ST202"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serving(tmp_path: Path, env_extra: dict[str, str]):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUILL_") or k == "QUILL_DATA_DIR"}
    env |= LIMITS | env_extra | {"OMP_NUM_THREADS": "1"}
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


@pytest.fixture
def quill_serve(tmp_path):
    with _serving(tmp_path, {}) as served:
        yield served


def _schemathesis(url: str, tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess, float]:
    command = [
        BIN / "schemathesis", "run", url + "/openapi.json", "--seed", "0", "--workers", "1",
        "--generation-database", "none", "--no-color", "--request-timeout", "30", *options,
    ]  # fmt: skip
    started = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    return run, time.monotonic() - started


def test_fuzzing_finds_no_5xx_and_no_schema_violation(quill_serve, tmp_path):
    url, server_log = quill_serve
    run, seconds = _schemathesis(url, tmp_path, "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES))
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    generated = re.search(r"(\d+) generated", report)
    operations = re.search(r"Tested: (\d+)", report)
    assert generated and operations, report[-3000:]
    paths = httpx.get(url + "/openapi.json").json()["paths"]
    assert int(operations.group(1)) == sum(len(methods) for methods in paths.values())  # every route
    assert "Traceback" not in server_log.read_text()
    print(f"schemathesis: {generated.group(1)} requests over {operations.group(1)} operations in {seconds:.0f} s")


@pytest.mark.parametrize("key", [None, KEY], ids=["no-key", "key"])
def test_every_check_finds_no_authentication_finding(tmp_path, key):
    """With no key the schema declares no `Authorization` (else every route is "missing a required
    header"); with a key, the routes that check it declare the bearer scheme, and answer 401 without it."""
    env = {"QUILL_KERNELS": "0"} | ({"QUILL_API_KEY": key} if key else {})  # auth needs no C++ kernel build
    auth = ["--header", f"Authorization: Bearer {key}"] if key else []
    with _serving(tmp_path, env) as (url, server_log):
        run, seconds = _schemathesis(
            url, tmp_path, "--checks", "all", "--max-examples", str(ALL_CHECKS_EXAMPLES), *auth
        )
    report = run.stdout + run.stderr
    summary = report[report.rindex("SUMMARY") :] if "SUMMARY" in report else report[-3000:]
    assert re.search(r"Tested: \d+", summary), report[-3000:]
    findings = set(re.findall(r"(ST\d{3}) [^\n:]+: \d+", summary))
    auth_findings = re.findall(r"API accepts [^\n]*authentication|Missing [^\n]*Authorization[^\n]*", report)
    assert not auth_findings, summary
    assert findings <= ACCEPTED, summary
    assert run.returncode == (1 if findings else 0), report[-3000:]
    assert "Traceback" not in server_log.read_text()
    print(f"schemathesis, all checks, {'a key' if key else 'no key'}: {sorted(findings)} in {seconds:.0f} s")
