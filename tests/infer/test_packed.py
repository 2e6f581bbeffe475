import pytest
import torch

from quillgpt.infer.int8 import Int8Linear
from quillgpt.infer.packed import PackedLinear
from quillgpt.model import activate


@pytest.mark.parametrize("activation", ["gelu", "gelu_exact", "relu", "relu2"])
def test_packed_linears_apply_the_mlp_activation_as_they_multiply(activation):
    """oneDNN applies the activation to each product before rounding it (`PackedLinear.activated`):
    the same as the activation on the float32 product, to the output's own rounding."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 48)
    layers = {"float32": PackedLinear(linear), "bfloat16": PackedLinear(linear, torch.bfloat16)}
    layers["int8"] = Int8Linear(linear)
    for name, layer in layers.items():
        for rows in (1, 17):  # int8: the int8 kernel, then the kernel's tiles or the packed copy (past 4 or 16 rows)
            x = torch.randn(rows, 1, 32).to(torch.bfloat16).float()
            y = layer.activated(x, activation)
            int8_kernel = name == "int8" and (layer.packed is None or rows <= layer.few_rows)
            assert y.dtype == (torch.float32 if int8_kernel else layer.dtype)
            exact = activate(layer(x), activation)  # the unfused path this replaces
            tolerance = 1e-5 if name == "float32" else 0.02
            torch.testing.assert_close(y.float(), exact, atol=tolerance, rtol=tolerance)
            if activation.startswith("relu"):
                assert (y >= 0).all() and (y == 0).any()
