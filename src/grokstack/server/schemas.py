"""Request bodies of the xAI/OpenAI API (spec api.md §3, §8, §11).

Unknown fields are ignored, as OpenAI does; known fields are checked, and a bad value is a 400 that names
the field. Ranges follow api.md §13 (stop strings unlimited, top_logprobs up to 20).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 16


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Sampling(_Body):
    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None
    # vLLM-style extensions
    top_k: Annotated[int, Field(ge=0)] = 0
    min_p: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    ignore_eos: bool = False  # keep generating past end-of-sequence tokens (load tests, as vLLM's benchmarks do)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key in v or {}:
            if not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return v


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    deferred: bool = False
    search_parameters: dict[str, Any] | None = None  # validated by search.live.plan_search (xAI's limits)
    web_search_options: dict[str, Any] | None = None  # OpenAI's shim: live search in mode auto
    grokstack_options: dict[str, Any] | None = None  # {"search_results": true} opts into search_results
    reasoning_effort: str | None = None  # accepted, ignored: Grok-1/2 do not reason


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None


class TokenizeTextRequest(_Body):
    text: str
    model: str | None = None
    user: str | None = None


class TokenizeRequest(_Body):
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(_Body):
    tokens: list[Annotated[int, Field(ge=0)]]


MAX_MODERATION_INPUTS = 64
MAX_MODERATION_CHARS = 1 << 20


class ModerationRequest(_Body):
    input: str | list[str]
    model: str | None = None

    @field_validator("input")
    @classmethod
    def _check_input(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items or not all(x.strip() for x in items):
            raise ValueError("input must be a non-empty string or a non-empty list of non-empty strings")
        if len(items) > MAX_MODERATION_INPUTS:
            raise ValueError(f"at most {MAX_MODERATION_INPUTS} inputs per request")
        if sum(len(x) for x in items) > MAX_MODERATION_CHARS:
            raise ValueError(f"inputs may hold at most {MAX_MODERATION_CHARS} characters in all")
        return v
