"""The original QuillGPT's routes, for its existing clients.

`POST /generate` and `POST /generate_stream` take `prompt`, `max_length` (tokens to generate) and
`temperature` as query parameters, as the original did, or in a JSON body (whose values win), plus
QuillGPT's extensions `top_k, top_p, seed, stop, model`. `/generate` returns
`{"prompt", "response"}`; `/generate_stream` streams the text itself (text/plain).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from pydantic import ValidationError

from quillgpt.sampling import LIMITS, sampling_params
from quillgpt.serve import schemas as s
from quillgpt.serve.deps import State, check_max_tokens, check_prompt_length, get_engine
from quillgpt.serve.engine import EngineError, Generation
from quillgpt.serve.errors import APIError
from quillgpt.serve.logs import request_id
from quillgpt.serve.routes.openai import CLIENT_CLOSED, ERROR_RESPONSES, ERROR_STATUSES
from quillgpt.serve.streaming import GenerationStream, finish_or_disconnect

router = APIRouter(tags=["Original QuillGPT"])


def _merge(query: dict, body: s.LegacyGenerateBody | None) -> s.LegacyGenerateRequest:
    values = {k: v for k, v in query.items() if v is not None}
    if body is not None:
        values.update(body.model_dump(exclude_none=True))
    try:
        return s.LegacyGenerateRequest.model_validate(values)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


def _start(state: State, req: s.LegacyGenerateRequest) -> Generation:
    engine = get_engine(state, req.model)
    check_prompt_length(state, req.prompt)
    params = sampling_params(req.model_dump(), max_new_tokens=check_max_tokens(state, req.max_length, "max_length"))
    try:
        text_request = engine.new_request(req.prompt, params)
    except ValueError as e:
        raise APIError(422, f"prompt: {e}", param="prompt", code="invalid_value") from None
    return engine.submit([text_request], timeout=state.settings.request_timeout, request_id=request_id.get() or "")


Prompt = Annotated[str | None, Query(description="Text to continue (here or in the body).")]
MaxLength = Annotated[
    int | None, Query(description="Tokens to generate (default 500).", **LIMITS["max_new_tokens"].api_bounds())
]
Temperature = Annotated[
    float | None,
    Query(description="Sampling temperature (default 1.0; 0 = greedy).", **LIMITS["temperature"].api_bounds()),
]
LegacyBody = Annotated[s.LegacyGenerateBody | None, Body()]
# /generate_stream answers text/plain, its errors JSON (FastAPI would document them as text/plain)
JSON_ERRORS = {
    status: {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for status in ERROR_STATUSES
}


@router.post("/generate", response_model=s.LegacyGenerateResponse, responses=ERROR_RESPONSES)
async def generate(
    request: Request,
    state: State,
    prompt: Prompt = None,
    max_length: MaxLength = None,
    temperature: Temperature = None,
    body: LegacyBody = None,
) -> s.LegacyGenerateResponse:
    req = _merge({"prompt": prompt, "max_length": max_length, "temperature": temperature}, body)
    generation = _start(state, req)
    if not await finish_or_disconnect(generation, request):
        return Response(status_code=CLIENT_CLOSED)
    return s.LegacyGenerateResponse(prompt=req.prompt, response=generation.requests[0].text)


@router.post("/generate_stream", response_class=PlainTextResponse, responses=JSON_ERRORS)
async def generate_stream(
    state: State,
    prompt: Prompt = None,
    max_length: MaxLength = None,
    temperature: Temperature = None,
    body: LegacyBody = None,
) -> GenerationStream:
    req = _merge({"prompt": prompt, "max_length": max_length, "temperature": temperature}, body)
    generation = _start(state, req)

    async def pieces():
        try:
            async for batch in generation.batches():
                if text := "".join(getattr(event, "text", "") for event in batch):
                    yield text
        except EngineError:
            pass  # the status line is gone: the text simply ends (the error is logged and counted)

    return GenerationStream(pieces(), generation, media_type="text/plain; charset=utf-8")
