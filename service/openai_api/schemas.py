"""Requests of the OpenAI-compatible API as the `openai` SDK (3.x) sends them, with monosemantic's own fields
(steering, features) arriving through the SDK's `extra_body`.

Every field is either honoured or refused with 400 naming it, never ignored: unknown fields are refused (extra
"forbid"), and the fields the SDK knows but this server cannot honour (tools, a JSON response format, echo,
suffix, best_of above n, audio …) are declared so that the refusal says why. Read from the SDK 3.57 and vLLM's
server (../shared/reference/openai.md).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from monosemantic.api import Steering, Text

MAX_CHOICES = 8  # `n`: every choice is a generation of its own


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class StreamOptions(_Request):
    include_usage: bool = False


class _Common(_Request):
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    logit_bias: dict[str, float] | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = Field(None, max_length=256, description="the end user, for the caller's records; not used to sample")
    stream: bool = False
    stream_options: StreamOptions | None = None
    # monosemantic's fields (the SDK's extra_body)
    steering: list[Steering] = Field(default_factory=list, description="as /v1/generate's: feature, mode add|clamp, value, dictionary")
    steer_prompt: bool = True
    features_top_k: int = Field(0, ge=0, description="each choice's `monosemantic.tokens`: the top features of every generated token")
    dictionary: Text | None = None
    top_k: int = Field(0, ge=0, description="vLLM's extra: sample from the k most likely tokens; 0 is no limit")

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "_Common":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream: true")
        return self

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Common):
    prompt: Text | list[Text] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _supported(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and (not self.prompt or any(isinstance(p, list) and not p for p in self.prompt)):
            raise ValueError("prompt: is empty: give a text or token ids to continue")
        if self.echo:
            raise ValueError("echo: not supported (the answer is the generated text only)")
        if self.suffix:
            raise ValueError("suffix: not supported (no insertion: the models served here only continue)")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of = n is supported (every choice is returned)")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ResponseFormat(_Request):
    type: Literal["text"]


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="wins over max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    chat_template: str | None = Field(None, max_length=64_000, description="a Jinja chat template for this request")
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _supported(self) -> "ChatRequest":
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise ValueError(f"{name}: tool calling is not supported")
        for name in ("tool_choice", "function_call", "parallel_tool_calls"):
            if getattr(self, name) not in (None, "none", False):
                raise ValueError(f"{name}: tool calling is not supported")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
