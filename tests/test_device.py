import platform

import pytest
import torch

from quillgpt.device import CUDA_PEAK_BF16_FLOPS, cuda_peak_bf16_flops, peak_matmul_flops
from tests.conftest import run_python


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
# allocated and written, all freed, again. Prints the page faults of ten rounds after three warm-up
# ones, then the resident MB before and after `release_freed_memory`.
ROUNDS = """
import ctypes, resource, sys
from quillgpt.device import keep_freed_memory, release_freed_memory
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
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
faults, kept = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, resident()
assert release_freed_memory()
print(faults, kept, resident())
"""


def rounds(mode: str) -> tuple[int, float, float]:
    """ROUNDS in a fresh process: its faults, and its resident MB kept and after the release."""
    faults, kept, released = run_python(ROUNDS, mode).split()
    return int(faults), float(kept), float(released)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_memory_is_kept_for_the_next_step_instead_of_faulted_in_again():
    default, kept = rounds("default")[0], rounds("keep")[0]
    assert default >= 10 * 4  # glibc hands the blocks back, and each round faults them in again
    assert kept < default / 20


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_released_memory_goes_back_to_the_kernel():
    _, kept, released = rounds("keep")
    assert kept - released > 40  # of the 48 MB written and freed


def test_keeping_and_releasing_freed_memory_say_whether_they_took():
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    took = "from quillgpt.device import keep_freed_memory as k, release_freed_memory as r; print(k(), r())"
    assert run_python(took).split() == [str(glibc), str(glibc)]
