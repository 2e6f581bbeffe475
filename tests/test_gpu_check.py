"""scripts/gpu-check.sh, rehearsed on the CPU: every part runs at tiny shapes and passes, so on a GPU
only the GPU itself is new. The figures it prints are not checked here (they are not targets)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu-check.sh"
ALL_PARTS = {"device", "eval", "generate", "serve", "torchrun", "resume", "train-shakespeare", "train-226m"}


def run_check(shared_data: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHON": sys.executable, "QUILL_DATA_DIR": str(shared_data), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-2000:]
    return done, json.loads(lines[-1])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_cpu_rehearsal_passes_every_part(shared_data):
    done, report = run_check(shared_data, "--device", "cpu", "--quick", timeout=590)
    parts = report["parts"]
    assert set(parts) == ALL_PARTS
    failed = {name: p.get("reason") for name, p in parts.items() if p["status"] != "pass"}
    assert failed == {}, done.stdout[-3000:]  # nothing is skipped on a CPU: torchrun runs over gloo there
    assert done.returncode == 0
    assert parts["torchrun"]["backend"] == "gloo"
    assert parts["resume"]["bitwise"] and 0 < parts["resume"]["stopped_at"] < parts["resume"]["steps"]
    assert parts["generate"]["greedy_equal_b16_rows"] == 16
    assert parts["train-226m"]["last_loss"] < parts["train-226m"]["first_loss"] + 0.5
    assert all(line.split()[0] in ALL_PARTS for line in done.stdout.splitlines()[1:9])  # one human line per part


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: the parts would run")
def test_cuda_parts_without_cuda_are_skipped_with_a_reason(shared_data):
    done, report = run_check(shared_data, "--device", "cuda", "--only", "device,torchrun", timeout=120)
    assert done.returncode == 0
    assert {name: p["status"] for name, p in report["parts"].items()} == {"device": "skip", "torchrun": "skip"}
    assert all(p["reason"] == "CUDA is not available here" for p in report["parts"].values())
