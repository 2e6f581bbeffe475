"""OpenAI-compatible routes: /v1/models, /v1/completions and /v1/chat/completions.

The official `openai` client works against them unchanged, streaming (Server-Sent Events ending
with `data: [DONE]`) and not. Chat renders the messages with the plain-text template of
`quillgpt.serve.chat`, since the models are base models.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import Response

from quillgpt.data import default_prompt
from quillgpt.decoder import TokenLogprob
from quillgpt.sampling import SamplingParams, normalize_stop, sampling_params
from quillgpt.serve import schemas as s
from quillgpt.serve.chat import TURN_END, render_chat
from quillgpt.serve.deps import (
    State,
    check_choices,
    check_max_tokens,
    check_prompt_length,
    get_engine,
)
from quillgpt.serve.engine import Engine, EngineError, FinishEvent, Generation, TokenEvent
from quillgpt.serve.errors import APIError, error_event, from_engine_error
from quillgpt.serve.logs import request_id
from quillgpt.serve.streaming import GenerationStream, finish_or_disconnect, sse
from quillgpt.tokenizer import TextTokenizer

router = APIRouter(tags=["OpenAI"])

CHAT_DEFAULT_MAX_TOKENS = 256
ERROR_STATUSES = (401, 404, 413, 422, 503, 504)
ERROR_RESPONSES = {status: {"model": s.ErrorResponse} for status in ERROR_STATUSES}
SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
"""One server-sent event: `data` holds a JSON chunk, or `[DONE]` at the end."""
STREAMING_RESPONSES = ERROR_RESPONSES | {
    200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}, "description": "With stream: true, events."}
}
CLIENT_CLOSED = 499  # nginx's code for "client closed the request": only ever seen in logs and metrics


def describe_model(name: str, engine: Engine, created: int) -> s.ModelObject:
    model = engine.loaded.model
    return s.ModelObject(
        id=name,
        created=created,
        context_length=engine.context_length,
        vocab_size=engine.tokenizer.vocab_size,
        parameters=model.num_params(),
        tokenizer=engine.tokenizer.to_spec()["type"],
        provenance=engine.loaded.provenance,
        default_prompt=default_prompt(engine.loaded.info),
    )


def choice_params(body: s.CompletionRequest | s.ChatRequest, **overrides) -> list[SamplingParams]:
    """One SamplingParams per choice (`n`); choice i gets seed + i, so choices differ but repeat.
    Out-of-range values raise SamplingError (→ 422)."""
    values = body.model_dump(exclude={"logprobs"})  # chat's logprobs is a flag: callers pass the count
    return [
        sampling_params(values, seed=None if body.seed is None else body.seed + i, **overrides) for i in range(body.n)
    ]


@router.get("/v1/models", response_model=s.ModelList, responses=ERROR_RESPONSES)
async def list_models(state: State) -> s.ModelList:
    get_engine(state, None)  # 503 while loading
    created = int(state.started)
    return s.ModelList(data=[describe_model(name, e, created) for name, e in state.engines.items()])


@router.get("/v1/models/{model_id}", response_model=s.ModelObject, responses=ERROR_RESPONSES)
async def get_model(model_id: str, state: State) -> s.ModelObject:
    return describe_model(model_id, get_engine(state, model_id), int(state.started))


def _submit(state: State, engine: Engine, prompts: list[str | list[int]], params: list, param: str) -> Generation:
    try:
        requests = [engine.new_request(p, sp) for p in prompts for sp in params]
    except ValueError as e:  # TokenizerError included: characters outside the vocabulary
        raise APIError(422, f"{param}: {e}", param=param, code="invalid_value") from None
    return engine.submit(requests, timeout=state.settings.request_timeout, request_id=request_id.get() or "")


def _usage(generation: Generation, n: int) -> s.Usage:
    seqs = [r.seq for r in generation.requests]
    prompt = sum(len(seq.prompt) for seq in seqs[::n])  # each prompt counted once, not once per choice
    completion = sum(len(seq.generated) for seq in seqs)
    return s.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _token_text(tokenizer: TextTokenizer, token: int) -> str:
    return tokenizer.decode([token])


def _completion_logprobs(
    tokenizer: TextTokenizer, logprobs: list[TokenLogprob], top: int, offset: int = 0
) -> s.CompletionLogprobs:
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        text = _token_text(tokenizer, lp.token)
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({_token_text(tokenizer, t): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return s.CompletionLogprobs(
        tokens=tokens, token_logprobs=values, top_logprobs=tops if top else None, text_offset=offsets
    )


def _chat_logprobs(tokenizer: TextTokenizer, logprobs: list[TokenLogprob]) -> s.ChatLogprobs:
    def entry(token: int, value: float) -> dict:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    return s.ChatLogprobs(
        content=[
            s.ChatTokenLogprob(**entry(lp.token, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top])
            for lp in logprobs
        ]
    )


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class ChunkShape:
    """How a streamed chunk's choice looks: completions carry `text`, chat completions a `delta`."""

    object: str
    content: Callable[[str | None], dict]
    """A token's text → the choice's content fields; None: those of the finishing chunk."""
    logprobs: Callable[[TokenEvent], dict]
    opening: list[tuple[int, dict]]
    """(choice index, content) chunks sent before any token: echoed prompts, chat's role."""


