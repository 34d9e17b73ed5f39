"""The request bodies OpenAI clients send, as pydantic models: types checked here, meaning in ``jobs``.

Models are strict (``"16"`` is not an integer, ``true`` is not a number) so a client bug is a 400
naming the field rather than a silently coerced value. Unknown fields are ignored, as OpenAI-compatible
servers do, because clients send fields (``user``, ``metadata``...) that do not change the output.
Fields that would change the output but are not supported (``n > 1``, ``logprobs``, ``tools``...)
are declared here so ``jobs`` can refuse them instead of ignoring them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class GenerationRequest(_Body):
    """What both endpoints share: the model, sampling, limits and streaming."""

    model: str | None = None  # OpenAI requires it; we default to the one model served
    max_tokens: int | None = None
    temperature: float | None = None  # OpenAI's default is 1.0 (sampling); 0 = greedy
    top_p: float | None = None
    top_k: int | None = None  # an extension (vLLM's): 0 or -1 = no top-k filter, 1 = greedy
    ignore_eos: bool | None = None  # an extension (vLLM's): generate max_tokens even past end-of-sequence
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: ``prompt`` is checked in ``jobs`` (string, one-string list or token ids)."""

    prompt: Any = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One turn. Extra keys (``name``, ``tool_call_id``...) pass through to the chat template."""

    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # the newer name of max_tokens; wins when both are given
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
