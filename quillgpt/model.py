"""The GPT decoder: `CausalSelfAttention`, `MLP`, `Block`, `GPT`, and the `KVCache` it decodes with.

Names follow GPT-2 (`wte`, `wpe`, `c_attn`, `c_proj`, `ln_f`, `lm_head`) so weights map one-to-one
onto HuggingFace's `GPT2LMHeadModel`. Shapes: B batch, T time, C n_embd, nh heads, hs head size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from quillgpt.config import GPTConfig
from quillgpt.kernels import decode_attention_op, int8_linear_op


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.norm_eps, elementwise_affine=config.norm_affine)
    return nn.LayerNorm(
        dim, eps=config.norm_eps, elementwise_affine=config.norm_affine, bias=config.bias and config.norm_affine
    )


class KVCache:
    """Keys and values of every layer for up to `batch_size` sequences of up to `block_size` tokens.

    Each row belongs to one sequence, its tokens at their own positions from 0: rows of different
    lengths need no left padding, and a row can be refilled while the others keep decoding
    (continuous batching). It lives outside the model, so it is never part of the state dict.
    Decoding one token per row on a CPU attends through `quillgpt.kernels`' decode attention (which
    also reads a bfloat16 cache); prompts, and everything elsewhere, through PyTorch's SDPA (`pytorch_attention`).
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # (n_layer, B, nh, block_size, hs)

    @staticmethod
    def dtype_for(model: nn.Module) -> torch.dtype:
        """The dtype a cache for `model` is held in: its `cache_dtype` (`prepare_for_inference` sets it),
        else its weights' (models wrapped by other code may not name one)."""
        return getattr(model, "cache_dtype", None) or next(model.parameters()).dtype

    @classmethod
    def allocate(cls, config: GPTConfig, batch_size: int, device=None, dtype=torch.float32) -> KVCache:
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def rows(self, start: int, stop: int) -> KVCache:
        """A view of rows [start, stop): writes through it land in this cache."""
        return KVCache(self.k[:, start:stop], self.v[:, start:stop])

    def prepare(self, pos: torch.Tensor) -> CacheStep:
        """Plan one forward call over tokens at positions `pos` (B, T), once for all layers."""
        B, T = pos.shape
        first = int(pos[0, 0])
        kv_len = int(pos.max()) + 1
        uniform = bool((pos == torch.arange(first, first + T, device=pos.device)).all())
        start = first if uniform else None
        if T == 1 and (kernel := self._decode_kernel()) is not None:  # one new token per row
            return CacheStep(
                self, pos, start, kv_len, mask=None, causal=False, kernel=kernel, lengths=(pos[:, 0] + 1).long()
            )
        if uniform and T == 1:  # one new token per row, rows level: it may see every cached key
            return CacheStep(self, pos, first, kv_len, mask=None, causal=False)
        if uniform and first == 0:  # a fresh prompt: plain causal attention
            return CacheStep(self, pos, first, kv_len, mask=None, causal=True)
        # a key is visible to a query when its position is not later than the query's
        mask = torch.arange(kv_len, device=pos.device) <= pos[:, None, :, None]  # (B, 1, T, kv_len)
        return CacheStep(self, pos, start, kv_len, mask=mask, causal=False)

    def _decode_kernel(self):
        """The compiled decode attention (`quillgpt.kernels`), where it serves this cache: on the
        CPU, float32 or bfloat16, no gradients wanted (it has no backward)."""
        if self.k.device.type != "cpu" or self.k.dtype not in (torch.float32, torch.bfloat16):
            return None
        return None if torch.is_grad_enabled() else decode_attention_op()


@dataclass
class CacheStep:
    """How one forward call writes and reads the cache; worked out once, used by every layer."""

    cache: KVCache
    pos: torch.Tensor
    start: int | None
    """Every row writes positions start..start+T-1 (a slice), or None: rows write their own positions."""
    kv_len: int
    mask: torch.Tensor | None
    causal: bool
    kernel: Callable | None = None
    """`quillgpt.kernels`' decode attention, for one new token per row; None: PyTorch's SDPA."""
    lengths: torch.Tensor | None = None
    """(B,) how many keys each row attends to, for the kernel."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this call's keys and values k, v (B, nh, T, hs) in layer `layer`'s cache, and return
        the attention of its queries q (B, nh, T, hs) over every key each row sees: (B, T, nh*hs)."""
        B, nh, T, hs = k.shape
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        if self.start is not None:
            ck[:B, :, self.start : self.start + T] = k
            cv[:B, :, self.start : self.start + T] = v
        else:
            rows = torch.arange(B, device=k.device)[:, None]  # (B, 1)
            ck[rows, :, self.pos] = k.transpose(1, 2).to(ck.dtype)  # (B, T, nh, hs) into (B, nh, Tmax, hs)
            cv[rows, :, self.pos] = v.transpose(1, 2).to(cv.dtype)
        keys, values = ck[:B, :, : self.kv_len], cv[:B, :, : self.kv_len]
        if self.kernel is None:
            return pytorch_attention(q, keys, values, self.mask, self.causal)
        return self.kernel(q[:, :, 0].float(), keys, values, self.lengths).to(q.dtype).view(B, 1, nh * hs)


