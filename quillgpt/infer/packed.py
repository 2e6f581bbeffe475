"""`PackedLinear`: a linear layer whose weight oneDNN has laid out ahead of time for its CPU kernels,
holding only what decoding reads."""

from __future__ import annotations

import torch
import torch.nn as nn

POST_OPS = {"none": ("none", ""), "gelu": ("gelu", "tanh"), "gelu_exact": ("gelu", "none"), "relu": ("relu", "")}
POST_OPS["relu2"] = POST_OPS["relu"]  # then squared
"""Activations oneDNN's linear can apply as it writes its output: (attr, algorithm) of `_linear_pointwise`."""


class PreparedModelError(RuntimeError):
    """A model prepared for decoding was asked for what it no longer holds: its original weights."""


def _refuse(what: str) -> PreparedModelError:
    return PreparedModelError(
        f"cannot {what} a model prepared for decoding: it holds only what decoding reads, not its original "
        "weights (load the model with weights='float32' for that)"
    )


class PackedLinear(nn.Module):
    """An inference-only `nn.Linear` whose weight oneDNN has laid out for its own CPU kernels.

    Decoding reads every weight once per token, so a decode step is a chain of matmuls with 1 to 16
    rows. PyTorch's default CPU path for those (MKL sgemm on a row-major weight) streams the weights
    well below the memory's speed; oneDNN's matmul on a weight reordered once ahead of time is
    faster (docs/results.md).

    `forward` reads only the packed copy, so the float32 weight is not kept: `weight` is a
    placeholder of its shape on the meta device (the model still counts its parameters), unless
    another module holds the same tensor (an embedding tied to the output layer). A module that
    cannot give its weights back refuses to save, load, convert or train (`PreparedModelError`).

    `activation` (one of `POST_OPS`, set by `prepare_for_inference` in place of the MLP's own
    activation module) is applied by oneDNN as it writes each product: `forward` then returns the
    packed weight's dtype, as `activated` does.
    """

    def __init__(
        self,
        linear: nn.Linear,
        dtype: torch.dtype | None = None,
        batch_hint: int = 16,
        values: torch.Tensor | None = None,
        keep_weight: bool = False,
        pack: bool = True,
    ):
        """`values`: the weight to pack instead of the linear's own (e.g. its int8 rounding).
        `keep_weight`: keep the linear's weight (another module uses it) rather than its shape only.
        `pack`: False for a subclass that multiplies by other means and holds no packed copy."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        self.weight = linear.weight if keep_weight else nn.Parameter(linear.weight.to("meta"), requires_grad=False)
        self.dtype = dtype or linear.weight.dtype
        self.activation = "none"
        self.packed = self.packed_bias = None
        if pack:
            values = linear.weight.detach() if values is None else values
            self.packed = torch.ops.mkldnn._reorder_linear_weight(values.to(self.dtype), batch_hint)
            self.packed_bias = None if self.bias is None else self.bias.detach().to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation != "none":
            return self.activated(x, self.activation)
        return self.activated(x, "none").to(x.dtype)

    def activated(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        """`activate(x W^T + b, activation)` in the packed weight's dtype (bfloat16 stays bfloat16 for
        the next layer). oneDNN applies gelu or relu to each product as it writes it (`POST_OPS`),
        which saves a pass over the MLP's widest activations and the dtype copies around it."""
        attr, algorithm = POST_OPS[activation]
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, self.packed_bias, attr, [], algorithm)
        return y.square() if activation == "relu2" else y

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise _refuse("save or export")

    def _load_from_state_dict(self, *args, **kwargs):
        raise _refuse("load weights into")

    def _apply(self, fn, recurse=True):
        raise _refuse("convert or move")

    def train(self, mode: bool = True):
        if mode:
            raise _refuse("train")
        return super().train(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, " + (
            f"activation={self.activation}"
        )
