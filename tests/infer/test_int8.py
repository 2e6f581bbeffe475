import pytest
import torch

from quillgpt import kernels
from quillgpt.infer import int8
from quillgpt.infer.fbgemm import fbgemm_half, fbgemm_half_linear
from quillgpt.infer.int8 import HALF_ROWS, KERNEL_ROWS, Int8Linear, quantize_rows
from quillgpt.model import activate


@pytest.mark.parametrize("bias,width", [(False, 96), (True, 96), (True, 24)])  # 24: no int8 kernel
def test_int8_linear_multiplies_by_its_rounded_weight_on_both_paths(monkeypatch, bias, width):
    """Where the int8 kernel does not serve batches, few rows go through an int8 kernel, many through
    the packed copy: both must compute x @ (int8 * scale).T + bias, checked against that product in
    float64. One large entry per row makes the int8 steps coarse, so the rounded weight is far from
    the original."""
    monkeypatch.setattr(int8, "kernel_serves_batches", lambda: False)
    torch.manual_seed(0)
    linear = torch.nn.Linear(width, 40, bias=bias)
    linear.weight.data[:, 0] = 10.0
    linear.weight.data[3] = 0.0  # an all-zero row has no largest magnitude to scale by
    layer = Int8Linear(linear)
    assert (layer.few_rows > 0) == (width % 16 == 0)
    q, scale = quantize_rows(linear.weight)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and (q[3] == 0).all()
    assert (q.float() * scale[:, None] - linear.weight).abs().max() <= scale.max() / 2 + 1e-6  # half a step
    rounded = q.double() * layer.scale.double()[:, None]  # the scale as the kernel holds it
    for rows in sorted({1, max(layer.few_rows, 1), layer.few_rows + 1, 37}):
        x = torch.randn(rows, width).to(torch.bfloat16).float()  # as the kernels see it
        reference = x.double() @ rounded.T + (linear.bias.double() if bias else 0)
        y = layer(x.view(rows, 1, width)).view(rows, 40)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), reference, atol=0.05, rtol=0.01)  # both round to bfloat16
        assert (y.double() - (x.double() @ linear.weight.double().T)).abs().max() > 0.3  # not the original
    if kernels.int8_linear_op() is None:
        return
    for rows in range(1, KERNEL_ROWS + 2):  # decoding (no gradients): QuillGPT's kernel up to KERNEL_ROWS
        x = torch.randn(rows, 1, width)  # float32 throughout: no rounding of x or y to bfloat16
        reference = x.double() @ rounded.T + (linear.bias.double() if bias else 0)
        with torch.no_grad():
            y = layer(x).double()
        error = (y - reference).abs().max().item()
        if rows <= KERNEL_ROWS:
            assert error < 1e-5 * reference.abs().max().item(), (rows, error)
        else:  # past it, a packed copy that rounds x to bfloat16 where that is native
            torch.testing.assert_close(y, reference, atol=0.1, rtol=0.01)


