"""CPU kernels PyTorch lacks, compiled from C++ on first use and cached (`torch.utils.cpp_extension`).

- `decode_attention` (decode_attention.cpp): attention of one new query per row over that row's
  KV cache, the step every decoded token takes in every layer. It reads the cache at the speed of
  memory, float32 or bfloat16; PyTorch's CPU attention spends about twice as long at these shapes
  (docs/results.md). Results agree with `F.scaled_dot_product_attention` to float32 rounding.

The first use builds it (about 10 s) into torch's extensions directory (`TORCH_EXTENSIONS_DIR`,
by default ~/.cache/torch_extensions), where later runs find it; a changed source or flag rebuilds.
Where it cannot be built (no C++ compiler or `ninja`, a CPU without AVX2, an unwritable cache) or
`QUILL_KERNELS=0` is set, `decode_attention_op()` is None and the model uses PyTorch's attention:
the same results, slower at large batches. It needs a C++ compiler and ninja (`apt-get install g++
ninja-build`, or `pip install ninja` in an activated virtual environment). A build that was killed
leaves a lock file torch's builder would wait on forever; one older than ten minutes is removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
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
NAME = "quill_kernels"
STALE_LOCK_SECONDS = 600
"""A build takes ~10 s; a lock file older than this was left by a build that was killed."""
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
    log.info("loading the decode attention kernel (the first run builds it, ~10 s; later runs find it cached)")
    try:
        clear_stale_lock(Path(cpp_extension._get_build_directory(NAME, verbose=False)))
        cpp_extension.load(NAME, [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as error:  # a failed build or an unwritable cache: decoding still works, slower
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning("could not build QuillGPT's decode attention kernel (%s); using PyTorch's attention", reason)
        return None
    return torch.ops.quill.decode_attention


def clear_stale_lock(build_dir: Path) -> None:
    """Remove the lock file a killed build left in `build_dir`: torch's builder waits for it to go
    away with no time limit, so every later run would hang before decoding its first token."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        log.warning("removing %s, left by a kernel build that did not finish %.0f s ago", lock, age)
        lock.unlink(missing_ok=True)
