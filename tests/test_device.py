import torch

from quillgpt.device import CUDA_PEAK_BF16_FLOPS, cuda_peak_bf16_flops, peak_matmul_flops


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
