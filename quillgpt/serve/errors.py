"""Every error as OpenAI's error body, with a fitting status: bad input is a 4xx, never a 500.

Body: `{"error": {"message", "type", "param", "code"}, "detail": message}` — the `error` object is
what OpenAI clients read, `detail` what FastAPI clients read.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from quillgpt.sampling import SamplingError
from quillgpt.serve.engine import EngineClosed, EngineError, GenerationTimeout, QueueFull
from quillgpt.tokenizer import TokenizerError

log = logging.getLogger("quillgpt.serve")

ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_overloaded",
    504: "timeout",
}


BODY_PARSE_ERROR = "There was an error parsing the body"
"""FastAPI's 400 for a body it cannot decode."""

_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code
        self.headers = headers


def error_response(error: APIError) -> JSONResponse:
    body = {
        "error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code},
        "detail": error.message,
    }
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def error_event(error: APIError) -> dict:
    """The error object sent inside a stream, once the status line has already gone out."""
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def from_engine_error(error: EngineError) -> APIError:
    if isinstance(error, QueueFull | EngineClosed):
        return APIError(
            503,
            str(error),
            code="overloaded" if isinstance(error, QueueFull) else "unavailable",
            headers={"Retry-After": str(error.retry_after)},
        )
    if isinstance(error, GenerationTimeout):
        return APIError(504, str(error), code="timeout")
    return APIError(500, f"generation failed: {error}", code="engine_error")


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """Pydantic's error list → one readable sentence, and the first offending field."""
    parts: list[str] = []
    param = None
    for e in errors:
        kind, loc = e.get("type"), e.get("loc", ())
        if kind == "json_invalid":
            parts.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})")
            continue
        if tuple(loc) == ("body",) and kind in ("model_attributes_type", "dict_type", "model_type", "missing"):
            parts.append("the body must be a JSON object, sent with 'Content-Type: application/json'")
            continue
        # union members appear in loc as type names (`str`, `list[int]`, `constrained-str`): keep fields
        names = [str(x) for x in loc[1:] if isinstance(x, int) or (x.isidentifier() and x not in _TYPE_NAMES)]
        field = ".".join(names)
        param = param or (field or None)
        msg = "field required" if kind == "missing" else e.get("msg", "invalid value").removeprefix("Value error, ")
        parts.append(f"{field}: {msg}" if field else msg)
    parts = list(dict.fromkeys(parts))  # union members often repeat one message
    if len(parts) > 4:
        parts = parts[:4] + [f"and {len(parts) - 4} more"]
    return "; ".join(parts), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return error_response(APIError(422, message, param=param, code="invalid_value"))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and message == BODY_PARSE_ERROR:  # bytes that are not UTF-8: like bad JSON
            return error_response(APIError(422, "the body is not valid JSON (not UTF-8 text)", code="invalid_value"))
        return error_response(APIError(exc.status_code, message, headers=getattr(exc, "headers", None)))

    @app.exception_handler(SamplingError)
    @app.exception_handler(TokenizerError)
    async def _bad_value(request: Request, exc: ValueError) -> JSONResponse:
        return error_response(APIError(422, str(exc), code="invalid_value"))

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError) -> JSONResponse:
        return error_response(from_engine_error(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return error_response(APIError(500, "internal server error", code="internal_error"))
