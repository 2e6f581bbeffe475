"""Sampling settings: `SamplingParams`, the one table of their defaults and ranges, and the one way
the shells (CLI, HTTP API, playground) build them.

`LIMITS` is read three times and written once: by `SamplingParams`' validation, by the API's
request schemas (pydantic `Field` bounds, so /docs shows them), and for the defaults. The HTTP
API may cap a setting lower than the library does (`api_high`: OpenAI's range for temperature, a
sanity cap for top-k), never differently otherwise. `sample_next_tokens` is the sampler: a batch of
logits rows in, one token per row out, each row with its own settings and random stream.

The ranges keep the sampler's float32 arithmetic finite for any finite logits a model produces:
every value must be finite, the repetition penalty lies in [0.01, 10] (dividing by a denormal
such as 1e-323 overflowed to inf and made the probabilities NaN), top_p in [1e-6, 1] (a denormal
is 0 in float32 and dropped every token), and a temperature above 0 but
below `MIN_TEMPERATURE` is taken as 0, greedy (the one clamping rule: it is what such a
temperature tends to, and dividing by it could overflow).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch


class SamplingError(ValueError):
    """Sampling settings outside their valid ranges."""


@dataclass(frozen=True)
class Limit:
    """One setting's default and valid range."""

    default: Any
    low: float | None = None
    high: float | None = None
    integer: bool = False
    api_high: float | None = None
    """A lower upper bound for HTTP requests; None: `high`."""

    def check(self, name: str, value: Any) -> None:
        ok = isinstance(value, int) if self.integer else isinstance(value, int | float) and math.isfinite(value)
        ok = ok and (self.low is None or value >= self.low)
        ok = ok and (self.high is None or value <= self.high)
        if not ok:
            raise SamplingError(f"{name} must be {self.describe()}, got {value!r}")

    def describe(self) -> str:
        kind = "an integer " if self.integer else ""
        if self.high is None:
            return f"{kind}>= {self.low:g}"
        return f"{kind}in [{self.low:g}, {self.high:g}]"

    def api_bounds(self) -> dict[str, float]:
        """The range as pydantic `Field` keywords (ge/le)."""
        bounds = {"ge": self.low, "le": self.api_high or self.high}
        return {k: v for k, v in bounds.items() if v is not None}


DEFAULT_TEMPERATURE = 1.0
MIN_TEMPERATURE = 1e-3
"""Temperatures in (0, MIN_TEMPERATURE) sample greedily: `SamplingParams` sets them to 0."""
# 1.0 samples from the distribution the model learned, is `SamplingParams()`'s and OpenAI's default
# (so API clients that omit it get what they expect), and is what most callers already used; the
# CLI (0.8) and the original /generate route (0.7) now default to it too. Pass 0.8 for tamer text.

LIMITS: dict[str, Limit] = {
    "max_new_tokens": Limit(256, low=1, integer=True),
    "temperature": Limit(DEFAULT_TEMPERATURE, low=0, high=100, api_high=2),  # 0 is greedy
    "top_k": Limit(None, low=1, integer=True, api_high=100_000),
    "top_p": Limit(1.0, low=1e-6, high=1),  # a denormal such as 5e-324 is 0 in float32: it dropped every token
    "repetition_penalty": Limit(1.0, low=0.01, high=10),
    "presence_penalty": Limit(0.0, low=-2, high=2),
    "frequency_penalty": Limit(0.0, low=-2, high=2),
    "logprobs": Limit(None, low=0, high=20, integer=True),
}


def normalize_stop(stop: str | Iterable[str] | None) -> tuple[str, ...]:
    """Stop strings as a tuple: one string, several, or none."""
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