async def stream_chunks(
    generation: Generation, meta: dict, body: s.SamplingRequest, shape: ChunkShape
) -> AsyncIterator[str]:
    """The Server-Sent Events of a streamed completion or chat completion, ending with [DONE]."""

    def chunk(index: int, content: dict, logprobs: dict | None = None, finish: str | None = None) -> str:
        choice = {"index": index, **content, "logprobs": logprobs, "finish_reason": finish}
        return sse({**meta, "object": shape.object, "choices": [choice]})

    try:
        for index, content in shape.opening:
            yield chunk(index, content)
        async for batch in generation.batches():
            out = []
            for event in batch:
                if isinstance(event, FinishEvent):
                    out.append(chunk(event.index, shape.content(None), finish=event.reason))
                elif event.logprob is not None:
                    out.append(chunk(event.index, shape.content(event.text), shape.logprobs(event)))
                elif event.text:
                    out.append(chunk(event.index, shape.content(event.text)))
            if out:
                yield "".join(out)  # everything that arrived together goes out in one write
        if body.include_usage:
            usage = _usage(generation, body.n).model_dump()
            yield sse({**meta, "object": shape.object, "choices": [], "usage": usage})
    except EngineError as e:
        yield sse(error_event(from_engine_error(e)))
    finally:
        generation.cancel()
    yield sse("[DONE]")


@router.post("/v1/completions", response_model=s.CompletionResponse, responses=STREAMING_RESPONSES)
async def create_completion(body: s.CompletionRequest, request: Request, state: State) -> s.CompletionResponse:
    engine = get_engine(state, body.model)
    prompts = body.prompts
    check_choices(state, len(prompts) * body.n)
    max_tokens = check_max_tokens(state, body.max_tokens or state.settings.max_tokens_cap, "max_tokens")
    for p in prompts:
        check_prompt_length(state, p)
    params = choice_params(body, max_new_tokens=max_tokens, logprobs=body.logprobs)
    generation = _submit(state, engine, prompts, params, "prompt")
    meta = {"id": _new_id("cmpl"), "created": int(time.time()), "model": engine.name}
    if body.stream:
        shape = _completion_shape(generation, body, engine.tokenizer)
        return GenerationStream(stream_chunks(generation, meta, body, shape), generation)
    if not await finish_or_disconnect(generation, request):
        return Response(status_code=CLIENT_CLOSED)
    choices = []
    for index, req in enumerate(generation.requests):
        text = req.text
        if body.echo:
            text = _prompt_text(engine.tokenizer, prompts[index // body.n]) + text
        logprobs = None
        if body.logprobs is not None:
            logprobs = _completion_logprobs(engine.tokenizer, req.seq.logprobs, body.logprobs)
        choices.append(
            s.CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=req.seq.finish_reason)
        )
    return s.CompletionResponse(**meta, choices=choices, usage=_usage(generation, body.n))


def _prompt_text(tokenizer: TextTokenizer, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt)


def _completion_shape(generation: Generation, body: s.CompletionRequest, tokenizer: TextTokenizer) -> ChunkShape:
    offsets = [0] * len(generation.requests)  # each choice's logprob text_offset so far

    def logprobs(event: TokenEvent) -> dict:
        lp = _completion_logprobs(tokenizer, [event.logprob], body.logprobs or 0, offsets[event.index])
        offsets[event.index] += len(lp.tokens[0])
        return lp.model_dump()

    echoed = range(len(generation.requests)) if body.echo else ()
    return ChunkShape(
        object="text_completion",
        content=lambda text: {"text": text or ""},
        logprobs=logprobs,
        opening=[(i, {"text": _prompt_text(tokenizer, body.prompts[i // body.n])}) for i in echoed],
    )


@router.post("/v1/chat/completions", response_model=s.ChatCompletionResponse, responses=STREAMING_RESPONSES)
async def create_chat_completion(body: s.ChatRequest, request: Request, state: State) -> s.ChatCompletionResponse:
    engine = get_engine(state, body.model)
    check_choices(state, body.n)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    asked = body.requested_tokens
    max_tokens = (
        check_max_tokens(state, asked, param) if asked else min(CHAT_DEFAULT_MAX_TOKENS, state.settings.max_tokens_cap)
    )
    prompt = render_chat((m.role, m.text) for m in body.messages)
    check_prompt_length(state, prompt, "messages")
    top = body.top_logprobs or 0
    stop = (TURN_END, *normalize_stop(body.stop))
    params = choice_params(body, max_new_tokens=max_tokens, stop=stop, logprobs=top if body.logprobs else None)
    generation = _submit(state, engine, [prompt], params, "messages")
    meta = {"id": _new_id("chatcmpl"), "created": int(time.time()), "model": engine.name}
    if body.stream:
        shape = _chat_shape(generation, engine.tokenizer)
        return GenerationStream(stream_chunks(generation, meta, body, shape), generation)
    if not await finish_or_disconnect(generation, request):
        return Response(status_code=CLIENT_CLOSED)
    choices = [
        s.ChatChoice(
            index=i,
            message=s.ChatResponseMessage(content=req.text),
            finish_reason=req.seq.finish_reason,
            logprobs=_chat_logprobs(engine.tokenizer, req.seq.logprobs) if body.logprobs else None,
        )
        for i, req in enumerate(generation.requests)
    ]
    return s.ChatCompletionResponse(**meta, choices=choices, usage=_usage(generation, body.n))


def _chat_shape(generation: Generation, tokenizer: TextTokenizer) -> ChunkShape:
    return ChunkShape(
        object="chat.completion.chunk",
        content=lambda text: {"delta": {} if text is None else {"content": text}},
        logprobs=lambda event: _chat_logprobs(tokenizer, [event.logprob]).model_dump(),
        opening=[(i, {"delta": {"role": "assistant", "content": ""}}) for i in range(len(generation.requests))],
    )
