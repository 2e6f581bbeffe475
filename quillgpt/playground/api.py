"""`ApiBackend`: models on a running `quill serve`, through its OpenAI-compatible `/v1` API (SSE streaming)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import httpx

from quillgpt.data import default_prompt
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


class ApiBackend:
    """Models on a running `quill serve`, through its OpenAI-compatible `/v1` API."""

    local = False

    def __init__(self, url: str, *, timeout: float = 10.0, client: httpx.Client | None = None):
        """`client`, if given, is used as is (its base URL included): tests pass an in-process app's."""
        self.url = normalize_api_url(url)
        self.label = f"Models run by the API at {self.url}"
        # generation may queue behind other requests on the server: reads may wait longer than connects
        self.client = client or httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, read=120.0))
        self.entries: dict[str, dict[str, Any]] = {}

    def models(self) -> list[str]:
        try:
            r = self.client.get("/v1/models")
        except httpx.HTTPError as e:
            raise BackendError(self._unreachable(e)) from None
        self._check(r)
        try:
            data = r.json()["data"]
            self.entries = {m["id"]: m for m in data}
        except (ValueError, KeyError, TypeError):
            raise BackendError(f"{self.url}/v1/models did not answer like an OpenAI-compatible API") from None
        return default_first(list(self.entries))

    def card(self, name: str) -> ModelCard:
        if name not in self.entries:
            self.models()
        entry = self.entries.get(name)
        if entry is None:
            raise BackendError(f"The API at {self.url} has no model {name!r} (it has: {', '.join(self.entries)})")
        prov = entry.get("provenance") if isinstance(entry.get("provenance"), dict) else {}
        params = entry.get("parameters")
        description = entry.get("card") if isinstance(entry.get("card"), str) else None
        facts = provenance_facts(prov)
        if entry.get("tokenizer") and entry.get("vocab_size"):
            facts["Tokenizer"] = f"{entry['tokenizer']}, {entry['vocab_size']:,} tokens"
        if entry.get("context_length"):
            facts["Context"] = f"{entry['context_length']:,} tokens"
        return ModelCard(
            name=name,
            source=f"{self.url} (API)",
            parameters=params if isinstance(params, int) else None,
            facts=facts,
            description=description,
            default_prompt=default_prompt({**prov, **entry}),
        )

    def stream(self, name: str, prompt: str, params: SamplingParams) -> Iterator[Chunk]:
        body: dict[str, Any] = {
            "model": name,
            "prompt": prompt,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "logprobs": TOP_ALTERNATIVES,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if params.top_k is not None:
            body["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        started = False
        try:
            with self.client.stream("POST", "/v1/completions", json=body) as r:
                started = True
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, SSE comments and event names
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        return
                    yield self._chunk(data)
        except httpx.HTTPError as e:
            if started:
                raise BackendError(f"The API at {self.url} stopped answering while generating ({e})") from None
            raise BackendError(self._unreachable(e)) from None

    def _chunk(self, data: str) -> Chunk:
        try:
            event = json.loads(data)
            if "error" in event:
                raise BackendError(f"The API failed while generating: {_error_message(event)}")
            choice = event["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise BackendError(f"The API sent a chunk this page cannot read: {data[:200]!r}") from None
        return Chunk(choice.get("text") or "", _token_views(choice.get("logprobs")), choice.get("finish_reason"))

    def _check(self, r: httpx.Response) -> None:
        if r.status_code >= 400:
            try:
                message = _error_message(r.json())
            except ValueError:
                message = r.text.strip()[:300] or r.reason_phrase
            raise BackendError(f"The API at {self.url} answered {r.status_code}: {message}")

    def _unreachable(self, e: httpx.HTTPError) -> str:
        reason = str(e) or type(e).__name__
        return (
            f"Cannot reach the QuillGPT API at {self.url} ({reason}). Is `quill serve` running there? "
            "Start it, or run the playground without --api-url to load models in this process."
        )


def normalize_api_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url.removesuffix("/v1")


def _error_message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body))
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        return str(err)
    return str(body)


def _token_views(logprobs: dict[str, Any] | None) -> list[TokenView]:
    """OpenAI completions logprobs (tokens, token_logprobs, top_logprobs) → TokenViews."""
    if not logprobs:
        return []
    tokens = logprobs.get("tokens") or []
    chosen = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    views = []
    for i, text in enumerate(tokens):
        lp = chosen[i] if i < len(chosen) else None
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        alternatives = sorted(((t, math.exp(v)) for t, v in top.items()), key=lambda a: -a[1])
        views.append(TokenView(text, math.exp(lp) if lp is not None else None, alternatives))
    return views
