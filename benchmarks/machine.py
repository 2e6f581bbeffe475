"""What machine a benchmark ran on, and how fast it reads memory: every benchmark prints both.

The CPU changes between runs of this project (Intel Xeon with AVX-512 and AMX, AMD EPYC with AVX2
or AVX-512), and the same code can be 3x faster on one than on another; figures without the CPU
named next to them cannot be compared.
"""

from __future__ import annotations

import time

import torch

from quillgpt.device import cpu_model

VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_info() -> dict:
    """CPU model, its vector extensions of interest, and the threads PyTorch uses."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {
        "cpu": cpu_model(),
        "vector_extensions": [f for f in VECTOR_FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def describe(info: dict) -> str:
    return (
        f"CPU: {info['cpu']} ({', '.join(info['vector_extensions']) or 'no AVX2'}; "
        f"torch {info['torch']} dispatches {info['torch_cpu_capability']}), {info['threads']} threads"
    )


def memory_read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second at which this process reads memory: summing a tensor far larger than the
    caches (the best of a few runs), with all of PyTorch's threads."""
    x = torch.ones(mib * 2**20 // 4)
    x.sum()  # touch every page once
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best
