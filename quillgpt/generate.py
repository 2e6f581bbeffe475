"""Generation: the sampler, a batched decoder on token ids, and the text layer over it.

Layers, bottom up:
- `sample_next_token`: one row of logits → one token (temperature, top-k, top-p, penalties, seed).
- `Decoder`: continuous batching on ids. Sequences join and leave between steps; each owns one row
  of the `KVCache`, its tokens at their own positions, so rows of different lengths need no padding.
- `TextRequest`, `generate`, `stream`: text in, text out — detokenizing without splitting UTF-8
  characters and stopping on stop strings. The server's engine uses the same pieces.
- `stream_with_probs`: `stream` with each token's own text, its probability and the alternatives
  the model weighed (the playground colours text with them).

Context overflow policy: a sequence sees at most `block_size` tokens. When its window is full, the
oldest tokens are dropped so that the last `ceil(KEEP_FRACTION * block_size)` remain; they are
re-encoded into the cache (one prefill) and decoding continues incrementally. Decoding without the
cache follows the same rule, so both see identical contexts and greedy outputs are identical.
A prompt longer than the context keeps its last `block_size` tokens (`prompt_truncated`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from quillgpt.model import GPT, KVCache
from quillgpt.tokenizer import TextStreamer, TextTokenizer

KEEP_FRACTION = 0.75


class SamplingError(ValueError):
    """Sampling settings outside their valid ranges."""


@dataclass
class SamplingParams:
    """How to pick tokens. Defaults sample from the model's own distribution."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_k: int | None = None
    """Keep only the k most likely tokens."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    repetition_penalty: float = 1.0
    """CTRL/HF-style: logits of tokens already in the prompt or output are divided by it (>1 discourages)."""
    presence_penalty: float = 0.0
    """OpenAI-style: subtracted once from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """OpenAI-style: subtracted per occurrence of a token already generated."""
    stop: tuple[str, ...] = ()
    """Text that ends generation; it is not included in the output."""
    seed: int | None = None
    """Seeds this sequence's own torch.Generator: same seed, same output, alone or batched."""
    logprobs: int | None = None
    """Return the chosen tokens' log-probabilities and this many top alternatives (0: chosen only)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise SamplingError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise SamplingError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise SamplingError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise SamplingError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError("stop strings must be non-empty strings")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise SamplingError(f"logprobs must be in [0, 20], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def sample_next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> int:
    """Pick one token from a (V,) row of logits.

    `seen` (bool, V) marks tokens in the prompt or output, for the repetition penalty; `counts`
    (float, V) counts generated tokens, for presence and frequency penalties.
    """
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if counts is not None and (params.presence_penalty or params.frequency_penalty):
        logits = logits - (params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float())
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature  # a new tensor: the filters below may write into it
    if params.top_k is not None and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits[logits < kth] = -math.inf
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p; the first always stays
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        logits[order[drop]] = -math.inf
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Sequence:
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
    counts: Counter[int] = field(init=False, default_factory=Counter, repr=False)
    """How often each token was generated (presence and frequency penalties)."""

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("a sequence needs at least one prompt token")
        self.tokens = list(self.prompt)
        self.start = 0
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    def penalty_inputs(self, vocab_size: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`seen` and `counts` tensors for sample_next_token, built only when a penalty asks for them."""
        p = self.params
        seen = counts = None
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(vocab_size, dtype=torch.bool)
            seen[list(set(self.tokens))] = True
        if p.presence_penalty or p.frequency_penalty:
            counts = torch.zeros(vocab_size)
            if self.counts:
                counts[list(self.counts)] = torch.tensor(list(self.counts.values()), dtype=torch.float)
        return seen, counts

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
        dtype = next(model.parameters()).dtype
        self.cache = KVCache.allocate(self.config, max_batch, self.device, dtype) if use_cache else None
        self.active: list[Sequence] = []
        self.keep = max(1, math.ceil(KEEP_FRACTION * self.config.block_size))

    def add(self, seq: Sequence) -> None:
        if len(self.active) >= self.max_batch:
            raise RuntimeError(f"decoder is full ({self.max_batch} sequences)")
        V, block = self.config.vocab_size, self.config.block_size
        if max(seq.prompt) >= V or min(seq.prompt) < 0:
            raise ValueError(f"prompt token ids must be in [0, {V})")
        if len(seq.tokens) > block:
            seq.start, seq.prompt_truncated = len(seq.tokens) - block, True
        seq.cached = 0
        self.active.append(seq)

    def remove(self, seq: Sequence) -> None:
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
    def step(self, on_token: Callable[[Sequence, int], None] | None = None) -> list[tuple[Sequence, int]]:
        """One decode step for every active sequence. `on_token(seq, token)` runs for each new token
        before finished sequences leave the batch, so it may finish a sequence itself (stop strings)."""
        if not self.active:
            return []
        logits = self._forward_cached() if self.use_cache else self._forward_uncached()  # (B, V)
        out = []
        for seq, row in zip(self.active, logits):
            token = sample_next_token(row, seq.params, seq.generator, *seq.penalty_inputs(self.config.vocab_size))
            if seq.params.logprobs is not None:
                seq.logprobs.append(_logprob(row, token, seq.params.logprobs))
            self._append(seq, token)
            if on_token is not None:
                on_token(seq, token)
            out.append((seq, token))
        for seq in [s for s in self.active if s.done]:
            self.remove(seq)
        return out

    def _append(self, seq: Sequence, token: int) -> None:
        seq.tokens.append(token)
        seq.counts[token] += 1
        if token in seq.stop_ids:
            seq.finish("stop")
        elif len(seq.tokens) - len(seq.prompt) >= seq.params.max_new_tokens:
            seq.finish("length")
        if len(seq.tokens) - seq.start > self.config.block_size:  # window full: keep the tail
            seq.start, seq.cached = len(seq.tokens) - self.keep, 0

    def _forward_cached(self) -> torch.Tensor:
        # Catch up rows with several uncached tokens (new prompts, re-encoded windows) one by one,
        # leaving exactly one pending token per row; then decode all rows in one batched call.
        for i, seq in enumerate(self.active):
            pending = len(seq.tokens) - seq.start - seq.cached
            if pending > 1:
                window = seq.tokens[seq.start + seq.cached : len(seq.tokens) - 1]
                idx = torch.tensor([window], device=self.device)
                pos = torch.arange(seq.cached, seq.cached + len(window), device=self.device)[None]
                self.model(idx, pos=pos, cache=self.cache.rows(i, i + 1), last_only=True)
                seq.cached += len(window)
        B = len(self.active)
        idx = torch.tensor([[s.tokens[-1]] for s in self.active], device=self.device)
        pos = torch.tensor([[s.cached] for s in self.active], device=self.device)
        logits, _ = self.model(idx, pos=pos, cache=self.cache.rows(0, B), last_only=True)
        for seq in self.active:
            seq.cached += 1
        return logits[:, -1]

    def _forward_uncached(self) -> torch.Tensor:
        rows = []
        for seq in self.active:
            idx = torch.tensor([seq.tokens[seq.start :]], device=self.device)
            logits, _ = self.model(idx, last_only=True)
            rows.append(logits[0, -1])
        return torch.stack(rows)


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
        eot = getattr(tokenizer, "eot_id", None)
        self.seq = Sequence(ids, params, stop_ids=frozenset() if eot is None else frozenset({eot}))
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
            self.streamer.pending.clear()
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


