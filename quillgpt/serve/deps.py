"""What the routes share: the app's state, the API key check, engine lookup and request limits."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from quillgpt.serve.engine import Engine
from quillgpt.serve.errors import APIError
from quillgpt.serve.metrics import Metrics
from quillgpt.serve.settings import ServeSettings


@dataclass
class ServeState:
    """Lives on `app.state.serve`: settings, metrics and one engine per served model."""

    settings: ServeSettings
    metrics: Metrics
    engines: dict[str, Engine] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)
    load_error: str | None = None
    started: float = field(default_factory=time.time)


def get_state(request: Request) -> ServeState:
    return request.app.state.serve


State = Annotated[ServeState, Depends(get_state)]
_bearer = HTTPBearer(auto_error=False, description="The server's API key, when it has one (QUILL_API_KEY).")


def require_api_key(
    state: State, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    key = state.settings.api_key
    if key is None:
        return
    given = credentials.credentials.encode() if credentials is not None else b""
    # digests first: compare_digest takes constant time only for equal lengths, so the key's length stays secret too
    if not hmac.compare_digest(_digest(given), _digest(key.get_secret_value().encode())):
        raise APIError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def get_engine(state: ServeState, name: str | None) -> Engine:
    """The engine serving model `name` (None: the first model); 503 while loading, 404 if unknown."""
    if not state.ready.is_set():
        message = "models are still loading"
        if state.load_error is not None:
            message = f"models failed to load: {state.load_error}"
        raise APIError(503, message, code="not_ready", headers={"Retry-After": "5"})
    engine = next(iter(state.engines.values())) if name is None else state.engines.get(name)
    if engine is None:
        raise APIError(
            404,
            f"model {name!r} is not served here (served: {', '.join(state.engines)})",
            param="model",
            code="model_not_found",
        )
    if not engine.alive:
        raise APIError(503, f"model {engine.name!r} is not running", code="unavailable", headers={"Retry-After": "5"})
    return engine


def check_max_tokens(state: ServeState, value: int, param: str) -> int:
    cap = state.settings.max_tokens_cap
    if value > cap:
        raise APIError(
            422, f"{param}: at most {cap} tokens per request (asked for {value})", param=param, code="invalid_value"
        )
    return value


def check_prompt_length(state: ServeState, prompt: str | list[int], param: str = "prompt") -> None:
    limit = state.settings.max_prompt_chars
    if len(prompt) > limit:
        unit = "characters" if isinstance(prompt, str) else "tokens"
        raise APIError(
            422, f"{param}: longer than the limit of {limit} {unit} ({len(prompt)})", param=param, code="invalid_value"
        )


def check_choices(state: ServeState, count: int) -> None:
    limit = state.settings.max_choices
    if count > limit:
        raise APIError(
            422,
            f"n: a request may start at most {limit} sequences (prompts x n = {count})",
            param="n",
            code="invalid_value",
        )
