"""FBGEMM's float16-weight matmul, which `Int8Linear` uses for batches on CPUs without native
bfloat16, called through the dispatcher's own entry point where it can be."""

from __future__ import annotations

import functools

import torch


def fbgemm_half() -> bool:
    """Whether this PyTorch has FBGEMM's float16-weight matmul (x86 builds, CPUs with AVX2) and it
    is the quantized engine in use (packing refuses under "onednn" or "qnnpack")."""
    return (
        "fbgemm" in torch.backends.quantized.supported_engines
        and torch.backends.quantized.engine in ("x86", "fbgemm")
        and hasattr(torch.ops.quantized, "linear_dynamic_fp16")
    )


_dispatch_call_boxed = getattr(torch._C, "_dispatch_call_boxed", None)


def fbgemm_half_linear(x: torch.Tensor, packed, relu: bool = False) -> torch.Tensor:
    """FBGEMM's float16-weight matmul of float32 rows x (N, in) by a `linear_prepack_fp16` weight,
    relu applied as it writes if asked: `quantized::linear_dynamic_fp16` (`linear_relu_dynamic_fp16`).

    Called through `torch.ops`, each call first runs PyTorch's Python-side checks of the packed
    weight (a TorchScript object) for `__torch_function__`, which raise and catch C++ exceptions:
    a cost of the same order as a small matmul, paid by every layer of every decode step. Plain
    tensors skip those checks through the dispatcher's own entry point
    (`torch._C._dispatch_call_boxed`); tensor subclasses (fake tensors, `__torch_function__`
    overrides) keep `torch.ops`.
    """
    op, handle = _fbgemm_half_op(relu)
    if _dispatch_call_boxed is None or type(x) is not torch.Tensor:
        return op(x, packed)
    return _dispatch_call_boxed(handle, x, packed)


@functools.cache
def _fbgemm_half_op(relu: bool):
    op = torch.ops.quantized.linear_relu_dynamic_fp16 if relu else torch.ops.quantized.linear_dynamic_fp16
    return op.default, op.default._handle
