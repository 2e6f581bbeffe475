"""The hardware: which device to run on ("auto" picks CUDA, then Apple's MPS, then the CPU), the
precision training computes in there, and what it can do (its measured matmul peak)."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from quillgpt.config import ConfigError


def resolve_device(name: str | None = "auto") -> torch.device:
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' was asked for but MPS is not available here")
    return device


def autocast_context(dtype: str, device: torch.device):
    """The context the forward and backward passes run in: bfloat16 autocast, or nothing (float32)."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def measure_matmul_peak(seconds: float = 1.0, n: int = 1024, dtype: torch.dtype = torch.float32) -> float:
    """Matmul FLOP/s of this machine in `dtype`, measured now (the MFU denominator on CPU: a run whose
    matmuls ran in bfloat16 is measured against the bfloat16 peak, not float32's)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)
