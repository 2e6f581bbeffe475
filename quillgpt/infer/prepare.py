"""Readying a trained `GPT` for decoding (`prepare_for_inference`), and the KV cache's dtype for it."""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn

from quillgpt.infer.int8 import Int8Linear
from quillgpt.infer.packed import POST_OPS, PackedLinear
from quillgpt.kernels import decode_attention_op
from quillgpt.model import GPT, MLP, Activation

INFERENCE_WEIGHTS = ("auto", "float32", "bfloat16", "int8")


def prepare_for_inference(model: GPT, weights: str = "float32") -> GPT:
    """Put a model in the form decoding runs fastest in, in place, in eval mode; returns it.

    `weights`:
    - "float32": exact. On CPU the linear layers become `PackedLinear`s (same arithmetic, faster).
    - "bfloat16": the linear layers' weights in bfloat16, packed the same way: half the bytes to
      read per token. Activations, norms and attention stay float32 (float32 keeps the residual
      stream exact); the KV cache is bfloat16 where the compiled decode attention reads it
      (`kv_cache_dtype`). Worth it only where the CPU computes in bfloat16 natively (AVX512-BF16, AMX).
    - "int8": the linear layers' weights in int8 with a scale per row (`Int8Linear`), CPU only:
      a quarter of the bytes, the fastest at decoding. The KV cache as for "bfloat16".
    - "auto": "int8" on CPU; elsewhere the model is left as it is. What each costs in loss on the
      shipped models is in docs/results.md.
    Where the MLP's activation is one oneDNN applies as it writes (`POST_OPS`), its first linear
    applies it and the activation module becomes `nn.Identity`.

    The prepared model holds what decoding reads and no more: the linears' float32 weights go
    (unless an embedding shares one), so it counts its parameters but refuses to save, export,
    convert or train (`PreparedModelError`); load the model again for those.
    """
    if weights not in INFERENCE_WEIGHTS:
        raise ValueError(f"unknown inference weights {weights!r} (choose from {', '.join(INFERENCE_WEIGHTS)})")
    model.eval()
    cpu = next(model.parameters()).device.type == "cpu"
    onednn = torch.backends.mkldnn.is_available()
    if weights == "auto":
        if not cpu:
            return model
        weights = cpu_auto_weights()
    if weights in ("int8", "bfloat16") and not cpu:
        raise ValueError(f"{weights} inference weights run on the CPU only")
    if weights in ("int8", "bfloat16") and not onednn:
        raise ValueError(f"{weights} inference weights need a CPU build of PyTorch with oneDNN (torch.backends.mkldnn)")
    if cpu:
        decode_attention_op()  # built now (once), not in the first request's first step
    if weights == "int8":
        return _fuse_activations(_replace_linears(model, Int8Linear))
    if cpu and onednn:
        dtype = torch.bfloat16 if weights == "bfloat16" else None
        return _fuse_activations(
            _replace_linears(model, lambda linear, keep: PackedLinear(linear, dtype, keep_weight=keep))
        )
    return model


def cpu_auto_weights() -> str:
    """What `weights="auto"` is on a CPU: "int8" where PyTorch has oneDNN, else "float32"."""
    return "int8" if torch.backends.mkldnn.is_available() else "float32"


def kv_cache_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a KV cache for `model` is held in when decoding: its weights' dtype, except bfloat16
    for weights prepared as int8 or bfloat16 on a CPU where the compiled decode attention reads the
    cache. Keys and values come out of those linears rounded to bfloat16 already (rotated keys are
    rounded once more), and a bfloat16 cache halves what each step reads."""
    weights = next(model.parameters())
    rounded = any(
        isinstance(m, Int8Linear) or (isinstance(m, PackedLinear) and m.dtype == torch.bfloat16)
        for m in model.modules()
    )
    if rounded and weights.device.type == "cpu" and decode_attention_op() is not None:
        return torch.bfloat16
    return weights.dtype


def _replace_linears(model: GPT, make) -> GPT:
    """Replace each `nn.Linear` by `make(linear, keep_weight)`, one at a time, so that each float32
    weight is freed as soon as its replacement exists (the peak is one layer over the prepared model)."""
    shared = {id(p) for m in model.modules() if type(m) is not nn.Linear for p in m.parameters(recurse=False)}
    places = [(m, name) for m in model.modules() for name, child in m.named_children() if type(child) is nn.Linear]
    for module, name in places:
        linear = getattr(module, name)
        setattr(module, name, make(linear, id(linear.weight) in shared))
        del linear
    _return_freed_memory()
    return model


def _return_freed_memory() -> None:
    """Hand the pages of the freed float32 weights back to the OS. glibc keeps freed heap memory
    for reuse, so without this the process's resident memory would barely shrink."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to ask
        return
    libc.malloc_trim(0)


def _fuse_activations(model: GPT) -> GPT:
    """Swap each MLP's activation module for `nn.Identity` where its packed first linear applies it."""
    for mlp in model.modules():
        if isinstance(mlp, MLP) and isinstance(mlp.c_fc, PackedLinear) and isinstance(mlp.act, Activation):
            if mlp.act.name in POST_OPS:
                mlp.c_fc.activation = mlp.act.name
                mlp.act = nn.Identity()
    return model
