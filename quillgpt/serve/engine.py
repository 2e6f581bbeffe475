"""One generation engine per model: a worker thread running continuous batching for asyncio callers.

The engine owns a `quillgpt.decoder.Decoder`. Its thread loops: admit waiting sequences while the
batch has room, drop the ones whose caller went away or whose time is up, run one decode step for
the whole batch, and hand each new token's text (from the request's own `TextRequest`) to the
waiting coroutine with `loop.call_soon_threadsafe`. The event loop never runs the model and the
engine never touches the event loop's objects directly. Sequences join and leave between steps.

Each sequence keeps its own `torch.Generator`, so a seeded request gives the same tokens whether it
ran alone or batched with others. The engine knows nothing of HTTP: errors are `EngineError`s that
the web layer maps to status codes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from quillgpt.checkpoint import LoadedModel
from quillgpt.decoder import Decoder, SequenceState, TokenLogprob
from quillgpt.generate import TextRequest
from quillgpt.sampling import SamplingParams

log = logging.getLogger("quillgpt.serve.engine")

GRACE_SECONDS = 5.0
"""How long past its deadline a caller waits for the engine before giving up on it by itself."""


class EngineError(RuntimeError):
    """A generation that could not run or finish."""


class QueueFull(EngineError):
    """No room: the batch is full and so is the queue behind it."""

    retry_after = 1


class EngineClosed(EngineError):
    """The engine is stopping (or its thread died) and takes no more work."""

    retry_after = 5


class GenerationTimeout(EngineError):
    """A request ran past its deadline; its sequences were dropped."""


@dataclass(frozen=True)
class TokenEvent:
    """One token of choice `index`, with the text it made visible (often "" while text is held back)."""

    index: int
    text: str
    token: int
    logprob: TokenLogprob | None


@dataclass(frozen=True)
class FinishEvent:
    index: int
    reason: str
    """"stop" (end-of-text token or stop string) or "length" (max tokens)."""


class EngineObserver(Protocol):
    """Hooks for metrics, called from the engine thread."""

    def step(self, model: str, batch_size: int, seconds: float) -> None: ...
    def first_token(self, model: str, seconds: float) -> None: ...
    def finished(self, model: str, reason: str, tokens: int) -> None: ...


class Generation:
    """The caller's handle on one request: its sequences (n choices, several prompts), whose events
    arrive in order on an asyncio queue fed by the engine thread."""

    def __init__(self, engine: Engine, requests: list[TextRequest], timeout: float, request_id: str = ""):
        self.engine = engine
        self.requests = requests
        self.request_id = request_id
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout
        self.timeout = timeout
        self.first_token_at: float | None = None
        self.cancelled = False
        self.failed = False
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[TokenEvent | FinishEvent | EngineError] = asyncio.Queue()

    def cancel(self) -> None:
        """Stop generating (the client went away); the engine drops the sequences before its next step."""
        if not self.cancelled:
            self.cancelled = True
            self.engine._wake()

    async def batches(self) -> AsyncIterator[list[TokenEvent | FinishEvent]]:
        """The events as they arrive, in lists of those already there (a slow reader catches up in
        one go); ends when every sequence is done, raises an EngineError on failure."""
        remaining = len(self.requests)
        while remaining:
            wait = max(self.deadline - time.monotonic(), 0.0) + GRACE_SECONDS
            try:
                events = [await asyncio.wait_for(self._events.get(), timeout=wait)]
            except TimeoutError:
                self.cancel()
                raise GenerationTimeout(f"generation did not finish within {self.timeout:g} s") from None
            while not self._events.empty():
                events.append(self._events.get_nowait())
            error = next((e for e in events if isinstance(e, EngineError)), None)
            if error is not None:
                raise error
            remaining -= sum(isinstance(e, FinishEvent) for e in events)
            yield events

    async def events(self) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Every token and finish event, one by one (see `batches`)."""
        async for batch in self.batches():
            for event in batch:
                yield event

    async def wait(self) -> None:
        """Run to the end; afterwards each request's `.text` and `.seq` hold the result."""
        async for _ in self.events():
            pass

    # Called from the engine thread only.
    def _emit(self, event: TokenEvent | FinishEvent | EngineError) -> None:
        _post(self._loop, [(self, event)])

    def _fail(self, error: EngineError) -> None:
        if not self.failed:
            self.failed = True
            self._emit(error)


