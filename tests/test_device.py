import platform
import subprocess
import sys

import pytest
import torch

from quillgpt.device import (
    CUDA_PEAK_BF16_FLOPS,
    cuda_peak_bf16_flops,
    keep_freed_memory,
    peak_matmul_flops,
    release_freed_memory,
)


def test_a_gpu_name_finds_its_own_row_not_a_shorter_one_it_contains():
    table = dict(CUDA_PEAK_BF16_FLOPS)
    assert cuda_peak_bf16_flops("NVIDIA H100 PCIe") == table["H100 PCIe"] != table["H100"]
    assert cuda_peak_bf16_flops("NVIDIA H100 80GB HBM3") == table["H100"]
    assert cuda_peak_bf16_flops("NVIDIA L40S") == table["L40S"] != table["L4"]
    assert cuda_peak_bf16_flops("Tesla V100-SXM2-16GB") is None  # no bfloat16 tensor cores: no MFU


def test_cpu_peak_is_measured_in_the_dtype_the_run_computes_in():
    cpu = torch.device("cpu")
    assert peak_matmul_flops(cpu, "float32") > 0
    assert peak_matmul_flops(torch.device("meta"), "bfloat16") is None


# A training step's pattern, on the C allocator torch's CPU tensors come from: buffers of megabytes
# allocated and written, all freed, again. Prints the page faults of ten rounds after three warm-up ones.
ROUNDS = """
import ctypes, resource, sys
from quillgpt.device import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 12 * 1024 * 1024
def step():
    bufs = [libc.malloc(SIZE) for _ in range(4)]
    for b in bufs:
        ctypes.memset(b, 1, SIZE)
    for b in reversed(bufs):
        libc.free(b)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_memory_is_kept_for_the_next_step_instead_of_faulted_in_again():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout)

    pages = 10 * 4 * 12 * 1024 * 1024 // 4096  # what ten rounds write
    assert faults("default") > pages / 2  # glibc hands the blocks back, and each round faults them in again
    assert faults("keep") < pages / 50


def test_keeping_and_releasing_freed_memory_say_whether_they_took():
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
    assert release_freed_memory() is glibc
