"""The hardware: which device to run on ("auto" picks CUDA, then Apple's MPS, then the CPU), the
precision training computes in there, what it can do (its matmul peak: measured on a CPU, the
vendor's dense bfloat16 figure on a GPU), and how a CPU process keeps the memory it trains in, and
hands it back."""

from __future__ import annotations

import ctypes
import platform
import time
from contextlib import nullcontext
from pathlib import Path

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


CUDA_PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
)
"""Dense bfloat16 tensor-core FLOP/s from NVIDIA's data sheets, by a part of the device name; the first
match wins, so a specific name sits above the shorter one it contains."""


def cuda_peak_bf16_flops(name: str) -> float | None:
    """The data-sheet bfloat16 peak of the GPU called `name` (torch.cuda.get_device_name), or None."""
    return next((flops for part, flops in CUDA_PEAK_BF16_FLOPS if part in name), None)


def peak_matmul_flops(device: torch.device, dtype: str) -> float | None:
    """The MFU denominator for a run on `device` computing in `dtype`: on a CPU, its matmul peak
    measured now in that dtype; on a GPU, its data-sheet bfloat16 peak (None for an unlisted GPU,
    or float32, whose peak depends on TF32 settings); None elsewhere."""
    if device.type == "cpu":
        return measure_matmul_peak(0.3, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    if device.type == "cuda" and dtype in ("bfloat16", "auto") and torch.cuda.is_bf16_supported():
        return cuda_peak_bf16_flops(torch.cuda.get_device_name(device))
    return None


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


def cpu_model() -> str:
    """The processor's name ("AMD EPYC", "Intel(R) Xeon(R) ..."): what every speed figure names, and
    what a throughput measurement is remembered for."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


# glibc's mallopt parameters (malloc.h), and its ceiling on the mmap threshold on 64-bit machines
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory torch frees for its next allocations, rather than hand it back
    to the kernel; True where it took (Linux with glibc), False elsewhere.

    A training step frees and allocates the same activation buffers every step, megabytes each. By
    default glibc hands such memory back: blocks above its mmap threshold are unmapped when freed, and
    the free top of its heap is trimmed once it passes the trim threshold. So every step faults its
    buffers in again, and a few steps timed right after another process freed memory ran far slower
    than the run that followed (docs/results.md). With blocks up to glibc's ceiling (32 MB on 64-bit)
    served from the heap and the heap never trimmed, the steps after the second fault little. The
    process keeps the peak of what it allocated, until `release_freed_memory`."""
    if (libc := _glibc()) is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    served_from_heap = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    never_trimmed = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return bool(served_from_heap and never_trimmed)


def release_freed_memory() -> bool:
    """Hand back to the kernel, once, the memory malloc holds free (glibc's `malloc_trim`); True where it
    ran (Linux with glibc), False elsewhere.

    For a process that timed training steps and lives on, such as the playground's server, which times
    shapes to plan a run. Without it, that process would keep the steps' peak: most of it is free memory
    that torch's threads leave in malloc arenas of their own (docs/results.md)."""
    if (libc := _glibc()) is None:
        return False
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    libc.malloc_trim(0)
    return True


def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc, whose malloc the two functions above tune; None elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None
