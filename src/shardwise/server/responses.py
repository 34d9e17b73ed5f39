"""OpenAI-shaped response objects and server-sent-event framing.

Two shapes share one flow: ``text_completion`` (``/v1/completions``) and ``chat.completion`` /
``chat.completion.chunk`` (``/v1/chat/completions``). Field for field they follow OpenAI's, because
client libraries parse them into typed objects and fail on a missing key.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Shape:
    """The objects of one endpoint, for one request (its id, creation time and model name)."""

    id_prefix = "cmpl-"
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, model: str):
        self.id = self.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model

    def _wrap(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def full(self, text: str, finish_reason: str | None, used: dict[str, int]) -> dict[str, Any]:
        return self._wrap(self.object, [self._choice(text, finish_reason)], usage=used)

    def chunk(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        return self._wrap(self.chunk_object, [self._delta(text, finish_reason)])

    def usage_chunk(self, used: dict[str, int]) -> dict[str, Any]:
        """The extra last chunk of ``stream_options: {"include_usage": true}``: no choices, the usage."""
        return self._wrap(self.chunk_object, [], usage=used)

    def first_chunk(self) -> dict[str, Any] | None:
        return None

    def _choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def _delta(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return self._choice(text, finish_reason)


class ChatShape(Shape):
    id_prefix = "chatcmpl-"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def first_chunk(self) -> dict[str, Any]:
        """OpenAI opens a chat stream with the role and empty content."""
        return self._wrap(self.chunk_object, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}])

    def _choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    def _delta(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if text or finish_reason is None else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


class EventStream(StreamingResponse):
    """``text/event-stream`` that runs ``on_close`` however the response ends.

    Starlette cancels the body iterator when the client disconnects (ASGI spec < 2.4, as uvicorn
    speaks), or stops iterating when a send fails (spec 2.4): in neither case is an iterator that never
    started run to its ``finally``. ``on_close`` is what cancels the engine request, so it runs here.
    """

    def __init__(self, content: Any, on_close: Callable[[], None], background: BackgroundTask | None = None):
        super().__init__(content, media_type="text/event-stream", background=background,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            try:
                await self.body_iterator.aclose()  # type: ignore[union-attr]
            except RuntimeError:  # still running in a task being torn down; its own finally does the rest
                pass
