"""``create_app(engine)``: the OpenAI-compatible routes over any object that follows the engine contract.

The contract is the one of ``shardwise.engine.Engine``: ``tokenizer``, ``model_name``, ``seq_len``,
``eos_token_ids``, ``check_request(ids, max_tokens)`` and ``submit(ids, sampling, max_tokens,
on_event) -> handle`` with ``handle.cancel()``. Nothing here imports the engine's machinery, so tests
drive the whole HTTP surface with a fake engine, in milliseconds and without ranks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..untrusted import one_line
from . import errors
from .detokenize import TextStream
from .errors import APIError, internal_error
from .jobs import Job, chat_job, check_model, completion_job
from .metrics import Metrics
from .middleware import Gate
from .responses import DONE, ChatShape, EventStream, Shape, sse, usage
from .schemas import ChatCompletionRequest, CompletionRequest
from .streams import ClientGone, Generation

log = logging.getLogger("shardwise.server")


def create_app(engine: Any, api_key: str | None = None, served_model_name: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``; ``api_key`` makes every route but ``/health`` need
    ``Authorization: Bearer KEY``; ``served_model_name`` is the model id clients use (default: the
    engine's ``model_name``, which is also always accepted)."""
    name = served_model_name or engine.model_name
    names = tuple(dict.fromkeys((name, engine.model_name)))
    metrics = Metrics()
    started = int(time.time())
    app = FastAPI(title="shardwise", version=_version(), description="OpenAI-compatible API of a shardwise engine")
    app.state.engine, app.state.metrics = engine, metrics
    errors.install(app)
    app.add_middleware(Gate, metrics=metrics, api_key=api_key)

    @app.get("/health")
    async def health() -> dict[str, str]:
        if not _alive(engine):
            raise APIError(503, "the engine is not running", code="engine_unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": started, "owned_by": "shardwise",
                "max_model_len": engine.seq_len}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id, names)
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model, names)
        job = await run_in_threadpool(completion_job, body, engine)
        return await _respond(engine, metrics, job, Shape(name), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model, names)
        job = await run_in_threadpool(chat_job, body, engine)
        return await _respond(engine, metrics, job, ChatShape(name), request)

    return app


async def _respond(engine: Any, metrics: Metrics, job: Job, shape: Shape, request: Request) -> Response:
    generation = Generation(engine, job, metrics)
    text = TextStream(engine.tokenizer, job.stop)
    if job.stream:
        return EventStream(_events(generation, text, shape, job), on_close=generation.close)
    finish: str | None = None
    try:
        async for _, reason in generation.pieces(text, request):
            finish = reason
    except ClientGone:
        return Response(status_code=499)  # nobody reads this; the status is for the metrics and the log
    finally:
        generation.close()
    return JSONResponse(shape.full(text.text, finish, usage(generation.prompt_tokens, generation.tokens)))


async def _events(generation: Generation, text: TextStream, shape: Shape, job: Job) -> AsyncIterator[bytes]:
    """The SSE body: the pieces as chunks, a chunk with the finish reason, usage if asked, ``[DONE]``."""
    try:
        first = shape.first_chunk()
        if first is not None:
            yield sse(first)
        finish: str | None = None
        async for delta, reason in generation.pieces(text):
            finish = reason
            if delta:
                yield sse(shape.chunk(delta))
        yield sse(shape.chunk("", finish))
        if job.include_usage:
            yield sse(shape.usage_chunk(usage(generation.prompt_tokens, generation.tokens)))
    except APIError as exc:  # the status line is long gone: the error travels as an event, as OpenAI's does
        yield sse(exc.body())
    except Exception as exc:  # noqa: BLE001 - same, for a bug of ours
        log.error("stream failed: %s: %s", type(exc).__name__, one_line(exc))
        yield sse(internal_error(exc).body())
    finally:
        generation.close()
    yield DONE


def _alive(engine: Any) -> bool:
    """Whether the engine can take requests, if it says (``alive``, or ``closed``); assumed so otherwise."""
    if getattr(engine, "closed", False):
        return False
    alive = getattr(engine, "alive", True)
    return bool(alive() if callable(alive) else alive)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shardwise")
    except PackageNotFoundError:
        return "0"
