"""`LocalBackend`: models loaded into this process, streamed token by token with their probabilities.

`token_chunks` is the playground's own stream over the library's decoder: `quillgpt.generate.stream`
with each token's text, its probability and the alternatives the model weighed, as the page's
`Chunk`s and `TokenView`s (nothing to copy field by field).

A browser drawing the page shares this machine's cores with the model. PyTorch's default, a thread
per core, has the model's threads wait on each other whenever the browser or Streamlit's server
holds one of those cores (OpenMP's threads meet at a barrier after every operation), and a small
model's decode step is all barriers. So the playground decodes with a core left free
(`decode_threads`), in the thread that iterates the stream.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator

import torch

from quillgpt.checkpoint import CheckpointError, LoadedModel, bundled_models, load_model
from quillgpt.config import ConfigError
from quillgpt.data import default_prompt
from quillgpt.decoder import Decoder, SequenceState
from quillgpt.generate import TextRequest
from quillgpt.model import GPT
from quillgpt.playground.backend import (
    TOP_ALTERNATIVES,
    BackendError,
    Chunk,
    ModelCard,
    TokenView,
    default_first,
    provenance_facts,
)
from quillgpt.sampling import SamplingParams
from quillgpt.tokenizer import TextStreamer, TextTokenizer, TokenizerError


def decode_threads() -> int:
    """Torch threads for decoding beside a browser: one core left to it and the server, at least one
    thread, never more than torch would use anyway (OMP_NUM_THREADS still caps it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores - 1))


def token_chunks(
    model: GPT, tokenizer: TextTokenizer, prompt: str, params: SamplingParams, *, alternatives: int = TOP_ALTERNATIVES
) -> Iterator[Chunk]:
    """`quillgpt.generate.stream` as `Chunk`s: a chunk per decode step with the new text and its tokens,
    each with its own text, its probability (before temperature and filters) and its `alternatives`
    most likely rivals. The last chunk carries the finish reason ("stop" or "length").

    A prompt the tokenizer cannot encode raises here, before the first chunk is asked for.
    """
    req = TextRequest(tokenizer, prompt, dataclasses.replace(params, logprobs=alternatives))
    return _chunks(model, req)


def _chunks(model: GPT, req: TextRequest) -> Iterator[Chunk]:
    tokenizer = req.tokenizer
    own = TextStreamer(tokenizer)  # each token's own text, whatever the stop strings hold back
    held = 1.0  # the probability of tokens waiting for the rest of their UTF-8 character
    chunk = Chunk("")

    def on_token(seq: SequenceState, token: int) -> None:
        nonlocal held
        chunk.text += req.push(token)
        lp = seq.logprobs[-1]
        held *= math.exp(lp.logprob)
        if text := own.push(token):
            top = [(tokenizer.decode([i]), math.exp(v)) for i, v in lp.top]
            chunk.tokens.append(TokenView(text, held, top))
            held = 1.0

    decoder = Decoder(model, max_batch=1)
    decoder.add(req.seq)
    while decoder.active:
        decoder.step(on_token)
        yield chunk
        chunk = Chunk("")
    tail, rest = req.finish(), own.flush()
    seq = req.seq
    note = None
    if seq.prompt_truncated:
        block = model.config.block_size
        note = f"The prompt was longer than the model's context: only its last {block} tokens were used."
    yield Chunk(tail, [TokenView(rest, held)] if rest else [], seq.finish_reason or "length", note)


def warm_up(loaded: LoadedModel) -> None:
    """A few tokens through the page's own path, so the first Generate runs as fast as the next ones
    (the kernels' first load and oneDNN's first primitives happen here, under the page's spinner)."""
    for _ in LocalBackend.run(token_chunks(loaded.model, loaded.tokenizer, "", SamplingParams(max_new_tokens=4))):
        pass


class LocalBackend:
    """Models loaded into this process: the bundled ones and any directory the user names."""

    local = True

    def __init__(
        self,
        models: Iterable[str] = (),
        loader: Callable[[str], LoadedModel] = load_model,
        trained: Iterable[str] = (),
    ):
        """`loader` turns a name into a model: the page passes one that caches across reruns.
        `trained`: the models of the Train page's runs, listed after the bundled ones."""
        self.extra = list(dict.fromkeys(models))
        self.trained = list(trained)
        self.loader = loader
        self.label = "Models run in this process"

    def models(self) -> list[str]:
        return list(dict.fromkeys([*self.extra, *default_first(list(bundled_models())), *self.trained]))

    def load(self, name: str) -> LoadedModel:
        try:
            return self.loader(name)
        except (CheckpointError, ConfigError, TokenizerError, OSError) as e:
            raise BackendError(f"Cannot load model {name!r}: {e}") from None

    def card(self, name: str) -> ModelCard:
        loaded = self.load(name)
        cfg, tok = loaded.model.config, loaded.tokenizer
        facts = provenance_facts(loaded.provenance)
        facts["Tokenizer"] = f"{tok.to_spec()['type']}, {tok.vocab_size:,} tokens"
        facts["Context"] = f"{cfg.block_size:,} tokens"
        facts["Shape"] = f"{cfg.n_layer} layers × {cfg.n_head} heads × {cfg.n_embd} wide"
        readme, loss = loaded.path / "README.md", loaded.path / "loss.png"
        return ModelCard(
            name=loaded.name,
            source=str(loaded.path),
            parameters=loaded.model.num_params(),
            facts=facts,
            description=readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else None,
            loss_curve=loss if loss.is_file() else None,
            default_prompt=default_prompt(loaded.info),
        )

    def stream(self, name: str, prompt: str, params: SamplingParams) -> Iterator[Chunk]:
        loaded = self.load(name)
        try:
            chunks = token_chunks(loaded.model, loaded.tokenizer, prompt, params)
        except TokenizerError as e:
            raise BackendError(f"The prompt does not fit this model's vocabulary: {e}") from None
        return self.run(chunks)

    @staticmethod
    def run(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        """`chunks`, decoded with `decode_threads()` torch threads in the thread that iterates them."""
        previous = torch.get_num_threads()
        torch.set_num_threads(decode_threads())
        try:
            yield from chunks
        finally:
            torch.set_num_threads(previous)
