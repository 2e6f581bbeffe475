"""The GPT decoder: `CausalSelfAttention`, `MLP`, `Block`, `GPT`.

Names follow GPT-2 (`wte`, `wpe`, `c_attn`, `c_proj`, `ln_f`, `lm_head`) so weights map one-to-one
onto HuggingFace's `GPT2LMHeadModel`. Shapes: B batch, T time, C n_embd, nh heads, hs head size,
H the MLP's hidden width, V vocabulary. Decoding passes a key/value cache (`quillgpt.kvcache`);
CPU decoding swaps modules for faster ones (`quillgpt.infer`), and nothing here knows about that.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from quillgpt.config import GPTConfig
from quillgpt.kvcache import Cache, CacheStep, pytorch_attention


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.norm_eps, elementwise_affine=config.norm_affine)
    return nn.LayerNorm(
        dim, eps=config.norm_eps, elementwise_affine=config.norm_affine, bias=config.bias and config.norm_affine
    )


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
    x1, x2 = x.float().chunk(2, dim=-1)  # (..., hs/2) each
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
        q, k, v = self.c_attn(x).split(self.n_head * self.head_size, dim=2)  # (B, T, nh*hs) each
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return q, k, v

    def forward(self, x, rope=None, cache: CacheStep | None = None, layer: int = 0):
        q, k, v = self.qkv(x, rope)  # (B, nh, T, hs) each
        if cache is None:
            dropout = self.dropout if self.training else 0.0
            y = pytorch_attention(q, k, v, causal=True, dropout=dropout)  # (B, T, nh*hs)
        else:
            y = cache.attend(layer, q, k, v)  # (B, T, nh*hs)
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        width = 2 * config.hidden_dim if config.activation == "swiglu" else config.hidden_dim
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.act = Activation(config.activation)
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.act(self.c_fc(x))  # (B, T, H)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Activation(nn.Module):
    """The MLP's non-linearity as a module, so that code readying the model for a backend can swap
    it (e.g. for `nn.Identity` where the linear before it applies it as it writes)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return activate(h, self.name)

    def extra_repr(self) -> str:
        return self.name


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

    def forward(self, x, rope=None, cache: CacheStep | None = None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), rope, cache, layer)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


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
        x = self.transformer.wte(idx)  # (1, T, C)
        if self.transformer.wpe is not None:
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))
        rope = self.rotary(None, T) if self.rotary is not None else None
        maps = []
        for block in self.transformer.h:
            q, k, _ = block.attn.qkv(block.ln_1(x), rope)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (1, nh, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            maps.append(scores.masked_fill(~causal, float("-inf")).softmax(-1)[0])
            x = block(x, rope)  # (1, T, C)
        return maps

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        pos: torch.Tensor | None = None,
        cache: Cache | None = None,
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
            x = block(x, rope, step, i)  # (B, T, C)
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        logits = self.lm_head(x)  # (B, T, V)
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss
