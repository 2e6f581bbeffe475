"""Sampling settings at their limits: the table rejects what is unsafe, and the sampler turns every
valid setting into a valid token (no inf, no NaN) — through `sample_next_token` and `generate`."""

import itertools
import math

import pytest
import torch

from quillgpt.generate import generate
from quillgpt.sampling import LIMITS, MIN_TEMPERATURE, SamplingError, SamplingParams, sample_next_token
from tests.test_generate import noisy_model


@pytest.mark.parametrize(
    "name, value",
    [
        ("repetition_penalty", 1e-323),  # issue 16: logits / 1e-323 = inf, probabilities NaN, HTTP 500
        ("repetition_penalty", 5e-324),
        ("repetition_penalty", 0.0099),
        ("repetition_penalty", 1e308),
        ("repetition_penalty", math.inf),
        ("temperature", 1e308),
        ("temperature", math.inf),
        ("temperature", -5e-324),
        ("top_p", math.nan),
        ("top_p", 5e-324),  # 0 in float32: every token was dropped, the probabilities NaN
        ("top_p", 1e-7),
        ("presence_penalty", -math.inf),
        ("frequency_penalty", 1e300),
    ],
)
def test_unsafe_values_are_rejected_naming_the_field(name, value):
    with pytest.raises(SamplingError, match=name):
        SamplingParams(**{name: value})


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-10, MIN_TEMPERATURE / 2])
def test_tiny_temperatures_are_greedy(temperature):
    params = SamplingParams(temperature=temperature)
    assert params.temperature == 0 and params.greedy
    assert SamplingParams(temperature=MIN_TEMPERATURE).temperature == MIN_TEMPERATURE


def _edges(name: str) -> list:
    limit = LIMITS[name]
    return [v for v in (limit.low, limit.high, limit.default) if v is not None]


# Every combination of the settings at their edges.
EXTREMES = {
    "temperature": [0.0, MIN_TEMPERATURE, 2.0, 100.0],
    "top_k": [None, 1, 2],
    "top_p": _edges("top_p"),
    "repetition_penalty": _edges("repetition_penalty"),
    "presence_penalty": _edges("presence_penalty"),
    "frequency_penalty": [-2.0, 2.0],
}


def _rows(V: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(V, generator=g) * 1e4
    masked = torch.randn(V, generator=g)
    masked[: V - 2] = -math.inf  # a model (or a logits processor) may rule tokens out
    return {
        "big": big,
        "all negative": -big.abs() - 1e3,
        "flat": torch.zeros(V),
        "masked": masked,
    }


def _reference_argmax(row: torch.Tensor, params: SamplingParams, seen: torch.Tensor, counts: torch.Tensor) -> int:
    """The penalised argmax, in float64 (what greedy, top_k=1 and a tiny top_p must pick)."""
    x = row.double()
    penalised = torch.where(x > 0, x / params.repetition_penalty, x * params.repetition_penalty)
    x = torch.where(seen, penalised, x)
    x = x - (params.frequency_penalty * counts.double() + params.presence_penalty * (counts > 0).double())
    return int(torch.argmax(x))


def test_sample_next_token_gives_a_valid_token_at_every_extreme():
    V = 50
    seen = torch.zeros(V, dtype=torch.bool)
    seen[::2] = True
    counts = torch.zeros(V)
    counts[::2] = 1e6  # a long generation of few distinct tokens
    for (row_name, row), values in itertools.product(_rows(V).items(), itertools.product(*EXTREMES.values())):
        params = SamplingParams(**dict(zip(EXTREMES, values)))
        for s, c in ((seen, counts), (torch.ones(V, dtype=torch.bool), torch.full((V,), 3.0))):
            g = torch.Generator().manual_seed(1)
            case = f"{row_name} row, {params}"
            token = sample_next_token(row.clone(), params, g, s, c)
            assert isinstance(token, int) and 0 <= token < V, case
            assert row[token] > -math.inf, f"picked a ruled-out token: {case}"
            if params.greedy or params.top_k == 1 or params.top_p < 1e-6:
                want = _reference_argmax(row, params, s, c)
                assert token == want or row[token] == row[want], case


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=100.0, repetition_penalty=0.01, presence_penalty=-2.0, frequency_penalty=-2.0),
        dict(temperature=MIN_TEMPERATURE, repetition_penalty=10.0, presence_penalty=2.0, frequency_penalty=2.0),
        dict(temperature=1e-300, top_p=1e-6, repetition_penalty=0.01),
        dict(temperature=2.0, top_k=1, frequency_penalty=2.0, logprobs=20),
    ],
)
def test_generate_stays_finite_at_the_extremes(char_tokenizer, settings):
    model = noisy_model(char_tokenizer)
    params = SamplingParams(max_new_tokens=40, seed=3, logprobs=settings.pop("logprobs", 5), **settings)
    for c in generate(model, char_tokenizer, ["All:", "S"], params):
        assert len(c.tokens) == 40 and all(0 <= t < char_tokenizer.vocab_size for t in c.tokens)
        assert all(math.isfinite(lp.logprob) and all(math.isfinite(v) for _, v in lp.top) for lp in c.logprobs)
