"""`POST /tokenize` and `POST /detokenize`: see what a model's tokenizer makes of a text (debugging)."""

from __future__ import annotations

from fastapi import APIRouter

from quillgpt.serve import schemas as s
from quillgpt.serve.deps import State, check_prompt_length, get_engine
from quillgpt.serve.errors import APIError
from quillgpt.serve.routes.openai import ERROR_RESPONSES

router = APIRouter(tags=["Debugging"])


@router.post("/tokenize", response_model=s.TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: s.TokenizeRequest, state: State) -> s.TokenizeResponse:
    engine = get_engine(state, body.model)
    check_prompt_length(state, body.text, "text")
    tokenizer = engine.tokenizer
    ids = tokenizer.encode(body.text)  # TokenizerError → 422
    pieces = [tokenizer.decode([i]) for i in ids]
    return s.TokenizeResponse(model=engine.name, tokens=ids, count=len(ids), pieces=pieces)


@router.post("/detokenize", response_model=s.DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: s.DetokenizeRequest, state: State) -> s.DetokenizeResponse:
    engine = get_engine(state, body.model)
    vocab = engine.tokenizer.vocab_size
    if bad := [t for t in body.tokens if t >= vocab][:5]:
        raise APIError(
            422,
            f"tokens: ids must be below the vocabulary size {vocab} (got {bad})",
            param="tokens",
            code="invalid_value",
        )
    return s.DetokenizeResponse(model=engine.name, text=engine.tokenizer.decode(body.tokens))
