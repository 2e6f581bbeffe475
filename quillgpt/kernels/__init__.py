"""CPU kernels PyTorch lacks, compiled from C++ on first use and cached (`torch.utils.cpp_extension`).

- `decode_attention` (decode_attention.cpp): attention of one new query per row over that row's
  KV cache, the step every decoded token takes in every layer. It reads the cache at the speed of
  memory, float32 or bfloat16; PyTorch's CPU attention spends about twice as long at these shapes
  (docs/results.md). Results agree with `F.scaled_dot_product_attention` to float32 rounding.

The first use builds it (about 10 s) into torch's extensions directory (`TORCH_EXTENSIONS_DIR`,
by default ~/.cache/torch_extensions), where later runs find it; a changed source or flag rebuilds.
Where it cannot be built (no C++ compiler or `ninja`, a CPU without AVX2, an unwritable cache) or
`QUILL_KERNELS=0` is set, `decode_attention_op()` is None and the model uses PyTorch's attention:
the same results, slower at large batches. Installing `g++` and `ninja` is all it needs.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.cpp")
FLAGS = [
    "-O3",
    "-mavx2",
    "-mfma",
    "-fopenmp",  # at::parallel_for is inlined here: without OpenMP it would run on one thread
    "-ffast-math",  # float sums in vector lanes, and glibc's vector exp (libmvec) for the softmax
]
_lock = threading.Lock()
_NOT_TRIED = object()
_op = _NOT_TRIED


def decode_attention_op():
    """`torch.ops.quill.decode_attention(q (B, H, D), k, v (B, H, T, D), lengths (B,)) -> (B, H*D)`:
    row b attends to its first lengths[b] keys. Built on the first call; None where it cannot be
    (see the module's notes)."""
    global _op
    if _op is _NOT_TRIED:
        with _lock:
            if _op is _NOT_TRIED:
                _op = _build()
    return _op


def _build():
    if os.environ.get("QUILL_KERNELS", "1") == "0":
        return None
    from torch.utils import cpp_extension

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.info("no AVX2 on this CPU: decoding uses PyTorch's attention")
        return None
    if not shutil.which(os.environ.get("CXX", "c++")) or not cpp_extension.is_ninja_available():
        log.info("no C++ compiler or ninja here: decoding uses PyTorch's attention (install g++ and ninja to build it)")
        return None
    log.info("building the decode attention kernel (once; cached in torch's extensions directory)")
    try:
        cpp_extension.load(
            "quill_kernels", [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False
        )
    except Exception as error:  # a failed build or an unwritable cache: decoding still works, slower
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning("could not build QuillGPT's decode attention kernel (%s); using PyTorch's attention", reason)
        return None
    return torch.ops.quill.decode_attention
