"""Everything the server can be told, in one place: `ServeSettings`.

Each field can be set by keyword, or by an environment variable named `QUILL_` + the field name in
capitals (`QUILL_PORT=9000`, `QUILL_API_KEY=...`). Lists accept JSON (`["a", "b"]`) or commas
(`a,b`). `quill serve` and `python main.py` flags override the environment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from quillgpt.checkpoint import OLD_WEIGHTS_FLAG, served_models
from quillgpt.infer.prepare import INFERENCE_WEIGHTS


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUILL_", extra="forbid", validate_default=True)

    models: Annotated[list[str], NoDecode] = Field(default_factory=served_models)
    """Models to serve: bundled names or directories, each optionally `ALIAS=NAME_OR_DIR` (default: every
    bundled model, the default model first, which requests that name no model get)."""
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    """0 picks a free port."""
    workers: int = Field(1, ge=1, le=64)
    """Server processes, each with its own copy of every model and its own engines."""
    api_key: SecretStr | None = None
    """When set, every route but /health and /ready needs `Authorization: Bearer <key>`."""
    cors_origins: Annotated[list[str], NoDecode] = []
    """Origins allowed to call the API from a browser; empty: no CORS headers at all."""
    cors_allow_credentials: bool = False
    """Let browsers send cookies/auth to the allowed origins; refused together with origin "*"."""
    device: str = "auto"
    """Where the models run: auto, cpu, cuda, cuda:N or mps."""
    weights: Literal[INFERENCE_WEIGHTS] = "auto"
    """How the models decode (`prepare_for_inference`): auto is int8 weights on CPUs (their cost in
    loss is measured in docs/results.md) and the model as it is elsewhere."""
    quantize: Literal[OLD_WEIGHTS_FLAG[1]] | None = None
    """The older spelling of weights=int8 (QUILL_QUANTIZE=int8); it wins over `weights`."""
    torch_threads: int | None = Field(None, ge=1, le=1024)
    """PyTorch's intra-op threads; unset: one per core but one, which stays free for the event loop
    (on a small CPU, model threads that take every core starve the HTTP side)."""
    max_batch: int = Field(16, ge=1, le=1024)
    """Sequences decoded together in one step, per model."""
    queue_size: int = Field(128, ge=0, le=100_000)
    """Sequences that may wait for a batch slot, per model; beyond that requests get 503."""
    request_timeout: float = Field(120.0, gt=0, le=86_400)
    """Seconds a request may take from arrival to its last token (queueing included)."""
    max_prompt_chars: int = Field(16_384, ge=1)
    """Longest prompt accepted, in characters (chat: the rendered transcript)."""
    max_tokens_cap: int = Field(2048, ge=1)
    """Largest max_tokens (or max_length) a request may ask for."""
    max_choices: int = Field(16, ge=1)
    """Most sequences one request may start (prompts x n)."""
    max_body_bytes: int = Field(1_048_576, ge=1024)
    """Largest request body accepted; larger bodies get 413."""
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    log_json: bool = True
    """One JSON object per log line (for log collectors); false: plain text lines."""

    @field_validator("models", "cors_origins", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one model is needed")
        names = [name for name, _ in map(parse_model_spec, value)]
        duplicates = sorted({n for n in names if n is not None and names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique, repeated: {', '.join(duplicates)}")
        return value

    @model_validator(mode="after")
    def _older_spelling(self) -> ServeSettings:
        if self.quantize:
            self.weights = self.quantize
        return self

    @model_validator(mode="after")
    def _check_cors(self) -> ServeSettings:
        if self.cors_allow_credentials and "*" in self.cors_origins:
            raise ValueError("cors_origins '*' cannot be combined with cors_allow_credentials: list the origins")
        return self

    def resolved_torch_threads(self) -> int:
        return self.torch_threads or max(1, (os.cpu_count() or 2) - 1)

    def to_env(self) -> dict[str, str]:
        """These settings as QUILL_* environment variables (for worker processes)."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if isinstance(value, list):
                value = json.dumps(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[f"QUILL_{name.upper()}"] = str(value)
        return env


def parse_model_spec(spec: str) -> tuple[str | None, str]:
    """`ALIAS=NAME_OR_DIR` → (alias, target); a plain name or directory → (None, spec).

    An `=` counts as an alias only when the part before it is a plain name (no path separator),
    so a directory whose name holds `=` still works when given with a path.
    """
    alias, sep, target = spec.partition("=")
    if sep and alias and target and "/" not in alias and "\\" not in alias and not Path(spec).exists():
        return alias, target
    return None, spec
