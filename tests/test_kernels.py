"""The compiled decode attention (quillgpt/kernels) against attention written out in float64, and
the model's use of it: chosen for decoding on the CPU, the same tokens as PyTorch's attention,
a bfloat16 cache behind int8 weights, and a clear fallback where it cannot be built."""

import logging
import math
import os
import shutil

import pytest
import torch

from quillgpt import kernels
from quillgpt.decoder import Decoder
from quillgpt.generate import generate
from quillgpt.infer.prepare import kv_cache_dtype, prepare_for_inference
from quillgpt.kvcache import KVCache
from quillgpt.model import GPT
from quillgpt.sampling import SamplingParams
from tests.conftest import tiny_config

CAN_BUILD = (
    shutil.which(os.environ.get("CXX", "c++")) is not None
    and shutil.which("ninja") is not None
    and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    and os.environ.get("QUILL_KERNELS", "1") != "0"
)
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="no C++ compiler, ninja or AVX2 here")


@pytest.fixture(scope="module")
def op():
    op = kernels.decode_attention_op()
    assert op is not None, "the kernel must build where a compiler and ninja are installed"
    return op


def reference(q, k, v, lengths):
    """softmax(q . k / sqrt(D)) @ v per row and head over its first lengths[b] keys, in float64."""
    B, H, _, D = k.shape
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        keys, values = k[b, :, :n].double(), v[b, :, :n].double()  # (H, n, D)
        scores = torch.einsum("hd,hnd->hn", q[b].double(), keys) / math.sqrt(D)
        out[b] = torch.einsum("hn,hnd->hd", scores.softmax(-1), values)
    return out.view(B, H * D)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,D,T", [(1, 1, 8, 1), (3, 2, 24, 37), (2, 3, 16, 3), (5, 6, 64, 130), (2, 2, 128, 45)])
def test_decode_attention_matches_attention_written_out(op, dtype, B, H, D, T):
    """Head sizes that are multiples of 16 take the AVX2 path, others the plain loop; rows of fewer
    than four keys and the keys past the last four take the plain loop either way."""
    torch.manual_seed(0)
    cache_k = (3 * torch.randn(B + 1, H, T + 9, D)).to(dtype)  # views into a larger cache, as the model passes
    cache_v = torch.randn(B + 1, H, T + 9, D).to(dtype)
    q = torch.randn(B, 3 * H, D)[:, ::3]  # strided heads too
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    for b, n in enumerate(lengths.tolist()):  # keys past a row's length must never be read
        cache_k[b + 1, :, n:], cache_v[b + 1, :, n:] = math.nan, math.nan
    k, v = cache_k[1:, :, :T], cache_v[1:, :, :T]
    got = op(q, k, v, lengths)
    assert got.shape == (B, H * D) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(q, k, v, lengths), atol=2e-6, rtol=1e-5)
    k, v = (3 * torch.randn(B, H, T, D)).to(dtype), torch.randn(B, H, T, D).to(dtype)  # every key seen
    sdpa = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k.float(), v.float())
    torch.testing.assert_close(op(q, k, v, torch.full((B,), T)), sdpa.reshape(B, H * D), atol=2e-6, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_broken_cache_gives_what_pytorchs_attention_gives(op, bad, dtype):
    """Built with -ffast-math, the kernel must still carry a NaN or an infinity in the cache (an
    overflowed model) through as SDPA does, so the sampler's NaN check still sees it: in a key or a
    value, among the four-at-a-time keys (4) or the last one (8), on both head-size paths."""
    torch.manual_seed(0)
    for where, key, D in [("k", 4, 16), ("v", 4, 16), ("k", 8, 16), ("v", 8, 16), ("k", 4, 8), ("v", 8, 8)]:
        q, k, v = torch.randn(2, 3, D), torch.randn(2, 3, 9, D).to(dtype), torch.randn(2, 3, 9, D).to(dtype)
        (k if where == "k" else v)[1, 2, key, 5] = bad
        sdpa = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k.float(), v.float()).reshape(2, 3 * D)
        got = op(q, k, v, torch.tensor([9, 9]))
        torch.testing.assert_close(got, sdpa, equal_nan=True, atol=2e-6, rtol=1e-5)


