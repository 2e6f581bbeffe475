import asyncio
import dataclasses

import pytest
import torch

from quillgpt.generate import generate
from quillgpt.sampling import SamplingParams
from quillgpt.serve.engine import (
    Engine,
    EngineClosed,
    EngineError,
    FinishEvent,
    GenerationTimeout,
    QueueFull,
    TokenEvent,
)
from quillgpt.serve.errors import from_engine_error
from tests.serve.conftest import wait_until


class Recorder:
    def __init__(self):
        self.steps, self.first_tokens, self.ends = [], [], []

    def step(self, model, batch_size, seconds):
        self.steps.append(batch_size)

    def first_token(self, model, seconds):
        self.first_tokens.append(seconds)

    def finished(self, model, reason, tokens):
        self.ends.append((reason, tokens))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_batched_requests_equal_one_at_a_time(serve_model):
    """Requests queued together decode in one batch, and each matches its own unbatched run."""
    prompts = ["ROMEO:", "Hi", "", "To be or not"]
    params = [SamplingParams(max_new_tokens=40 + 7 * i, temperature=0.9, seed=100 + i) for i in range(4)]
    recorder = Recorder()
    engine = Engine(serve_model, max_batch=8, observer=recorder)

    async def main():
        gens = [engine.submit([engine.new_request(p, sp)], timeout=30) for p, sp in zip(prompts, params)]
        engine.start()  # everything is queued before the first step: one batch of four
        await asyncio.gather(*(g.wait() for g in gens))
        return [g.requests[0].text for g in gens]

    try:
        texts = run(main())
    finally:
        engine.stop()
    alone = [generate(serve_model.model, serve_model.tokenizer, p, sp)[0].text for p, sp in zip(prompts, params)]
    assert texts == alone
    assert recorder.steps[0] == 4 and engine.peak_batch == 4
    assert sum(recorder.steps) == engine.tokens == sum(sp.max_new_tokens for sp in params)
    assert len(recorder.first_tokens) == 4 and [r for r, _ in recorder.ends] == ["length"] * 4


def test_events_carry_the_text_in_order(serve_model):
    engine = Engine(serve_model)
    engine.start()

    async def main():
        req = engine.new_request("ab", SamplingParams(max_new_tokens=30, seed=3, logprobs=2))
        gen = engine.submit([req], timeout=30)
        events = [e async for e in gen.events()]
        return req, events

    try:
        req, events = run(main())
    finally:
        engine.stop()
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert isinstance(events[-1], FinishEvent) and events[-1].reason == "length"
    assert "".join(e.text for e in tokens) == req.text
    assert [e.token for e in tokens] == req.seq.generated
    assert all(e.logprob is not None and len(e.logprob.top) == 2 for e in tokens)


def test_queue_bound(serve_model):
    engine = Engine(serve_model, max_batch=1, queue_size=1)  # not started: nothing leaves the queue

    async def main():
        new = lambda: engine.new_request("a", SamplingParams(max_new_tokens=5))  # noqa: E731
        engine.submit([new()], timeout=5)
        engine.submit([new()], timeout=5)
        with pytest.raises(QueueFull):
            engine.submit([new()], timeout=5)
        assert engine.queue_depth == 2

    run(main())
    engine.stop()


def test_cancel_stops_generation(serve_model):
    recorder = Recorder()
    engine = Engine(serve_model, observer=recorder)
    engine.start()

    async def main():
        req = engine.new_request("a", SamplingParams(max_new_tokens=100_000))
        gen = engine.submit([req], timeout=60)
        async for _ in gen.events():
            break  # first token seen: the caller leaves
        gen.cancel()
        await asyncio.to_thread(wait_until, lambda: engine.active == 0, 10, "the sequence to leave")
        return req

    try:
        req = run(main())
    finally:
        engine.stop()
    assert req.seq.finish_reason == "cancelled"
    assert 1 <= len(req.seq.generated) < 100_000
    assert recorder.ends == [("cancelled", len(req.seq.generated))]


def test_timeout_fails_the_request_and_the_engine_goes_on(serve_model):
    engine = Engine(serve_model)
    engine.start()

    async def main():
        slow = engine.new_request("a", SamplingParams(max_new_tokens=100_000))
        with pytest.raises(GenerationTimeout):
            await engine.submit([slow], timeout=0.2).wait()
        quick = engine.new_request("a", SamplingParams(max_new_tokens=5))
        await engine.submit([quick], timeout=10).wait()
        return slow, quick

    try:
        slow, quick = run(main())
    finally:
        engine.stop()
    assert slow.seq.finish_reason == "timeout"
    assert quick.seq.finish_reason == "length" and len(quick.seq.generated) == 5


