"""`Int8Linear`: a linear layer with int8 weights and a scale per output row (weight-only
quantization) for CPU decoding, and which matmul serves how many rows."""

from __future__ import annotations

import torch
import torch.nn as nn

from quillgpt.infer.fbgemm import fbgemm_half, fbgemm_half_linear
from quillgpt.infer.packed import PackedLinear
from quillgpt.kernels import int8_linear_op
from quillgpt.model import activate

KERNEL_ROWS = 4
"""Up to how many rows QuillGPT's int8 kernel multiplies float32 activations as they are, streaming the
weights from memory; past it (where it serves batches, `kernel_serves_batches`) it rounds them to
bfloat16 and multiplies tile by tile."""

HALF_ROWS = 48
"""Up to how many rows `Int8Linear` multiplies by its float16 copy: float16 was the faster at 32 rows
and oneDNN's float32 copy at 64 (docs/results.md)."""


def kernel_serves_batches() -> bool:
    """Whether `Int8Linear` multiplies prompts and batches by its int8 weights alone, with no copy
    beside them: where QuillGPT's int8 kernel is built and the CPU has AVX512-BF16. The rule: a copy
    costs twice the int8 bytes (bfloat16), so it is kept only where it is clearly faster. With
    AVX512-BF16 the kernel's bfloat16 tiles (`quillgpt/kernels/int8_linear.cpp`) are about as fast as
    oneDNN on a bfloat16 copy (faster at a few rows, on par at batches, a little slower on long
    prompts: docs/results.md); without it, the float32 tiles are not measured against the copies, so
    those CPUs keep them."""
    return torch.cpu._is_avx512_bf16_supported() and int8_linear_op() is not None


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix in int8, one float32 scale per row: each row divided by its largest magnitude / 127
    and rounded. `int8 * scale[:, None]` gives the matrix back to within half a step per entry."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(PackedLinear):
    """An inference-only `nn.Linear` whose weight is rounded to int8, one scale per output row
    (weight-only quantization: `quantize_rows`), for CPU decoding.

    A decode step reads every weight once, so int8 weights are a quarter of float32's bytes to read.
    Which matmul multiplies depends on the CPU and on how many rows come in:
    - where `kernel_serves_batches()` (QuillGPT's int8 kernel built, AVX512-BF16): that kernel
      (`quillgpt.kernels.int8_linear_op`) alone, and the int8 weights are all the layer holds. Up to
      `KERNEL_ROWS` rows (one decode step of a few sequences) float32 activations, sums and output;
      past them (prompts, larger batches) the activations rounded to bfloat16 as a bfloat16 copy
      would, each tile of weights widened once and reused by every row, float32 sums and output;
    - elsewhere up to `KERNEL_ROWS` rows that kernel (float32 throughout) where it is built, else
      up to `few_rows` rows PyTorch's weight-only int8 matmul (`aten._weight_int8pack_mm`) against
      bfloat16 activations; past a few rows (prompts, large batches), the `PackedLinear` it also
      is, holding the same rounded weight in bfloat16 where the CPU has it natively and float32
      elsewhere: both paths re-read the int8 weight for each few rows, and the packed copy reads it
      once (QuillGPT's kernel multiplies float32 tiles there too, but against these copies on such
      CPUs it is unmeasured, so they stay).
    The copy and PyTorch's int8 kernel round their products to bfloat16 (as the bfloat16 weights
    path does); `forward` returns the input's dtype, `activated` float32 from QuillGPT's kernel, the
    input's from PyTorch's, the copy's past them.

    Without native bfloat16 (AVX2-only CPUs) the copy is float32, and a batch of 5 to `HALF_ROWS`
    rows (a batched decode step; where QuillGPT's kernel is not in use, 1 to `HALF_ROWS` for layers
    PyTorch's int8 kernel cannot take) is faster through a third copy in float16, FBGEMM's
    half-precision matmul (`fbgemm_half_linear`: float32 sums, the rounded weight to float16's
    11 bits), which returns float32. That copy costs half the float32 copy's bytes on top, so it is
    made only on those CPUs (docs/results.md has the speeds).
    """

    def __init__(self, linear: nn.Linear, keep_weight: bool = False):
        native = native_bfloat16()
        qweight, scale = quantize_rows(linear.weight)
        scale = scale.to(torch.bfloat16)
        self.float16_copy = None  # FBGEMM's packed float16 copy, where it helps (the class docstring)
        if kernel_serves_batches():
            super().__init__(linear, torch.bfloat16, keep_weight=keep_weight, pack=False)
            self.qweight, self.scale, self.few_rows = qweight, scale, 0
            return
        rounded = qweight.float() * scale.float()[:, None]
        super().__init__(linear, torch.bfloat16 if native else None, values=rounded, keep_weight=keep_weight)
        self.qweight, self.scale = qweight, scale
        if not native and fbgemm_half() and rounded.abs().max() < torch.finfo(torch.float16).max:
            bias = None if self.bias is None else self.bias.detach().float()
            self.float16_copy = torch.ops.quantized.linear_prepack_fp16(rounded, bias)
        # PyTorch's int8 kernel reads its input 16 values at a time and returns garbage for other widths
        # (PyTorch 2.13: NaN or a crash at 24 or 1,020 inputs on AVX-512); those layers take a copy.
        self.few_rows = (4 if native or self.float16_copy is not None else 16) if self.in_features % 16 == 0 else 0

    def activated(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        relu = False  # whether the matmul applied the activation's relu as it wrote
        if self.packed is None:  # the int8 kernel for every row count (no gradients: nothing here trains)
            xs = rows.float() if rows.shape[0] <= KERNEL_ROWS else rows.to(torch.bfloat16)
            bias = None if self.bias is None else self.bias.detach()
            y = int8_linear_op()(xs, self.qweight, self.scale, bias)
        elif rows.shape[0] <= KERNEL_ROWS and not torch.is_grad_enabled() and (kernel := int8_linear_op()) is not None:
            y = kernel(rows.float(), self.qweight, self.scale, self.bias)
        elif self.float16_copy is not None and self.few_rows < rows.shape[0] <= HALF_ROWS:
            relu = activation in ("relu", "relu2")  # FBGEMM applies relu as it writes
            y = fbgemm_half_linear(rows.float(), self.float16_copy, relu)
        elif rows.shape[0] > self.few_rows:
            return super().activated(x, activation)
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16), self.qweight, self.scale)
            # back to x's dtype (the activation is slow in bfloat16 without AVX512-BF16); adding the
            # float32 bias to the bfloat16 product widens it exactly, in the same call
            y = (y if self.bias is None else y + self.bias).to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        if relu:
            return y.square() if activation == "relu2" else y
        return activate(y, activation)