def pytorch_attention(
    q, keys, values, mask: torch.Tensor | None = None, causal: bool = False, dropout: float = 0.0
) -> torch.Tensor:
    """PyTorch's attention of queries q (B, nh, T, hs) over keys and values (B, nh, S, hs): (B, T, nh*hs)."""
    B, nh, T, hs = q.shape
    keys, values = keys.to(q.dtype), values.to(q.dtype)  # no copy unless the cache is held in another dtype
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout, is_causal=causal)
    return y.transpose(1, 2).reshape(B, T, nh * hs)


class Rotary(nn.Module):
    """Rotary position embedding (RoPE): rotate pairs of q/k channels by position-dependent angles."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hs = config.head_dim
        inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
        angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)  # (T, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, pos: torch.Tensor | None, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions `pos` (B, T), or 0..T-1; shaped to broadcast over (B, nh, T, hs/2)."""
        if pos is None:
            return self.cos[:T], self.sin[:T]
        return self.cos[pos][:, None], self.sin[pos][:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_size = config.n_head, config.head_dim
        inner = config.n_head * config.head_dim
        qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
        self.c_attn = nn.Linear(config.n_embd, 3 * inner, bias=qkv_bias)  # fused q, k, v
        self.c_proj = nn.Linear(inner, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout if config.attn_dropout is None else config.attn_dropout
        self.q_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, config.head_dim) if config.qk_norm else None

    def qkv(self, x, rope=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values (B, nh, T, hs), normalised and rotated as attention sees them."""
        B, T, _ = x.size()
        q, k, v = self.c_attn(x).split(self.n_head * self.head_size, dim=2)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return q, k, v

    def forward(self, x, rope=None, cache: CacheStep | None = None, layer: int = 0):
        q, k, v = self.qkv(x, rope)
        if cache is None:
            y = pytorch_attention(q, k, v, causal=True, dropout=self.dropout if self.training else 0.0)
        else:
            y = cache.attend(layer, q, k, v)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.activation = config.activation
        width = 2 * config.hidden_dim if config.activation == "swiglu" else config.hidden_dim
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if isinstance(self.c_fc, PackedLinear) and self.activation in POST_OPS:  # inference: one oneDNN call
            h = self.c_fc.activated(x, self.activation)
        else:
            h = activate(self.c_fc(x), self.activation)
        return self.dropout(self.c_proj(h))


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The MLP's non-linearity (`GPTConfig.activation`, or "none") applied to the first layer's output."""
    if activation == "none":
        return h
    if activation == "gelu":
        return F.gelu(h, approximate="tanh")
    if activation == "gelu_exact":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    if activation == "relu2":
        return F.relu(h).square()
    gate, up = h.chunk(2, dim=-1)  # swiglu
    return F.silu(gate) * up


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), rope, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None,
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=make_norm(config, config.n_embd),
            )
        )
        self.rotary = Rotary(config) if config.pos_emb == "rope" else None
        self.cache_dtype: torch.dtype | None = None
        """The KV cache's dtype when decoding (`prepare_for_inference` sets it); None: the weights'."""
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    nn.init.zeros_(p)
                else:  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.zero_init_proj and not config.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors once). non_embedding drops position embeddings, as nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.transformer.wpe is not None:
            n -= self.transformer.wpe.weight.numel()
        return n

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Attention probabilities of every layer for one sequence idx (1, T): a list of (nh, T, T).

        Computed explicitly (softmax of q·k / sqrt(hs) under the causal mask) for pictures and
        teaching; the forward pass itself uses fused scaled_dot_product_attention.
        """
        T = idx.size(1)
        x = self.transformer.wte(idx)
        if self.transformer.wpe is not None:
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))
        rope = self.rotary(None, T) if self.rotary is not None else None
        maps = []
        for block in self.transformer.h:
            q, k, _ = block.attn.qkv(block.ln_1(x), rope)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (1, nh, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            maps.append(scores.masked_fill(~causal, float("-inf")).softmax(-1)[0])
            x = block(x, rope)
        return maps

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids → (logits (B, T, V), loss or None).

        With `cache`, `pos` (B, T) gives each token's position and the cache is read and written;
        `last_only` returns logits for the last position only (B, 1, V), which is all decoding needs.
        Targets equal to -1 are ignored by the loss.
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        if cache is not None and pos is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)
        step = cache.prepare(pos) if cache is not None else None
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.transformer.wpe is not None:
            x = x + self.transformer.wpe(pos if pos is not None else torch.arange(T, device=idx.device))
        x = self.transformer.drop(x)
        rope = self.rotary(pos, T) if self.rotary is not None else None
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, step, i)
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)  # (B, T, V)
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


INFERENCE_WEIGHTS = ("auto", "float32", "bfloat16", "int8")
POST_OPS = {"none": ("none", ""), "gelu": ("gelu", "tanh"), "gelu_exact": ("gelu", "none"), "relu": ("relu", "")}
POST_OPS["relu2"] = POST_OPS["relu"]  # then squared
"""Activations oneDNN's linear can apply as it writes its output: (attr, algorithm) of `_linear_pointwise`."""


