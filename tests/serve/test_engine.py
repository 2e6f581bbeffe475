import asyncio

import pytest

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


def test_a_failed_step_fails_its_batch_not_the_engine(serve_model, monkeypatch):
    engine = Engine(serve_model)
    real_step = engine.decoder.step
    calls = []

    def flaky_step(on_token=None):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_step(on_token)

    monkeypatch.setattr(engine.decoder, "step", flaky_step)
    engine.start()

    async def main():
        with pytest.raises(EngineError, match="boom"):
            await engine.submit([engine.new_request("a", SamplingParams(max_new_tokens=5))], timeout=10).wait()
        req = engine.new_request("a", SamplingParams(max_new_tokens=5))
        await engine.submit([req], timeout=10).wait()
        return req

    try:
        req = run(main())
    finally:
        engine.stop()
    assert len(req.seq.generated) == 5 and engine.active == 0
