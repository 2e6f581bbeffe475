"""CPU kernels PyTorch lacks, compiled from C++ on first use and cached (`torch.utils.cpp_extension`).

- `decode_attention` (decode_attention.cpp): attention of one new query per row over that row's
  KV cache, the step every decoded token takes in every layer. It streams the cache, float32 or
  bfloat16, once per step with AVX2 multiply-adds, faster than PyTorch's CPU attention at these
  shapes (docs/results.md). Results agree with `F.scaled_dot_product_attention` to float32 rounding.
- `int8_linear` (int8_linear.cpp): a linear layer with int8 weights and a scale per output row
  (`Int8Linear`), the scale and bias applied in the same pass, float32 out. For the 1-4 float32
  rows of a decode step it streams the weights: faster than PyTorch's weight-only int8 kernel with
  the bfloat16 conversions and bias around it (docs/results.md). For more rows (batches, prompts)
  it widens tiles of weights once and reuses them for every row; bfloat16 rows there take
  AVX512-BF16 dot products where the CPU has them, so the int8 weights serve batches without a
  bfloat16 copy beside them.

The first use builds them (seconds) into torch's extensions directory (`TORCH_EXTENSIONS_DIR`,
by default ~/.cache/torch_extensions), where later runs find them; a changed source or flag
rebuilds. Where they cannot be built (no C++ compiler or `ninja`, a CPU without AVX2, an
unwritable cache) or `QUILL_KERNELS=0` is set, `decode_attention_op()` and `int8_linear_op()` are
None and the model uses PyTorch's attention and int8 kernel: the same work, slower. It needs a C++
compiler and ninja (`apt-get install g++ ninja-build`, or `pip install ninja` in an activated
virtual environment). Builds take turns under an OS lock (`locked_load`), which also clears the
lock file a killed build leaves behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("decode_attention.cpp", "int8_linear.cpp")]
FLAGS = [
    "-O3",
    "-mavx2",
    "-mfma",
    "-fopenmp",  # at::parallel_for is inlined here: without OpenMP it would run on one thread
    "-ffast-math",  # float sums in vector lanes, and glibc's vector exp (libmvec) for the softmax
]
NAME = "quill_kernels"
_lock = threading.Lock()
_NOT_TRIED = object()
_ops = _NOT_TRIED  # torch.ops.quill once built, None where it cannot be


def decode_attention_op():
    """`torch.ops.quill.decode_attention(q (B, H, D), k, v (B, H, T, D), lengths (B,)) -> (B, H*D)`:
    row b attends to its first lengths[b] keys. Built on the first call; None where it cannot be
    (see the module's notes)."""
    ops = _built()
    return None if ops is None else ops.decode_attention


def int8_linear_op():
    """`torch.ops.quill.int8_linear(x (M, K) float32 or bfloat16, w (N, K) int8, scale (N,), bias (N,)
    or None) -> (M, N) float32`: x times the int8 weight, row n scaled by scale[n], plus the bias, any
    number of rows. Built on the first call; None where it cannot be (see the module's notes)."""
    ops = _built()
    return None if ops is None else ops.int8_linear


def _built():
    global _ops
    if _ops is _NOT_TRIED:
        with _lock:
            if _ops is _NOT_TRIED:
                _ops = _build()
    return _ops


def _build():
    if os.environ.get("QUILL_KERNELS", "1") == "0":
        return None
    from torch.utils import cpp_extension  # start-up time: the builder is needed only when a kernel is asked for

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.info("no AVX2 on this CPU: decoding uses PyTorch's attention and int8 kernel")
        return None
    if not shutil.which(os.environ.get("CXX", "c++")) or not cpp_extension.is_ninja_available():
        log.info("no C++ compiler or ninja here: decoding uses PyTorch's kernels (install g++ and ninja to build ours)")
        return None
    log.info("loading QuillGPT's CPU kernels (the first run builds them, ~10 s; later runs find them cached)")

    def load():
        cpp_extension.load(
            NAME, [str(p) for p in SOURCES], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False
        )

    try:
        locked_load(Path(cpp_extension._get_build_directory(NAME, verbose=False)), load)
    except Exception as error:  # a failed build or an unwritable cache: decoding still works, slower
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning("could not build QuillGPT's CPU kernels (%s); using PyTorch's attention and int8 kernel", reason)
        return None
    _register_shapes()
    return torch.ops.quill


def _register_shapes() -> None:
    """What each op returns, without running it: lets fake tensors, torch.compile and torch.export
    trace through the kernels."""

    @torch.library.register_fake("quill::decode_attention")
    def _(q, k, v, lengths):
        return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])

    @torch.library.register_fake("quill::int8_linear")
    def _(x, w, scale, bias):
        return x.new_empty(x.shape[0], w.shape[0])


def locked_load(build_dir: Path, load: Callable[[], None]) -> None:
    """Run `load()` (torch's build-or-load) holding an OS lock on `build_dir`: one process at a time.

    Torch's builder marks a build with a `lock` file and makes other processes wait, with no time
    limit, until it is gone; a build that was killed leaves it behind, and every later run would hang
    before its first token. The OS releases `flock` when its holder dies, so whoever holds it knows no
    build is under way and removes a `lock` file left over."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file only
        load()
        return
    with open(build_dir / "quill.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # waits while another process builds
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removing %s, left by a kernel build that did not finish", stale)
            stale.unlink(missing_ok=True)
        load()
