"""Generation: a batched decoder on token ids, and the text layer over it.

Layers, bottom up (the settings, `SamplingParams`, are in `quillgpt.sampling`):
- the sampler (`quillgpt.sampling.sample_next_tokens`): a batch of logits rows → one token per row.
- `Decoder`: continuous batching on ids. Sequences join and leave between steps; each owns one row
  of the `KVCache`, its tokens at their own positions, so decode steps over rows of different
  lengths need no padding (only prompts encoded together are padded, to their longest).
- `TextRequest`, `generate`, `stream`: text in, text out — detokenizing without splitting UTF-8
  characters and stopping on stop strings. The server's engine and the playground's token stream
  (`quillgpt.playground.local.token_chunks`) use the same pieces.

Context overflow policy: a sequence sees at most `block_size` tokens. When its window is full, the
oldest tokens are dropped so that the last `ceil(KEEP_FRACTION * block_size)` remain; they are
re-encoded into the cache (one prefill) and decoding continues incrementally. Decoding without the
cache follows the same rule, so both see identical contexts and greedy outputs are identical.
A prompt longer than the context keeps its last `block_size` tokens (`prompt_truncated`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from quillgpt.model import GPT, KVCache
from quillgpt.sampling import SamplingParams, sample_next_tokens
from quillgpt.tokenizer import TextStreamer, TextTokenizer

KEEP_FRACTION = 0.75


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SequenceState:
    """One prompt being decoded: its ids, settings, random generator and progress."""

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
        dtype = KVCache.dtype_for(model)
        self.cache = KVCache.allocate(self.config, max_batch, self.device, dtype) if use_cache else None
        self.active: list[SequenceState] = []
        self.keep = max(1, math.ceil(KEEP_FRACTION * self.config.block_size))

    def add(self, seq: SequenceState) -> None:
        if len(self.active) >= self.max_batch:
            raise RuntimeError(f"decoder is full ({self.max_batch} sequences)")
        V, block = self.config.vocab_size, self.config.block_size
        if max(seq.prompt) >= V or min(seq.prompt) < 0:
            raise ValueError(f"prompt token ids must be in [0, {V})")
        if len(seq.tokens) > block:
            seq.start, seq.prompt_truncated = len(seq.tokens) - block, True
        seq.cached = 0
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
        if len(seq.tokens) - seq.start > self.config.block_size:  # window full: keep the tail
            seq.start, seq.cached = len(seq.tokens) - self.keep, 0

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


class StopStrings:
    """Releases text only once it cannot be the start of a stop string; finds the earliest stop."""

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(stops)
        self.buffer = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was reached)."""
        self.buffer += piece
        if not self.stops:
            out, self.buffer = self.buffer, ""
            return out, False
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buffer)), hold, -1):
                if self.buffer.endswith(s[:n]):
                    hold = n
                    break
        cut = len(self.buffer) - hold
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


class TextRequest:
    """The text side of one generation: prompt encoding, UTF-8-safe detokenizing, stop strings."""

    def __init__(self, tokenizer: TextTokenizer, prompt: str | list[int], params: SamplingParams):
        """`prompt` is text, or token ids (as OpenAI's API allows); empty means the start token."""
        self.tokenizer = tokenizer
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt) if prompt else tokenizer.start_ids()
        else:
            ids = list(prompt) or tokenizer.start_ids()
            if any(not isinstance(i, int) or not 0 <= i < tokenizer.vocab_size for i in ids):
                raise ValueError(f"prompt token ids must be integers in [0, {tokenizer.vocab_size})")
        eot = tokenizer.eot_id
        self.seq = SequenceState(ids, params, stop_ids=frozenset() if eot is None else frozenset({eot}))
        self.streamer = TextStreamer(tokenizer)
        self.stops = StopStrings(params.stop)
        self.text = ""

    def push(self, token: int) -> str:
        """Feed the token the decoder produced; return the new text that may be shown."""
        if token in self.seq.stop_ids:
            return self.finish()
        piece, stopped = self.stops.feed(self.streamer.push(token))
        if stopped:
            self.seq.finish("stop")
            self.streamer.discard()
        elif self.seq.done:
            piece += self._flush()
        self.text += piece
        return piece

    def finish(self) -> str:
        """Text still held back when generation ends for a reason other than a stop string."""
        piece = self._flush()
        self.text += piece
        return piece

    def _flush(self) -> str:
        tail, stopped = self.stops.feed(self.streamer.flush())
        if stopped:
            self.seq.finish("stop")
            return tail
        return tail + self.stops.flush()


@dataclass
class Completion:
    prompt: str
    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str
    logprobs: list[TokenLogprob]
    prompt_truncated: bool = False


def _completion(req: TextRequest, prompt: str) -> Completion:
    seq = req.seq
    return Completion(
        prompt,
        req.text,
        seq.generated,
        len(seq.prompt),
        seq.finish_reason or "length",
        seq.logprobs,
        seq.prompt_truncated,
    )


def generate(
    model: GPT,
    tokenizer: TextTokenizer,
    prompts: str | list[str],
    params: SamplingParams | None = None,
    *,
    use_cache: bool = True,
    max_batch: int = 16,
) -> list[Completion]:
    """Complete one or several prompts, batched (`max_batch` at a time)."""
    params = params or SamplingParams()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    requests = [TextRequest(tokenizer, p, params) for p in prompts]
    decoder = Decoder(model, max_batch=min(max_batch, len(requests)), use_cache=use_cache)
    by_seq = {id(r.seq): r for r in requests}
    waiting = list(requests)
    while waiting or decoder.active:
        while waiting and len(decoder.active) < decoder.max_batch:
            decoder.add(waiting.pop(0).seq)
        decoder.step(lambda seq, token: by_seq[id(seq)].push(token))
    return [_completion(r, p) for r, p in zip(requests, prompts)]


def stream(model: GPT, tokenizer: TextTokenizer, prompt: str, params: SamplingParams | None = None) -> Iterator[str]:
    """Yield text pieces as they are generated; never a broken UTF-8 character, never a stop string."""
    req = TextRequest(tokenizer, prompt, params or SamplingParams())
    pieces: list[str] = []
    decoder = Decoder(model, max_batch=1)
    decoder.add(req.seq)
    while decoder.active:
        decoder.step(lambda seq, token: pieces.append(req.push(token)))
        yield from filter(None, pieces)
        pieces.clear()
    if tail := req.finish():
        yield tail
