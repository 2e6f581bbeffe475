"""Sampling settings: `SamplingParams`, the one table of their defaults and ranges, and the one way
the shells (CLI, HTTP API, playground) build them.

`LIMITS` is read three times and written once: by `SamplingParams`' validation, by the API's
request schemas (pydantic `Field` bounds, so /docs shows them), and for the defaults. The HTTP
API may cap a setting lower than the library does (`api_high`: OpenAI's range for temperature, a
sanity cap for top-k), never differently otherwise. The sampler itself is in `quillgpt.generate`.

The ranges keep the sampler's float32 arithmetic finite for any finite logits a model produces:
every value must be finite, the repetition penalty lies in [0.01, 10] (dividing by a denormal
such as 1e-323 overflowed to inf and made the probabilities NaN), top_p in [1e-6, 1] (a denormal
is 0 in float32 and dropped every token), and a temperature above 0 but
below `MIN_TEMPERATURE` is taken as 0, greedy (the one clamping rule: it is what such a
temperature tends to, and dividing by it could overflow).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any


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
