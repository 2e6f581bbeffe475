"""The text layer: text in, text out, over the id-level `quillgpt.decoder.Decoder`.

- `TextRequest`: one generation's text side — prompt encoding, detokenizing without splitting UTF-8
  characters (`TextStreamer`), stopping on stop strings (`StopStrings`). The server's engine and the
  playground's token stream (`quillgpt.playground.local.token_chunks`) use it too.
- `generate`, `stream`: complete prompts (batched), or stream one as it is generated.

The settings, `SamplingParams`, are in `quillgpt.sampling`; the context-overflow policy (what a
prompt longer than the context keeps) is the decoder's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from quillgpt.decoder import Decoder, SequenceState, TokenLogprob
from quillgpt.model import GPT
from quillgpt.sampling import SamplingParams
from quillgpt.tokenizer import TextStreamer, TextTokenizer


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