@dataclass
class TokenText:
    """A generated token as text, with the model's own probability for it (before temperature and filters)."""

    text: str
    """The token's text. A token ending inside a UTF-8 character shows no text: it joins the next one."""
    prob: float
    """The token's probability; for tokens joined into one text, the product of theirs."""
    top: list[tuple[str, float]] = field(default_factory=list)
    """The most likely tokens at its position, (text, probability), most likely first."""


@dataclass
class TextPiece:
    """What one decode step of `stream_with_probs` produced."""

    text: str
    """New text that may be shown: never a broken UTF-8 character, never part of a stop string."""
    tokens: list[TokenText]
    """The tokens behind it, each with its own text (a stop string's tokens too: they are generated)."""
    finish_reason: str | None = None
    """Set on the last piece only: "stop" or "length"."""
    prompt_truncated: bool = False


def stream_with_probs(
    model: GPT, tokenizer: TextTokenizer, prompt: str, params: SamplingParams | None = None, *, alternatives: int = 5
) -> Iterator[TextPiece]:
    """`stream`, with each token's probability and its `alternatives` most likely rivals.

    A prompt the tokenizer cannot encode raises here, before the first piece is asked for.
    """
    params = dataclasses.replace(params or SamplingParams(), logprobs=alternatives)
    return _pieces(model, TextRequest(tokenizer, prompt, params))


def _pieces(model: GPT, req: TextRequest) -> Iterator[TextPiece]:
    tokenizer = req.tokenizer
    own = TextStreamer(tokenizer)  # each token's own text, whatever the stop strings hold back
    held = 1.0  # the probability of tokens waiting for the rest of their UTF-8 character
    piece = TextPiece("", [])

    def on_token(seq: Sequence, token: int) -> None:
        nonlocal held
        piece.text += req.push(token)
        lp = seq.logprobs[-1]
        held *= math.exp(lp.logprob)
        if text := own.push(token):
            top = [(tokenizer.decode([i]), math.exp(v)) for i, v in lp.top]
            piece.tokens.append(TokenText(text, held, top))
            held = 1.0

    decoder = Decoder(model, max_batch=1)
    decoder.add(req.seq)
    while decoder.active:
        decoder.step(on_token)
        yield piece
        piece = TextPiece("", [])
    tail, rest = req.finish(), own.flush()
    seq = req.seq
    yield TextPiece(tail, [TokenText(rest, held)] if rest else [], seq.finish_reason or "length", seq.prompt_truncated)