@needs_kernel
def test_decode_attention_refuses_bad_inputs(op):
    q, k = torch.randn(2, 3, 8), torch.randn(2, 3, 5, 8)
    n = torch.tensor([5, 5])
    cases = [
        ((q, k, k, torch.tensor([5, 6])), "lengths must lie in"),
        ((q, k, k, torch.tensor([0, 5])), "lengths must lie in"),
        ((q, k, k, torch.tensor([5])), "lengths must be"),
        ((q, k, k.double(), n), "float32 or both bfloat16"),
        ((q.double(), k, k, n), "q must be float32"),
        ((q[:, :2], k, k, n), "must match"),
        ((q, k.transpose(2, 3), k.transpose(2, 3), n), "must match"),
        ((q, torch.randn(2, 3, 5, 16)[..., ::2], k, n), "last dimension must be contiguous"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*args)


@pytest.fixture(scope="module")
def int8_linear():
    op = kernels.int8_linear_op()
    assert op is not None, "the kernels must build where a compiler and ninja are installed"
    return op


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9, 16, 17, 64, 100, 131])
@pytest.mark.parametrize("K,N", [(5, 3), (8, 1), (24, 65), (40, 130), (384, 64), (1030, 33), (2100, 97), (4103, 50)])
def test_int8_linear_matches_the_product_written_out(int8_linear, dtype, M, K, N):
    """x in float32 (up to 4 rows streamed, four at a time, past them in float32 tiles) or bfloat16
    (tiles of bfloat16 dot products where the CPU has them): every row count, incl. the 1-7 rows
    left past blocks of 4 or 8 and the rows past a block of 128; widths of 32-, 8- and 1-value steps
    (5: only the last), odd ones, and past a column tile (2,048) into partial sums; output counts
    that are not whole tiles (48). A scale in bfloat16 (as Int8Linear holds it) or float32, a bias in
    float32, bfloat16 or none, x strided. The reference is the float64 product of x's own values."""
    torch.manual_seed(0)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    x = torch.randn(M, 2 * K).to(dtype)[:, ::2]
    for scale in (torch.rand(N).to(torch.bfloat16), torch.rand(N)):
        for bias in (torch.randn(N), torch.randn(N).to(torch.bfloat16), None):
            reference = x.double() @ (w.double() * scale.double()[:, None]).T
            reference += 0 if bias is None else bias.double()
            y = int8_linear(x, w, scale, bias)
            assert y.dtype == torch.float32 and y.shape == (M, N)
            torch.testing.assert_close(y.double(), reference, atol=1e-5 * reference.abs().max().item(), rtol=1e-6)


