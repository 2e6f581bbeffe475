"""Request and response bodies, with their limits.

Requests follow OpenAI's completions and chat schemas (plus a few extensions: `top_k`,
`repetition_penalty`). Fields that OpenAI defines but QuillGPT cannot honour are refused with a
clear 422 rather than ignored; unknown extra fields are ignored, as chat tools send many. Limits
that depend on the server's settings (prompt length, max_tokens cap, choices per request) are
checked by the routes; the sampling settings' ranges and defaults come from `quillgpt.sampling.LIMITS`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quillgpt.sampling import LIMITS

_FROM_TABLE: Any = object()


def sampling_field(name: str, default: Any = _FROM_TABLE) -> Any:
    """A request field with the range, and unless given the default, of sampling setting `name`."""
    limit = LIMITS[name]
    return Field(limit.default if default is _FROM_TABLE else default, **limit.api_bounds())


SEED_MAX = 2**63 - 1
StopString = Annotated[str, Field(min_length=1, max_length=256)]
Stop = StopString | Annotated[list[StopString], Field(max_length=4)] | None
ModelName = Annotated[str, Field(min_length=1, max_length=256)]


class RequestBody(BaseModel):
    """A request body: unknown fields are ignored (chat tools send many)."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(RequestBody):
    include_usage: bool = False
    """Send one more chunk before `[DONE]` with the request's usage and no choices."""


class SamplingRequest(RequestBody):
    """Fields shared by completions and chat completions."""

    model: ModelName | None = None
    """A served model's name; omitted: the first model the server serves."""
    temperature: float = sampling_field("temperature")
    top_p: float = sampling_field("top_p")
    top_k: int | None = sampling_field("top_k")
    """Extension: keep only the k most likely tokens."""
    repetition_penalty: float = sampling_field("repetition_penalty")
    """Extension: CTRL-style penalty on tokens already in the prompt or output."""
    presence_penalty: float = sampling_field("presence_penalty")
    frequency_penalty: float = sampling_field("frequency_penalty")
    n: int = Field(1, ge=1, le=128)
    stop: Stop = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    """Same seed, same output, alone or batched; choice i of n uses seed + i."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    """Accepted for compatibility and ignored."""
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingRequest):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=64)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=64)]
    ) = ""
    """Text, several texts, token ids, or several lists of token ids. Empty: the tokenizer's start token."""
    max_tokens: int | None = sampling_field("max_new_tokens", 16)
    """Tokens to generate per choice (OpenAI's default: 16). null: the server's cap."""
    logprobs: int | None = sampling_field("logprobs")
    """Return the chosen tokens' log-probabilities and this many most likely alternatives."""
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported: these are left-to-right models")
        return value

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo together with logprobs is not supported")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # one prompt as token ids
        return list(p)


class TextPart(RequestBody):
    type: Literal["text"]
    text: str


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=64)] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=512)]
    max_tokens: int | None = sampling_field("max_new_tokens", None)
    """Tokens to generate per choice; null: 256 (or the server's cap, if lower)."""
    max_completion_tokens: int | None = sampling_field("max_new_tokens", None)
    """OpenAI's newer name for max_tokens; wins when both are given."""
    logprobs: bool = False
    top_logprobs: int | None = sampling_field("logprobs")
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatRequest:
        if self.tools:
            raise ValueError("tools (function calling) are not supported by these base models")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class LegacyGenerateRequest(RequestBody):
    """The original QuillGPT's /generate parameters (query string or JSON body), with extensions."""

    prompt: str
    max_length: int = sampling_field("max_new_tokens", 500)
    """Tokens to generate (the original's default: 500)."""
    temperature: float = sampling_field("temperature")
    top_k: int | None = sampling_field("top_k")
    top_p: float = sampling_field("top_p")
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: Stop = None
    model: ModelName | None = None


class LegacyGenerateBody(RequestBody):
    """The same fields, all optional: a JSON body may leave some to the query string."""

    prompt: str | None = None
    max_length: int | None = sampling_field("max_new_tokens", None)
    temperature: float | None = sampling_field("temperature", None)
    top_k: int | None = sampling_field("top_k", None)
    top_p: float | None = sampling_field("top_p", None)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: Stop = None
    model: ModelName | None = None


class TokenizeRequest(RequestBody):
    model: ModelName | None = None
    text: str


class DetokenizeRequest(RequestBody):
    model: ModelName | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1_000_000)]


# --- responses ---


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]
    """Offsets in the completion text (not counting the prompt)."""


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    """A chosen token in chat logprobs (the ids and values come from `quillgpt.decoder.TokenLogprob`)."""

    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelObject(BaseModel):
    """OpenAI's model object: one entry of /v1/models, with QuillGPT's facts about the model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "quillgpt"
    context_length: int
    vocab_size: int
    parameters: int
    tokenizer: str
    provenance: dict[str, Any] = {}
    """How the model was made (data, steps, val loss), from its config.json."""
    default_prompt: str = ""
    """Where a UI starts this model (its own, or its training dataset's; "" for none)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class LegacyGenerateResponse(BaseModel):
    prompt: str
    response: str


class TokenizeResponse(BaseModel):
    model: str
    tokens: list[int]
    count: int
    pieces: list[str]
    """Each token decoded on its own (a BPE token may hold part of a character: U+FFFD)."""


class DetokenizeResponse(BaseModel):
    model: str
    text: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
    detail: str
    """The same message, where FastAPI clients look for it."""
