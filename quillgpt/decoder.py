"""Batched decoding on token ids: sequences at their own positions, each in its own KV cache row.

`Decoder` does continuous batching: sequences join and leave between steps; each owns one row of
the `KVCache`, its tokens at their own positions, so decode steps over rows of different lengths need
no padding (only prompts encoded together are padded, to their longest). It knows nothing about text:
`quillgpt.generate` is the text layer over it, and the server's engine drives it too. The sampler is
`quillgpt.sampling.sample_next_tokens`: a batch of logits rows → one token per row.

Context overflow policy (`ContextWindow`, the one place it is decided): a sequence sees at most
`block_size` tokens. A prompt longer than the context keeps its last `block_size` tokens
(`prompt_truncated`). When a window fills while decoding, the oldest tokens are dropped so that the
last `ceil(KEEP_FRACTION * block_size)` remain; they are re-encoded into the cache (one prefill) and
decoding continues incrementally. Decoding without the cache follows the same rule, so both see
identical contexts and greedy outputs are identical.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from quillgpt.infer.prepare import kv_cache_dtype
from quillgpt.kvcache import KVCache
from quillgpt.model import GPT
from quillgpt.sampling import SamplingParams, sample_next_tokens

KEEP_FRACTION = 0.75


@dataclass
class TokenLogprob:
    """The model's own log-probability of a chosen token, and its `top` alternatives as (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SequenceState:
    """One prompt being decoded: its ids, settings, random generator and progress.

    The caller sets `prompt`, `params` and `stop_ids`, and may `finish` a sequence (a stop string).
    Everything else is the decoder's progress, written only by a `Decoder`: the tokens, the window
    (`start`, `cached`, `prompt_truncated`), the log-probabilities. It stays valid between decoders,
    so a sequence removed from one may be added to another (same model) and carries on where it was.
    """

    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int] = frozenset()
    tokens: list[int] = field(init=False)
    start: int = field(init=False)
    """Index in `tokens` of the first token in the context window."""
    cached: int = 0
    """How many tokens of the window are already in the KV cache."""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_truncated: bool = False
    generator: torch.Generator | None = field(init=False, default=None, repr=False)
    """This sequence's own random stream (seeded from `params.seed`), or the global one."""
    seen: torch.Tensor | None = field(init=False, default=None, repr=False)
    """(V,) bool: tokens in the prompt or output, kept only when the repetition penalty is on."""
    counts: torch.Tensor | None = field(init=False, default=None, repr=False)
    """(V,) float: how often each token was generated, kept only for presence/frequency penalties."""

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("a sequence needs at least one prompt token")
        self.tokens = list(self.prompt)
        self.start = 0
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    def track_penalties(self, vocab_size: int) -> None:
        """Start the `seen`/`counts` rows the penalties read, if this sequence's settings use them."""
        p = self.params
        if p.repetition_penalty != 1.0 and self.seen is None:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[self.tokens] = True
        if (p.presence_penalty or p.frequency_penalty) and self.counts is None:
            self.counts = torch.zeros(vocab_size)
            for token in self.generated:
                self.counts[token] += 1

    def record(self, token: int) -> None:
        self.tokens.append(token)
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason


@dataclass(frozen=True)
class ContextWindow:
    """The context-overflow policy: which tokens of a sequence the model sees (see the module docstring)."""

    block_size: int
    keep: int
    """How many of the newest tokens a full window keeps when it slides."""

    @classmethod
    def for_block(cls, block_size: int) -> ContextWindow:
        return cls(block_size, max(1, math.ceil(KEEP_FRACTION * block_size)))

    def fit(self, seq: SequenceState) -> None:
        """Move `seq`'s window start so that it holds at most `block_size` tokens. A window that
        already fits is left as it is, so fitting a sequence again (on joining another decoder)
        changes nothing."""
        if len(seq.tokens) - seq.start <= self.block_size:
            return
        if seq.generated:  # filled while decoding: keep the tail, re-encoded from scratch
            seq.start, seq.cached = len(seq.tokens) - self.keep, 0
        else:  # a prompt longer than the context
            seq.start, seq.prompt_truncated = len(seq.tokens) - self.block_size, True