@needs_kernel
def test_int8_linear_keeps_a_nan_in_its_row_and_refuses_bad_inputs(int8_linear):
    for rows, dtype in [(3, torch.float32), (9, torch.float32), (9, torch.bfloat16)]:  # streamed, then tiled
        x, w, scale = torch.randn(rows, 43), torch.ones(50, 43, dtype=torch.int8), torch.ones(50)
        for k in (3, 35, 41):  # in a 32-value step, an 8-value step and the single values past them
            x[1, k] = math.nan
            y = int8_linear(x.to(dtype), w, scale, None)
            assert y[1].isnan().all() and not y[[0, *range(2, rows)]].isnan().any()
            x[1, k] = 0.0
    x, w, scale = torch.randn(3, 43), torch.ones(6, 43, dtype=torch.int8), torch.ones(6)
    cases = [
        ((x.double(), w, scale, None), "x must be \\(M, K\\) float32 or bfloat16"),
        ((x, w.float(), scale, None), "int8 matrix"),
        ((x, w.t(), scale, None), "int8 matrix"),
        ((x, w[:, :32].contiguous(), scale, None), "x has 43 columns, w 32"),
        ((x, w, scale[:5], None), "scale must be"),
        ((x, w, scale.double(), None), "scale must be float32 or bfloat16"),
        ((x, w, scale, torch.ones(5)), "bias must be"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            int8_linear(*args)


@needs_kernel
def test_fake_tensors_trace_through_the_kernels(op, int8_linear):
    """Both ops say their output's shape without running (torch.compile and torch.export need it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        q, k = torch.empty(2, 3, 16), torch.empty(2, 3, 9, 16, dtype=torch.bfloat16)
        out = op(q, k, k, torch.empty(2, dtype=torch.long))
        y = int8_linear(torch.empty(4, 24), torch.empty(40, 24, dtype=torch.int8), torch.empty(40), None)
    assert mode.is_our_fake(out) and out.shape == (2, 48) and out.dtype == torch.float32
    assert mode.is_our_fake(y) and y.shape == (4, 40) and y.dtype == torch.float32


PROMPTS = ["Fi", "You are all", "S", "Speak, speak.\n\nAll:\nBefore"]  # of different lengths


def noisy_model(vocab_size=40, **overrides) -> GPT:
    """Random weights large enough that greedy decoding does not settle on one token."""
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=vocab_size, block_size=24, tie_embeddings=False, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@needs_kernel
def test_decoding_on_the_cpu_takes_the_kernel_and_keeps_every_token(op, char_tokenizer, monkeypatch):
    model = noisy_model(char_tokenizer.vocab_size, pos_emb="rope", qk_norm=True)
    cache = KVCache.allocate(model.config, 2)
    with torch.inference_mode():
        assert cache.prepare(torch.tensor([[3], [7]])).kernel is op  # rows at different positions too
        assert cache.prepare(torch.tensor([[3], [7]], dtype=torch.int32)).lengths.dtype == torch.int64
        assert cache.prepare(torch.tensor([[0, 1, 2]])).kernel is None  # prompts: PyTorch's causal attention
    assert cache.prepare(torch.tensor([[3]])).kernel is None  # gradients wanted: the kernel has no backward
    params = [SamplingParams(max_new_tokens=40, temperature=0), SamplingParams(max_new_tokens=40, seed=3)]
    # 40 new tokens overflow the 24-token window: rows re-encode and decode at different positions
    with_kernel = [[c.tokens for c in generate(model, char_tokenizer, PROMPTS, p)] for p in params]
    monkeypatch.setattr("quillgpt.kvcache.decode_attention_op", lambda: None)
    without = [[c.tokens for c in generate(model, char_tokenizer, PROMPTS, p)] for p in params]
    assert with_kernel == without and len(set(with_kernel[1][0])) > 5


@needs_kernel
@pytest.mark.parametrize("weights", ["int8", "bfloat16"])
def test_rounded_weights_decode_from_a_bfloat16_cache(op, char_tokenizer, weights, monkeypatch):
    """Keys and values leave int8 and bfloat16 linears rounded to bfloat16, so the cache holds them
    in bfloat16 (half the bytes a step reads); the logits stay those of a float32 cache."""
    model = prepare_for_inference(noisy_model(char_tokenizer.vocab_size, pos_emb="rope"), weights)
    assert kv_cache_dtype(model) == torch.bfloat16
    assert Decoder(model, max_batch=2).cache.k.dtype == torch.bfloat16
    assert kv_cache_dtype(prepare_for_inference(noisy_model(), "float32")) == torch.float32  # exact stays exact
    idx = torch.randint(0, char_tokenizer.vocab_size, (2, 20))
    logits = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            cache = KVCache.allocate(model.config, 2, dtype=dtype)
            model(idx[:, :5], cache=cache)
            steps = [model(idx[:, t : t + 1], pos=torch.full((2, 1), t), cache=cache)[0] for t in range(5, 20)]
            logits[dtype] = torch.cat(steps, dim=1)
    scale = logits[torch.float32].abs().max().item()
    assert 0 < (logits[torch.bfloat16] - logits[torch.float32]).abs().max() < 0.01 * scale
    # rows at different positions write the cache one by one (continuous batching, the server)
    greedy = SamplingParams(max_new_tokens=40, temperature=0)
    tokens = [c.tokens for c in generate(model, char_tokenizer, PROMPTS, greedy)]
    monkeypatch.setattr("quillgpt.decoder.kv_cache_dtype", lambda model: torch.float32)  # the weights' dtype
    assert tokens == [c.tokens for c in generate(model, char_tokenizer, PROMPTS, greedy)]


def test_without_a_compiler_decoding_falls_back_and_says_why(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def broken_build(*args, **kwargs):
        raise RuntimeError("Error building extension 'quill_kernels'\nc++: fatal error")

    monkeypatch.setattr(cpp_extension, "load", broken_build)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with caplog.at_level(logging.WARNING, logger="quillgpt.kernels"):
        assert kernels._build() is None
    assert "could not build" in caplog.text and "Error building extension 'quill_kernels'" in caplog.text
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with caplog.at_level(logging.INFO, logger="quillgpt.kernels"):
        assert kernels._build() is None
    assert "no C++ compiler or ninja" in caplog.text
    monkeypatch.setenv("QUILL_KERNELS", "0")
    assert kernels._build() is None


def test_builds_take_turns_and_clear_a_lock_a_killed_build_left(tmp_path, caplog):
    """torch's builder would wait forever on the `lock` file of a build that was killed; under the
    OS lock nobody else is building, so it goes, and the load runs while the OS lock is held."""
    import fcntl

    (tmp_path / "lock").touch()
    seen = []

    def load():
        with open(tmp_path / "quill.flock") as other:  # another process's attempt, as far as flock goes
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append((tmp_path / "lock").exists())

    with caplog.at_level(logging.WARNING, logger="quillgpt.kernels"):
        kernels.locked_load(tmp_path, load)
    assert seen == [False] and "did not finish" in caplog.text
    with open(tmp_path / "quill.flock") as after:  # released once the load is done
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_decoding_without_the_kernel_still_matches_the_full_forward(char_tokenizer, monkeypatch):
    monkeypatch.setattr("quillgpt.kvcache.decode_attention_op", lambda: None)
    model = noisy_model(char_tokenizer.vocab_size)
    params = SamplingParams(max_new_tokens=30, temperature=0)
    cached = generate(model, char_tokenizer, PROMPTS, params)
    uncached = generate(model, char_tokenizer, PROMPTS, params, use_cache=False)
    assert [c.tokens for c in cached] == [c.tokens for c in uncached]