@pytest.mark.skipif(not int8.kernel_serves_batches(), reason="no AVX512-BF16 here, or the int8 kernel is not built")
@pytest.mark.parametrize("bias,width", [(False, 96), (True, 96), (True, 24), (True, 1020), (False, 33)])
def test_int8_linear_multiplies_every_row_count_by_its_int8_weights_alone(bias, width):
    """Where the int8 kernel serves batches the layer holds its int8 weights and no copy, and every
    row count goes through the kernel: up to KERNEL_ROWS float32 rows as they are, past it rows
    rounded to bfloat16 (as a bfloat16 copy would take them), both against the float64 product of
    the rounded weight and the rows' own values; each activation applied to it, in float32."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(width, 100, bias=bias)
    linear.weight.data[:, 0] = 10.0
    layer = Int8Linear(linear)
    assert layer.packed is None and layer.float16_copy is None and layer.weight.is_meta
    rounded = layer.qweight.double() * layer.scale.double()[:, None]
    for rows in (1, 2, KERNEL_ROWS, KERNEL_ROWS + 1, 16, 17, 64, 100, 130):
        x = torch.randn(rows, 1, width)
        seen = x if rows <= KERNEL_ROWS else x.to(torch.bfloat16)
        reference = seen.double() @ rounded.T + (linear.bias.double() if bias else 0)
        for grad in (False, True):  # a forward with gradients on (no one trains it) takes the same path
            with torch.set_grad_enabled(grad):
                y = layer(x)
            assert y.dtype == torch.float32 and y.shape == (rows, 1, 100)
            torch.testing.assert_close(y.double(), reference, atol=1e-5 * reference.abs().max().item(), rtol=1e-6)
        assert (y.double() - (x.double() @ linear.weight.double().T)).abs().max() > 0.3  # not the original
        for activation in ("gelu", "gelu_exact", "relu", "relu2"):
            y = layer.activated(x, activation)
            assert y.dtype == torch.float32
            torch.testing.assert_close(y.double(), activate(reference, activation), atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not fbgemm_half(), reason="this PyTorch has no FBGEMM")
@pytest.mark.parametrize("bias,width", [(False, 96), (True, 96), (True, 24)])  # 24: no int8 kernel
def test_int8_linear_without_native_bfloat16_multiplies_batches_by_a_float16_copy(monkeypatch, bias, width):
    """On AVX2-only CPUs 5 to HALF_ROWS rows (from 1 where the int8 kernel cannot take the width) go
    through FBGEMM's float16 copy of the rounded weight: float32 activations and sums, so closer to
    the float64 product than the int8 kernel's bfloat16 rounding of the activations. Each activation,
    fused or not, matches it applied to the float64 product."""
    monkeypatch.setattr(int8, "native_bfloat16", lambda: False)
    monkeypatch.setattr(int8, "kernel_serves_batches", lambda: False)
    torch.manual_seed(0)
    linear = torch.nn.Linear(width, 40, bias=bias)
    linear.weight.data[:, 0] = 10.0
    layer = Int8Linear(linear)
    assert layer.float16_copy is not None and layer.dtype == torch.float32
    assert layer.few_rows == (4 if width % 16 == 0 else 0)
    rounded = layer.qweight.double() * layer.scale.double()[:, None]
    for rows in (1, 4, 5, 16, HALF_ROWS, HALF_ROWS + 1, 64):
        x = torch.randn(rows, 1, width)
        reference = (x.double() @ rounded.T + (linear.bias.double() if bias else 0)).view(rows, 1, 40)
        error = (layer(x).double() - reference).abs().max().item()
        if layer.few_rows < rows <= HALF_ROWS:  # float16 weights: 11 bits; the int8 kernel's inputs keep 8
            assert 1e-4 < error < 0.01, (rows, error)  # and their rounding shows: not the float32 copy
        else:
            assert error < 0.1, (rows, error)
        for activation in ("none", "gelu", "gelu_exact", "relu", "relu2"):
            y = layer.activated(x, activation)
            assert y.dtype == torch.float32 and y.shape == (rows, 1, 40)
            expected = activate(reference, activation) if activation != "none" else reference
            torch.testing.assert_close(y.double(), expected, atol=0.1, rtol=0.01)
            if layer.few_rows < rows <= HALF_ROWS:
                torch.testing.assert_close(y.double(), expected, atol=0.02, rtol=0.002)
    huge = torch.nn.Linear(96, 8)
    huge.weight.data[0, 0] = 1e6  # past float16's range: no float16 copy, the float32 one instead
    layer = Int8Linear(huge)
    assert layer.float16_copy is None and layer.few_rows == 16
    x = torch.randn(17, 96)  # past the int8 kernel's rows: the float32 copy
    reference = x.double() @ (layer.qweight.double() * layer.scale.double()[:, None]).T + huge.bias.double()
    torch.testing.assert_close(layer(x).double(), reference, atol=1e-3, rtol=1e-5)  # row 0 is in millions


@pytest.mark.skipif(not fbgemm_half(), reason="this PyTorch has no FBGEMM")
def test_fbgemm_half_linear_past_python_dispatch_equals_torch_ops():
    """The dispatcher's own entry point gives FBGEMM's result bit for bit, relu fused or not, and a
    tensor subclass still goes through `torch.ops` (its own `__torch_function__` runs)."""
    torch.manual_seed(0)
    weight, bias, x = torch.randn(40, 96), torch.randn(40), torch.randn(16, 96)
    packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)
    assert torch.equal(fbgemm_half_linear(x, packed), torch.ops.quantized.linear_dynamic_fp16(x, packed))
    relu = torch.ops.quantized.linear_relu_dynamic_fp16(x, packed)
    assert torch.equal(fbgemm_half_linear(x, packed, relu=True), relu) and (relu == 0).any()

    class Seen(torch.Tensor):
        calls = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.calls.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    y = fbgemm_half_linear(x.as_subclass(Seen), packed)
    assert Seen.calls and torch.equal(y.as_subclass(torch.Tensor), torch.ops.quantized.linear_dynamic_fp16(x, packed))