class Decoder:
    """Batched decoding of token ids with a KV cache (or, for reference, without one).

    `add` queues a sequence; `step` runs one decode step for every active sequence and returns the
    (sequence, token) pairs it produced. Finished sequences leave the batch after the step, and new
    ones join at the next step: continuous batching.
    """

    def __init__(self, model: GPT, max_batch: int = 16, use_cache: bool = True):
        self.model = model
        self.config = model.config
        self.max_batch = max_batch
        self.use_cache = use_cache
        self.device = next(model.parameters()).device
        dtype = kv_cache_dtype(model)
        self.cache = KVCache.allocate(self.config, max_batch, self.device, dtype) if use_cache else None
        self.active: list[SequenceState] = []
        self.window = ContextWindow.for_block(self.config.block_size)

    def add(self, seq: SequenceState) -> None:
        """Queue a new sequence, or one under way that left another decoder: its window is kept and
        re-encoded into this decoder's cache at the next step."""
        if len(self.active) >= self.max_batch:
            raise RuntimeError(f"decoder is full ({self.max_batch} sequences)")
        V = self.config.vocab_size
        if max(seq.prompt) >= V or min(seq.prompt) < 0:
            raise ValueError(f"prompt token ids must be in [0, {V})")
        self.window.fit(seq)
        seq.cached = 0  # nothing of it is in this decoder's cache yet
        seq.track_penalties(V)
        self.active.append(seq)

    def remove(self, seq: SequenceState) -> None:
        """Drop a sequence (finished or cancelled); the last row moves into its cache row."""
        i = self.active.index(seq)
        last = len(self.active) - 1
        if self.cache is not None and i != last:
            n = self.active[last].cached
            self.cache.k[:, i, :, :n] = self.cache.k[:, last, :, :n]
            self.cache.v[:, i, :, :n] = self.cache.v[:, last, :, :n]
        self.active[i] = self.active[last]
        self.active.pop()

    @torch.inference_mode()
    def step(self, on_token: Callable[[SequenceState, int], None] | None = None) -> list[tuple[SequenceState, int]]:
        """One decode step for every active sequence. `on_token(seq, token)` runs for each new token
        before finished sequences leave the batch, so it may finish a sequence itself (stop strings)."""
        if not self.active:
            return []
        logits = self._forward_cached() if self.use_cache else self._forward_uncached()  # (B, V)
        tokens = sample_next_tokens(
            logits, [s.params for s in self.active], [s.generator for s in self.active], *self._penalty_rows()
        ).tolist()
        out = []
        for seq, row, token in zip(self.active, logits, tokens):
            if seq.params.logprobs is not None:
                seq.logprobs.append(_logprob(row, token, seq.params.logprobs))
            self._append(seq, token)
            if on_token is not None:
                on_token(seq, token)
            out.append((seq, token))
        for seq in [s for s in self.active if s.done]:
            self.remove(seq)
        return out

    def _penalty_rows(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(B, V) `seen` and `counts` for the sampler, or None where no active sequence needs them."""
        V = self.config.vocab_size
        seen = counts = None
        if any(s.seen is not None for s in self.active):
            no_row = torch.zeros(V, dtype=torch.bool)
            seen = torch.stack([no_row if s.seen is None else s.seen for s in self.active])
        if any(s.counts is not None for s in self.active):
            no_row = torch.zeros(V)
            counts = torch.stack([no_row if s.counts is None else s.counts for s in self.active])
        return seen, counts

    def _append(self, seq: SequenceState, token: int) -> None:
        seq.record(token)
        if token in seq.stop_ids:
            seq.finish("stop")
        elif len(seq.tokens) - len(seq.prompt) >= seq.params.max_new_tokens:
            seq.finish("length")
        self.window.fit(seq)

    def _forward_cached(self) -> torch.Tensor:
        self._catch_up()
        B = len(self.active)
        idx = torch.tensor([[s.tokens[-1]] for s in self.active], device=self.device)
        pos = torch.tensor([[s.cached] for s in self.active], device=self.device)
        logits, _ = self.model(idx, pos=pos, cache=self.cache.rows(0, B), last_only=True)
        for seq in self.active:
            seq.cached += 1
        return logits[:, -1]

    def _catch_up(self) -> None:
        """Encode the window of each row that starts one (a new prompt, or a window re-encoded after
        it filled: `cached` is 0), all but its last token, leaving one pending token per row for the
        decode step.

        Neighbouring rows share calls (sequences that join together sit in neighbouring rows): a
        burst of 16 prompts of similar length is one prefill, not 16. Shorter windows are padded at
        the end, to at most half again a call's real tokens (`padded_groups`); a pad's key lands past
        its row's last real position, where no real query looks (causal attention) and which
        decoding writes over before it reads it."""
        row = 0
        for starting, run in itertools.groupby(self.active, key=lambda s: len(s.tokens) - s.start - s.cached > 1):
            seqs = list(run)
            if starting:
                windows = [s.tokens[s.start : -1] for s in seqs]
                for i, j in padded_groups([len(w) for w in windows]):
                    T = max(len(w) for w in windows[i:j])
                    idx = torch.tensor([w + w[-1:] * (T - len(w)) for w in windows[i:j]], device=self.device)
                    self.model(idx, cache=self.cache.rows(row + i, row + j), last_only=True)  # positions 0..T-1
                for seq, window in zip(seqs, windows):
                    seq.cached = len(window)
            row += len(seqs)

    def _forward_uncached(self) -> torch.Tensor:
        rows = []
        for seq in self.active:
            idx = torch.tensor([seq.tokens[seq.start :]], device=self.device)
            logits, _ = self.model(idx, last_only=True)
            rows.append(logits[0, -1])
        return torch.stack(rows)


def padded_groups(lengths: list[int], waste: float = 0.5) -> list[tuple[int, int]]:
    """Split windows of these lengths, in order, into runs [i, j) encoded together, each padded to
    its longest: a run grows while its padding stays within `waste` of its real tokens, so a long
    prompt beside short ones is not paid for once per row."""
    groups, i = [], 0
    while i < len(lengths):
        j = i + 1
        while j < len(lengths) and max(lengths[i : j + 1]) * (j + 1 - i) <= (1 + waste) * sum(lengths[i : j + 1]):
            j += 1
        groups.append((i, j))
        i = j
    return groups


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The model's own log-probabilities (before temperature and filters)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    alternatives = []
    if top:
        values, ids = torch.topk(logp, min(top, logp.numel()))
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logp[token]), alternatives)
