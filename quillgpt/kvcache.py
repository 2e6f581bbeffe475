"""The key/value cache protocol the model decodes with, the `KVCache` the decoder holds, and which
attention a step uses: the compiled decode kernel or PyTorch's SDPA.

`GPT.forward` takes any `Cache`: it calls `prepare(pos)` once per forward call and the returned
`CacheStep`'s `attend` once per layer. `KVCache` preallocates every layer's keys and values;
the ONNX export passes its own cache, which concatenates instead (`interop/export_onnx.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quillgpt.config import GPTConfig
from quillgpt.kernels import decode_attention_op


class CacheStep(ABC):
    """How one forward call writes and reads a cache, worked out once for all layers."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this call's keys and values k, v (B, nh, T, hs) in layer `layer`'s cache, and return
        the attention of its queries q (B, nh, T, hs) over every key each row sees: (B, T, nh*hs)."""


class Cache(ABC):
    """Keys and values kept between forward calls: what `GPT.forward` decodes with."""

    @abstractmethod
    def prepare(self, pos: torch.Tensor) -> CacheStep:
        """Plan one forward call over tokens at positions `pos` (B, T)."""


def pytorch_attention(
    q, keys, values, mask: torch.Tensor | None = None, causal: bool = False, dropout: float = 0.0
) -> torch.Tensor:
    """PyTorch's attention of queries q (B, nh, T, hs) over keys and values (B, nh, S, hs): (B, T, nh*hs)."""
    B, nh, T, hs = q.shape
    keys, values = keys.to(q.dtype), values.to(q.dtype)  # no copy unless the cache is held in another dtype
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout, is_causal=causal)
    return y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, nh*hs)


def decode_kernel(keys: torch.Tensor) -> Callable | None:
    """The compiled decode attention (`quillgpt.kernels`), where it serves a cache held in `keys`:
    on the CPU, float32 or bfloat16, no gradients wanted (it has no backward); None: PyTorch's SDPA."""
    if keys.device.type != "cpu" or keys.dtype not in (torch.float32, torch.bfloat16):
        return None
    return None if torch.is_grad_enabled() else decode_attention_op()


class KVCache(Cache):
    """Keys and values of every layer for up to `batch_size` sequences of up to `block_size` tokens.

    Each row belongs to one sequence, its tokens at their own positions from 0: rows of different
    lengths need no left padding, and a row can be refilled while the others keep decoding
    (continuous batching). It lives outside the model, so it is never part of the state dict.
    Decoding one token per row on a CPU attends through the compiled decode kernel (which also reads
    a bfloat16 cache); prompts, and everything elsewhere, through PyTorch's SDPA (`pytorch_attention`).
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # (n_layer, B, nh, block_size, hs)

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

    def prepare(self, pos: torch.Tensor) -> KVCacheStep:
        B, T = pos.shape
        first = int(pos[0, 0])
        kv_len = int(pos.max()) + 1
        uniform = bool((pos == torch.arange(first, first + T, device=pos.device)).all())
        start = first if uniform else None
        if T == 1 and (kernel := decode_kernel(self.k)) is not None:  # one new token per row
            return KVCacheStep(
                self, pos, start, kv_len, mask=None, causal=False, kernel=kernel, lengths=(pos[:, 0] + 1).long()
            )
        if uniform and T == 1:  # one new token per row, rows level: it may see every cached key
            return KVCacheStep(self, pos, first, kv_len, mask=None, causal=False)
        if uniform and first == 0:  # a fresh prompt: plain causal attention
            return KVCacheStep(self, pos, first, kv_len, mask=None, causal=True)
        # a key is visible to a query when its position is not later than the query's
        mask = torch.arange(kv_len, device=pos.device) <= pos[:, None, :, None]  # (B, 1, T, kv_len)
        return KVCacheStep(self, pos, start, kv_len, mask=mask, causal=False)


@dataclass
class KVCacheStep(CacheStep):
    """How one forward call writes and reads a `KVCache`; worked out once, used by every layer."""

    cache: KVCache
    pos: torch.Tensor
    start: int | None
    """Every row writes positions start..start+T-1 (a slice), or None: rows write their own positions."""
    kv_len: int
    mask: torch.Tensor | None
    causal: bool
    kernel: Callable | None = None
    """The compiled decode attention, for one new token per row; None: PyTorch's SDPA."""
    lengths: torch.Tensor | None = None
    """(B,) how many keys each row attends to, for the kernel."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, nh, T, hs = k.shape
        ck, cv = self.cache.k[layer], self.cache.v[layer]  # (batch_size, nh, block_size, hs)
        if self.start is not None:
            ck[:B, :, self.start : self.start + T] = k
            cv[:B, :, self.start : self.start + T] = v
        else:
            rows = torch.arange(B, device=k.device)[:, None]  # (B, 1)
            ck[rows, :, self.pos] = k.transpose(1, 2).to(ck.dtype)  # (B, T, nh, hs) into (B, nh, Tmax, hs)
            cv[rows, :, self.pos] = v.transpose(1, 2).to(cv.dtype)
        keys, values = ck[:B, :, : self.kv_len], cv[:B, :, : self.kv_len]  # (B, nh, kv_len, hs)
        if self.kernel is None:
            return pytorch_attention(q, keys, values, self.mask, self.causal)
        return self.kernel(q[:, :, 0].float(), keys, values, self.lengths).to(q.dtype).view(B, 1, nh * hs)