class PackedLinear(nn.Module):
    """An inference-only `nn.Linear` whose weight oneDNN has laid out for its own CPU kernels.

    Decoding reads every weight once per token, so a decode step is a chain of matmuls with 1 to 16
    rows. PyTorch's default CPU path for those (MKL sgemm on a row-major weight) streams weights
    at a fraction of the memory's speed on the 2-core machines here; oneDNN's matmul on a weight
    reordered once ahead of time is 1.3-2x faster (docs/results.md). `weight` stays, so the module
    still counts, saves and inspects like a Linear; `forward` reads only the packed copy.
    """

    def __init__(
        self,
        linear: nn.Linear,
        dtype: torch.dtype | None = None,
        batch_hint: int = 16,
        values: torch.Tensor | None = None,
    ):
        """`values`: the weight to pack instead of the linear's own (e.g. its int8 rounding)."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same parameters: tied weights stay tied
        self.dtype = dtype or linear.weight.dtype
        values = self.weight.detach() if values is None else values
        self.packed = torch.ops.mkldnn._reorder_linear_weight(values.to(self.dtype), batch_hint)
        self.packed_bias = None if self.bias is None else self.bias.detach().to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activated(x, "none").to(x.dtype)

    def activated(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        """`activate(x W^T + b, activation)` in the packed weight's dtype (bfloat16 stays bfloat16 for
        the next layer). oneDNN applies gelu or relu to each product as it writes it (`POST_OPS`),
        which saves a pass over the MLP's widest activations and the dtype copies around it."""
        attr, algorithm = POST_OPS[activation]
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, self.packed_bias, attr, [], algorithm)
        return y.square() if activation == "relu2" else y


def prepare_for_inference(model: GPT, weights: str = "float32") -> GPT:
    """Put a model in the form decoding runs fastest in, in place, in eval mode; returns it.

    `weights`:
    - "float32": exact. On CPU the linear layers become `PackedLinear`s (same arithmetic, faster).
    - "bfloat16": the linear layers' weights in bfloat16, packed the same way: half the bytes to
      read per token. Activations, norms and attention stay float32 (float32 keeps the residual
      stream exact); the KV cache is bfloat16 where `quillgpt.kernels`' decode attention reads it
      (PyTorch's attention is slower on bfloat16). Worth it only where the CPU computes in
      bfloat16 natively (AVX512-BF16, AMX).
    - "int8": the linear layers' weights in int8 with a scale per row (`Int8Linear`), CPU only:
      a quarter of the bytes, the fastest at decoding. The KV cache as for "bfloat16".
    - "auto": "int8" on CPU; elsewhere the model is left as it is. What each costs in loss on the
      shipped models is in docs/results.md (int8: 0.0005 nats on `shakespeare-char`).
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
    kernel = decode_attention_op() if cpu else None  # built now (once), not in the first request's first step
    if weights in ("int8", "bfloat16") and kernel is not None:
        # keys and values come out of the linears rounded to bfloat16 already (rotated keys are
        # rounded once more): a bfloat16 cache halves what each step reads, through the kernel
        model.cache_dtype = torch.bfloat16
    if weights == "int8":
        return _replace_linears(model, Int8Linear)
    if cpu and onednn:
        dtype = torch.bfloat16 if weights == "bfloat16" else None
        return _replace_linears(model, lambda linear: PackedLinear(linear, dtype))
    return model


def cpu_auto_weights() -> str:
    """What `weights="auto"` is on a CPU: "int8" where PyTorch has oneDNN, else "float32"."""
    return "int8" if torch.backends.mkldnn.is_available() else "float32"


def _replace_linears(model: GPT, make) -> GPT:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, make(child))
    return model


KERNEL_ROWS = 4
"""Up to how many rows `Int8Linear` multiplies through QuillGPT's int8 kernel: at 4 rows it is as
fast as PyTorch's, and past a few rows FBGEMM or oneDNN on a packed copy is faster (docs/results.md)."""