def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[Generation, TokenEvent | FinishEvent | EngineError]]):
    """Hand events to their generations' queues on the event loop: one wake-up for many events."""
    try:
        loop.call_soon_threadsafe(_deliver, items)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
        for generation, _ in items:
            generation.cancelled = True


def _deliver(items: list[tuple[Generation, TokenEvent | FinishEvent | EngineError]]) -> None:
    for generation, event in items:
        generation._events.put_nowait(event)


class _NullObserver:
    def step(self, model: str, batch_size: int, seconds: float) -> None:
        pass

    def first_token(self, model: str, seconds: float) -> None:
        pass

    def finished(self, model: str, reason: str, tokens: int) -> None:
        pass


class Engine:
    """Continuous batching for one model on its own daemon thread.

    Capacity is `max_batch` running sequences plus `queue_size` waiting ones; `submit` raises
    `QueueFull` beyond that rather than letting latency grow without bound.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        name: str | None = None,
        max_batch: int = 16,
        queue_size: int = 128,
        observer: EngineObserver | None = None,
    ):
        self.loaded = loaded
        self.name = name or loaded.name
        self.tokenizer = loaded.tokenizer
        self.decoder = Decoder(loaded.model, max_batch=max_batch)
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.observer = observer or _NullObserver()
        self.steps = 0
        self.tokens = 0
        self.peak_batch = 0
        self.error: BaseException | None = None
        self._pending: deque[tuple[Generation, int]] = deque()
        self._running: dict[int, tuple[Generation, int]] = {}  # id(seq) → (generation, choice index)
        self._outbox: list[tuple[Generation, TokenEvent | FinishEvent]] = []  # this step's events
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._probe: Decoder | None = None
        """A one-row decoder that finds which sequence made a batched step fail (see `_isolate`)."""

    # --- caller side (event loop thread) ---

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"quill-engine-{self.name}", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread after its current step; unfinished requests fail with EngineClosed."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len(self.decoder.active)

    @property
    def context_length(self) -> int:
        return self.decoder.config.block_size

    def new_request(self, prompt: str | Sequence[int], params: SamplingParams) -> TextRequest:
        """The text side of one sequence; raises TokenizerError/ValueError for prompts it cannot take."""
        if not isinstance(prompt, str) and not prompt:
            raise ValueError("a token-id prompt needs at least one token")
        return TextRequest(self.tokenizer, prompt if isinstance(prompt, str) else list(prompt), params)

    def submit(self, requests: list[TextRequest], *, timeout: float, request_id: str = "") -> Generation:
        """Queue sequences that finish together as one request. Call from the event loop."""
        generation = Generation(self, requests, timeout, request_id)
        with self._cond:
            if self._stopping:
                raise EngineClosed(f"model {self.name!r} is not running")
            demand = len(self.decoder.active) + len(self._pending) + len(requests)
            if demand > self.max_batch + self.queue_size:
                raise QueueFull(
                    f"model {self.name!r} is busy ({len(self.decoder.active)} running, "
                    f"{len(self._pending)} waiting): retry later"
                )
            self._pending.extend((generation, i) for i in range(len(requests)))
            self._cond.notify()
        return generation

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # --- engine thread ---

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._pending and not self.decoder.active:
                        self._cond.wait()
                    if self._stopping:
                        break
                    admitted = self._admit()
                for generation, i in admitted:
                    self._add(generation, i)
                self._reap()
                if self.decoder.active:
                    try:
                        self._step()
                    except Exception:  # a failed step fails the sequences at fault, not the engine
                        log.exception("decode step failed on model %s: retrying its sequences one by one", self.name)
                        self._isolate()
        except BaseException as e:  # keep the reason; callers get EngineClosed, /ready turns 503
            self.error = e
            log.exception("engine %s stopped on an error", self.name)
        finally:
            self._close()

    def _close(self) -> None:
        with self._cond:
            self._stopping = True
            pending, self._pending = list(self._pending), deque()
        reason = "the server is shutting down" if self.error is None else f"the engine failed: {self.error}"
        for generation, _ in pending + list(self._running.values()):
            generation._fail(EngineClosed(f"model {self.name!r} stopped: {reason}"))
        self._running.clear()

    def _isolate(self) -> None:
        """After a failed batched step, find the sequences at fault: each one in the batch takes one
        step on its own (in a one-row decoder); those that fail again fail their request, the others
        rejoin the batch (their cache rows are re-encoded). One request never takes down the others."""
        suspects = list(self.decoder.active)
        for seq in suspects:
            self.decoder.remove(seq)
        if self._probe is None:
            self._probe = Decoder(self.decoder.model, max_batch=1)
        for seq in suspects:
            if not seq.done:  # (one that finished in the failed step only needs its finish event)
                self._probe.add(seq)  # its window is kept and re-encoded
                try:
                    self._step(self._probe)  # reports the sequence if it finishes
                except Exception as e:
                    log.exception("a sequence of model %s failed on its own", self.name)
                    self._drop_failed(seq, EngineError(f"{type(e).__name__}: {e}"))
                if seq in self._probe.active:
                    self._probe.remove(seq)
                    self.decoder.add(seq)
            elif id(seq) in self._running:
                generation, i = self._running.pop(id(seq))
                self.observer.finished(self.name, seq.finish_reason, len(seq.generated))
                self._outbox.append((generation, FinishEvent(i, seq.finish_reason)))
        self._flush()

    def _drop_failed(self, seq: SequenceState, error: EngineError) -> None:
        if seq in self._probe.active:
            self._probe.remove(seq)
        generation, _ = self._running.pop(id(seq), (None, 0))
        if generation is not None:
            seq.finish("error")
            self.observer.finished(self.name, "error", len(seq.generated))
            generation._fail(error)

    def _admit(self) -> list[tuple[Generation, int]]:
        admitted = []
        while self._pending and len(self.decoder.active) + len(admitted) < self.max_batch:
            admitted.append(self._pending.popleft())
        return admitted

    def _add(self, generation: Generation, i: int) -> None:
        if generation.cancelled or generation.failed:
            return
        if time.monotonic() > generation.deadline:
            generation._fail(GenerationTimeout(f"request waited longer than {generation.timeout:g} s for a slot"))
            return
        seq = generation.requests[i].seq
        try:
            self.decoder.add(seq)
        except (ValueError, RuntimeError) as e:
            generation._fail(EngineError(str(e)))
            return
        self._running[id(seq)] = (generation, i)

    def _reap(self) -> None:
        """Drop sequences whose caller cancelled, failed or ran out of time."""
        now = time.monotonic()
        for seq in list(self.decoder.active):
            generation, _ = self._running[id(seq)]
            timed_out = now > generation.deadline
            if not (generation.cancelled or generation.failed or timed_out):
                continue
            self.decoder.remove(seq)
            del self._running[id(seq)]
            reason = "timeout" if timed_out and not generation.cancelled else "cancelled"
            seq.finish(reason)
            self.observer.finished(self.name, reason, len(seq.generated))
            log.info(
                "dropped a sequence of model %s (%s) after %d tokens",
                self.name,
                reason,
                len(seq.generated),
                extra={
                    "fields": {
                        "request_id": generation.request_id,
                        "model": self.name,
                        "reason": reason,
                        "tokens": len(seq.generated),
                    }
                },
            )
            if reason == "timeout":
                generation._fail(GenerationTimeout(f"generation did not finish within {generation.timeout:g} s"))

    def _step(self, decoder: Decoder | None = None) -> None:
        decoder = decoder or self.decoder
        batch = len(decoder.active)
        started = time.monotonic()
        try:
            produced = decoder.step(self._on_token)
            self.observer.step(self.name, batch, time.monotonic() - started)
            self.steps += 1
            self.tokens += len(produced)
            self.peak_batch = max(self.peak_batch, batch)
            for seq, _ in produced:
                if seq.done:
                    generation, i = self._running.pop(id(seq))
                    self.observer.finished(self.name, seq.finish_reason, len(seq.generated))
                    self._outbox.append((generation, FinishEvent(i, seq.finish_reason)))
        finally:
            self._flush()

    def _flush(self) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for generation, event in self._outbox:
            by_loop.setdefault(generation._loop, []).append((generation, event))
        self._outbox.clear()
        for loop, items in by_loop.items():
            _post(loop, items)

    def _on_token(self, seq: SequenceState, token: int) -> None:
        generation, i = self._running[id(seq)]
        text = generation.requests[i].push(token)
        if generation.first_token_at is None:
            generation.first_token_at = time.monotonic()
            self.observer.first_token(self.name, generation.first_token_at - generation.submitted)
        logprob = seq.logprobs[-1] if seq.params.logprobs is not None else None
        self._outbox.append((generation, TokenEvent(i, text, token, logprob)))