@dataclass
class SamplingParams:
    """How to pick tokens. Defaults (from `LIMITS`) sample from the model's own distribution."""

    max_new_tokens: int = LIMITS["max_new_tokens"].default
    temperature: float = LIMITS["temperature"].default
    """0 means greedy (argmax)."""
    top_k: int | None = LIMITS["top_k"].default
    """Keep only the k most likely tokens."""
    top_p: float = LIMITS["top_p"].default
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    repetition_penalty: float = LIMITS["repetition_penalty"].default
    """CTRL/HF-style: logits of tokens already in the prompt or output are divided by it (>1 discourages)."""
    presence_penalty: float = LIMITS["presence_penalty"].default
    """OpenAI-style: subtracted once from the logit of every token already generated."""
    frequency_penalty: float = LIMITS["frequency_penalty"].default
    """OpenAI-style: subtracted per occurrence of a token already generated."""
    stop: tuple[str, ...] = ()
    """Text that ends generation; it is not included in the output. A single string is accepted."""
    seed: int | None = None
    """Seeds this sequence's own torch.Generator: same seed, same output, alone or batched."""
    logprobs: int | None = LIMITS["logprobs"].default
    """Return the chosen tokens' log-probabilities and this many top alternatives (0: chosen only)."""

    def __post_init__(self) -> None:
        self.stop = normalize_stop(self.stop)
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if value is not None or limit.default is not None:
                limit.check(name, value)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError("stop strings must be non-empty strings")
        if 0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_params(values: Mapping[str, Any], **overrides: Any) -> SamplingParams:
    """The one way the shells build SamplingParams: the entries of `values` (parsed CLI flags, an
    API request's fields) that name a setting, None meaning "the default", then `overrides` as given.
    Raises SamplingError for values out of range."""
    names = {f.name for f in fields(SamplingParams)}
    settings = {k: v for k, v in values.items() if k in names and v is not None}
    return SamplingParams(**(settings | overrides))


FLOAT_MAX = torch.finfo(torch.float32).max


def sample_next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row of (B, V) logits, each row with its own settings and random stream.

    The whole batch goes through one set of tensor ops (no loop over rows but one random draw per
    row), so a row's token depends only on its own logits, settings and generator: batched output
    equals unbatched output. `seen` (bool, B×V) marks tokens in each prompt or output, for the
    repetition penalty; `counts` (float, B×V) counts generated tokens, for presence and frequency
    penalties; either may be None when no row asks for that penalty.

    NaN logits (a broken model) raise ValueError. Finite logits never become NaN: values pushed
    past float32's range by a penalty or a tiny temperature are clamped to its largest finite value,
    which leaves the limit the setting tends to (the largest logits share the mass; a temperature
    near 0 is greedy).
    """
    logits = logits.float()
    B, V = logits.shape
    if bool(torch.isnan(logits).any()):  # the model, not the settings, failed: say so, don't sample
        rows = torch.isnan(logits).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"the model produced NaN logits (batch rows {rows})")
    column = lambda values: torch.tensor(values, dtype=torch.float32).unsqueeze(1)  # noqa: E731 - (B, 1)
    if seen is not None and any(p.repetition_penalty != 1.0 for p in params):
        penalty = column([p.repetition_penalty for p in params])
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if counts is not None and any(p.presence_penalty or p.frequency_penalty for p in params):
        frequency, presence = (
            column([p.frequency_penalty for p in params]),
            column([p.presence_penalty for p in params]),
        )
        logits = logits - (frequency * counts + presence * (counts > 0).float())
    greedy = torch.tensor([p.greedy for p in params])
    if bool(greedy.all()):
        return torch.argmax(logits, dim=-1)
    temperature = column([1.0 if p.greedy else p.temperature for p in params])
    logits = torch.nan_to_num(logits / temperature, nan=0.0, posinf=FLOAT_MAX, neginf=-FLOAT_MAX)
    if any(p.top_k is not None and p.top_k < V for p in params):
        k = torch.tensor([min(p.top_k or V, V) for p in params]).unsqueeze(1)  # (B, 1)
        kth = torch.sort(logits, dim=-1, descending=True).values.gather(1, k - 1)  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if any(p.top_p < 1.0 for p in params):
        top_p = column([p.top_p for p in params])
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p; the first always stays
        drop = ((torch.cumsum(probs, dim=-1) - probs) >= top_p) & (top_p < 1.0)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), -math.inf)
    cdf = torch.cumsum(torch.softmax(logits, dim=-1), dim=-1)  # (B, V)
    draws = [torch.zeros(()) if p.greedy else torch.rand((), generator=g) for p, g in zip(params, generators)]
    u = torch.stack(draws).unsqueeze(1) * cdf[:, -1:]  # (B, 1), in [0, total mass)
    # the first token whose cumulative probability passes u: a token with zero probability never does
    sampled = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=V - 1)
    return torch.where(greedy, torch.argmax(logits, dim=-1), sampled)


def sample_next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> int:
    """Pick one token from a (V,) row of logits: `sample_next_tokens` for a batch of one."""
    row = lambda t: None if t is None else t.unsqueeze(0)  # noqa: E731
    return int(sample_next_tokens(logits.unsqueeze(0), [params], [generator], row(seen), row(counts))[0])
