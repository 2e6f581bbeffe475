"""The published OpenAPI schema, with the limits that depend on the server's settings.

The request models state the fixed limits (sampling ranges from `quillgpt.sampling.LIMITS`, list
lengths, enums). A few limits are settings (`max_tokens_cap`, `max_choices`, `max_prompt_chars`):
they are written into the schema here, where FastAPI builds it, so /docs and /openapi.json state
every bound the routes enforce, and clients (and the fuzz test) can trust them. Limits across fields
(prompts x n, a chat's rendered length) and the model's own vocabulary stay checks with a 4xx.

The API key is a setting too: with no key, the schema declares no security at all (FastAPI would
declare the bearer header on every protected route, though the server never asks for it) and no
401; with a key, the routes that check it declare the bearer scheme and their 401 answer, and
/health and /ready declare neither.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from quillgpt.serve.settings import ServeSettings

MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_length")
TEXT_FIELDS = ("prompt", "text")
_ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def install_openapi(app: FastAPI, settings: ServeSettings) -> None:
    """Make `app.openapi()` (served at /openapi.json) state the server's limits."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _state_limits(schema, settings)
            _state_auth(schema, settings)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _state_limits(schema: dict[str, Any], settings: ServeSettings) -> None:
    for model in schema.get("components", {}).get("schemas", {}).values():
        for name, prop in model.get("properties", {}).items():
            _limit(name, prop, settings)
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            for parameter in operation.get("parameters", []):
                _limit(parameter["name"], parameter["schema"], settings)


def _state_auth(schema: dict[str, Any], settings: ServeSettings) -> None:
    operations = [op for path in schema.get("paths", {}).values() for op in path.values()]
    if settings.api_key is None:
        schema.get("components", {}).pop("securitySchemes", None)
        for operation in operations:
            operation.pop("security", None)
            operation.get("responses", {}).pop("401", None)  # nothing answers 401 without a key
        return
    for operation in operations:
        if operation.get("security"):
            operation.setdefault("responses", {}).setdefault(
                "401",
                {"description": "Missing or wrong API key (`Authorization: Bearer <key>`).", "content": _ERROR_BODY},
            )


def _limit(name: str, prop: dict[str, Any], settings: ServeSettings) -> None:
    if name in MAX_TOKENS_FIELDS:
        _each(prop, "integer", maximum=settings.max_tokens_cap)
    elif name == "n":
        _each(prop, "integer", maximum=settings.max_choices)
    elif name in TEXT_FIELDS:
        _each(prop, "string", maxLength=settings.max_prompt_chars)
        # a prompt of token ids (a list of integers) is held to the same count, in tokens
        for option in prop.get("anyOf", []):
            if option.get("type") == "array" and option.get("items", {}).get("type") == "integer":
                option["maxItems"] = settings.max_prompt_chars


def _each(prop: dict[str, Any], kind: str, **bounds: int) -> None:
    """Set `bounds` on the property, or on its options of type `kind` (`int | None` is an anyOf)."""
    for option in [prop, *prop.get("anyOf", []), *(i for o in prop.get("anyOf", []) for i in [o.get("items", {})])]:
        if option.get("type") == kind:
            for key, value in bounds.items():
                option[key] = min(value, option.get(key, value))