def test_stop_fails_unfinished_requests(serve_model):
    engine = Engine(serve_model)
    engine.start()

    async def main():
        gen = engine.submit([engine.new_request("a", SamplingParams(max_new_tokens=100_000))], timeout=60)
        async for _ in gen.events():
            break
        await asyncio.to_thread(engine.stop)
        with pytest.raises(EngineClosed):
            await gen.wait()
        with pytest.raises(EngineClosed):
            engine.submit([engine.new_request("a", SamplingParams())], timeout=5)

    run(main())
    assert not engine.alive


@pytest.mark.parametrize("prompt", [[], [0, 96], [-1]])
def test_token_id_prompts_are_checked(serve_model, prompt):
    engine = Engine(serve_model)
    with pytest.raises(ValueError):
        engine.new_request(prompt, SamplingParams())


def test_token_id_prompt_equals_text_prompt(serve_model):
    engine = Engine(serve_model)
    engine.start()
    params = SamplingParams(max_new_tokens=12, seed=5)

    async def main():
        a = engine.new_request("Hello", params)
        b = engine.new_request(serve_model.tokenizer.encode("Hello"), params)
        await engine.submit([a, b], timeout=10).wait()
        return a.text, b.text

    try:
        a, b = run(main())
    finally:
        engine.stop()
    assert a == b


def test_a_transient_step_failure_is_retried_and_fails_nobody(serve_model, monkeypatch):
    engine = Engine(serve_model)
    real_step = engine.decoder.step
    calls = []

    def flaky_step(on_token=None):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_step(on_token)

    monkeypatch.setattr(engine.decoder, "step", flaky_step)
    params = [SamplingParams(max_new_tokens=12, seed=i) for i in range(3)]

    async def main():
        reqs = [engine.new_request("ab", p) for p in params]
        gens = [engine.submit([r], timeout=10) for r in reqs]
        engine.start()
        await asyncio.gather(*(g.wait() for g in gens))
        return [r.seq.generated for r in reqs]

    try:
        tokens = run(main())
    finally:
        engine.stop()
    assert len(calls) > 2 and engine.active == 0
    alone = [generate(serve_model.model, serve_model.tokenizer, "ab", p)[0].tokens for p in params]
    assert tokens == alone  # the retried step re-encoded each window and kept each seeded stream


POISON = "~"


class PoisonedModel(torch.nn.Module):
    """The serving model, except that its logits are NaN wherever the last input token is POISON
    (what an fp16 overflow looks like): one request in a batch breaks the sampler's arithmetic.
    POISON itself is never generated, so only a prompt ending in it is hit."""

    def __init__(self, model, poison: int):
        super().__init__()
        self.model, self.config, self.poison = model, model.config, poison

    def forward(self, idx, **kwargs):
        logits, loss = self.model(idx, **kwargs)
        logits[..., self.poison] = -torch.inf
        return logits.masked_fill((idx[:, -1] == self.poison)[:, None, None], float("nan")), loss


def test_one_failing_request_does_not_take_down_the_others(serve_model):
    poison = serve_model.tokenizer.encode(POISON)[0]
    loaded = dataclasses.replace(serve_model, model=PoisonedModel(serve_model.model, poison))
    engine = Engine(loaded, max_batch=8)
    good = [SamplingParams(max_new_tokens=20, seed=i) for i in range(4)]

    async def main():
        reqs = [engine.new_request("ab", p) for p in good]
        gens = [engine.submit([r], timeout=30) for r in reqs]
        bad = engine.submit([engine.new_request("a" + POISON, SamplingParams(max_new_tokens=20))], timeout=30)
        gens.insert(2, bad)
        engine.start()  # one batch: the poisoned row sits between good ones
        results = await asyncio.gather(*(g.wait() for g in gens), return_exceptions=True)
        return [r.seq.generated for r in reqs], results

    try:
        tokens, results = run(main())
        assert engine.alive
    finally:
        engine.stop()
    error = results.pop(2)
    assert isinstance(error, EngineError) and "NaN logits" in str(error), error
    message = from_engine_error(error).message
    assert message.count("generation failed") == 1 and message.startswith("generation failed: ValueError: ")
    assert results == [None] * 4
    alone = [generate(loaded.model, serve_model.tokenizer, "ab", p)[0].tokens for p in good]
    assert tokens == alone