HALF_ROWS = 48
"""Up to how many rows `Int8Linear` multiplies by its float16 copy: float16 was faster at 32 rows
and oneDNN's float32 copy at 64 (docs/results.md)."""


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

    Called through `torch.ops`, each call spends about 10 us before the matmul starts, in PyTorch's
    Python-side checks of the packed weight (a TorchScript object) for `__torch_function__`, which
    raise and catch C++ exceptions: a quarter of a millisecond over a decode step's 25 matmuls.
    Plain tensors skip those checks through the dispatcher's own entry point
    (`torch._C._dispatch_call_boxed`, 2.7 us); tensor subclasses (fake tensors, `__torch_function__`
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

    A decode step reads every weight once, so int8 weights are a quarter of float32's bytes to read,
    and at the shapes here they fit the last-level cache. Up to `KERNEL_ROWS` rows (one decode
    step of a few sequences) go through QuillGPT's own int8 kernel (`quillgpt.kernels.int8_linear_op`):
    float32 activations, sums and output, the scale and bias applied in the same pass; at one row
    it takes about half the time of PyTorch's kernel below with the conversions around it
    (docs/results.md). Where it is not built, PyTorch's weight-only int8 matmul
    (`aten._weight_int8pack_mm`, the kernel gpt-fast and torchao use) serves up to `few_rows` rows,
    against bfloat16 activations: at one row 2.2x faster than oneDNN on bfloat16 weights, 5.5x
    faster than on float32 with AVX2 only. Both re-read the weight for each row, though, so past a
    few rows (prompts, large batches) the `PackedLinear` it also is, holding the same rounded weight
    in bfloat16 where the CPU has it natively and float32 elsewhere, is faster. That copy and
    PyTorch's int8 kernel round their products to bfloat16 (as the bfloat16 weights path does);
    `forward` returns the input's dtype, `activated` float32 from QuillGPT's kernel, the input's
    from PyTorch's, the copy's past them.

    Without native bfloat16 (AVX2-only CPUs such as AMD Zen 3) the copy is float32, and a batch of
    5 to `HALF_ROWS` rows (a batched decode step; where QuillGPT's kernel is not in use, 1 to
    `HALF_ROWS` for layers PyTorch's int8 kernel cannot take) is faster through a third copy in
    float16, FBGEMM's half-precision matmul (`fbgemm_half_linear`: float32 sums, the rounded weight
    to float16's 11 bits): at 16 rows 1.4x the speed of PyTorch's int8 kernel and 1.5x the float32
    copy's (docs/results.md). It returns float32. It holds half the float32 copy's bytes on top (a
    10.7M model: 21 MB more).
    """

    def __init__(self, linear: nn.Linear):
        native = native_bfloat16()
        qweight, scale = quantize_rows(linear.weight)
        scale = scale.to(torch.bfloat16)
        rounded = qweight.float() * scale.float()[:, None]
        super().__init__(linear, torch.bfloat16 if native else None, values=rounded)
        self.qweight, self.scale = qweight, scale
        self.float16_copy = None  # FBGEMM's packed float16 copy, where it helps (the class docstring)
        if not native and fbgemm_half() and rounded.abs().max() < torch.finfo(torch.float16).max:
            bias = None if self.bias is None else self.bias.detach().float()
            self.float16_copy = torch.ops.quantized.linear_prepack_fp16(rounded, bias)
        # PyTorch's int8 kernel reads its input 16 values at a time and returns garbage for other widths
        # (PyTorch 2.13: NaN or a crash at 24 or 1,020 inputs on AVX-512); those layers take a copy.
        self.few_rows = (4 if native or self.float16_copy is not None else 16) if self.in_features % 16 == 0 else 0

    def activated(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        relu = False  # whether the matmul applied the activation's relu as it wrote
        if rows.shape[0] <= KERNEL_ROWS and not torch.is_grad_enabled() and (kernel := int8_linear_op()) is not None:
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
