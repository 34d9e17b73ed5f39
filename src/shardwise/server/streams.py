"""One engine request seen from the event loop: submit, events in order, text pieces, cancellation.

The engine calls ``on_event`` from its own background thread; asyncio objects are not thread-safe, so
each event crosses into the loop with ``loop.call_soon_threadsafe(queue.put_nowait, event)`` and the
handler awaits the queue. A request whose client goes away is cancelled in the engine at once
(``handle.cancel()``), so its cache row goes to the next request instead of decoding for nobody.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request

from ..engine.types import EngineBusy, EngineClosed, TokenEvent
from ..errors import ShardwiseError
from ..untrusted import one_line
from .detokenize import TextStream
from .errors import APIError
from .jobs import Job
from .metrics import Metrics

log = logging.getLogger("shardwise.server")

DISCONNECT_POLL_SECONDS = 0.5  # how often a non-streaming request checks that its client is still there


class ClientGone(Exception):
    """The client closed the connection before its (non-streamed) answer was ready."""


class Generation:
    """A submitted request: its events as an async iterator, its text as pieces, and ``close()``."""

    def __init__(self, engine: Any, job: Job, metrics: Metrics):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._metrics = metrics
        self._eos = frozenset(engine.eos_token_ids)
        self.prompt_tokens = len(job.prompt_ids)
        self.tokens = 0  # generated so far (an end-of-sequence token included)
        self.finished = False
        self._submitted = self._last = time.perf_counter()
        try:
            self._handle = engine.submit(job.prompt_ids, job.sampling, job.max_tokens, self._on_event,
                                         ignore_eos=job.ignore_eos)
        except EngineBusy as exc:
            raise APIError(429, one_line(exc), code="queue_full") from None
        except EngineClosed as exc:
            raise APIError(503, f"the engine is not running: {one_line(exc)}", code="engine_unavailable") from None
        except ShardwiseError as exc:
            raise APIError(400, one_line(exc)) from None
        metrics.running.inc()
        metrics.prompt_tokens.inc(self.prompt_tokens)

    def _on_event(self, event: TokenEvent) -> None:  # the engine's thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone, nobody waits for this event
            pass

    async def events(self, request: Request | None = None) -> AsyncIterator[TokenEvent]:
        """Events in order, up to the one with ``finish_reason``. With ``request``, raises ``ClientGone``
        if its client disconnects (a streaming response learns that from Starlette instead)."""
        waiting: asyncio.Future[TokenEvent] | None = None
        polled = time.monotonic()
        try:
            while not self.finished:
                if waiting is None:
                    waiting = asyncio.ensure_future(self._queue.get())
                done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_SECONDS)
                if request is not None and time.monotonic() - polled >= DISCONNECT_POLL_SECONDS:
                    polled = time.monotonic()
                    if await request.is_disconnected():
                        raise ClientGone()
                if not done:
                    continue
                event, waiting = waiting.result(), None
                self._count(event)
                yield event
        finally:
            if waiting is not None:
                waiting.cancel()

    def _count(self, event: TokenEvent) -> None:
        now = time.perf_counter()
        if event.token is not None:
            self.tokens += 1
            self._metrics.generation_tokens.inc()
            (self._metrics.ttft if self.tokens == 1 else self._metrics.itl).observe(now - self._last)
            self._last = now
        if event.finish_reason is not None:
            self._finish()

    async def pieces(self, text: TextStream, request: Request | None = None) -> AsyncIterator[tuple[str, str | None]]:
        """``(delta, None)`` for each piece of new text, then ``(delta, finish_reason)`` once, last.

        The finish reason is OpenAI's: ``"stop"`` (end of sequence or a stop string) or ``"length"``.
        An engine-side failure raises ``APIError``.
        """
        async for event in self.events(request):
            delta = ""
            if event.token is not None and not (event.finish_reason == "stop" and event.token in self._eos):
                delta = text.add(event.token)
            if text.stopped:  # a stop string: the engine need not go on
                self._cancel()
                yield delta, "stop"
                return
            if event.finish_reason is None:
                if delta:
                    yield delta, None
                continue
            if event.finish_reason == "error":
                raise APIError(500, f"generation failed: {event.error or 'the engine gave no reason'}",
                               code="engine_error")
            if event.finish_reason == "cancelled":
                raise APIError(503, "the request was cancelled by the engine (shutting down?)", code="cancelled")
            delta += text.finish()
            yield delta, "stop" if text.stopped else event.finish_reason
            return

    def close(self) -> None:
        """The response is over: a request still running has lost its client, so cancel it in the engine."""
        if not self.finished:
            self._metrics.cancelled.inc()
            self._cancel()

    def _cancel(self) -> None:
        if self.finished:
            return
        self._finish()
        try:
            self._handle.cancel()
        except Exception as exc:  # noqa: BLE001 - an engine already closed; nothing is left to cancel
            log.warning("cancelling a request failed: %s: %s", type(exc).__name__, one_line(exc))

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            self._metrics.running.dec()
