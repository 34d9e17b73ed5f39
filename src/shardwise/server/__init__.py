"""An OpenAI-compatible HTTP front end for a resident engine: ``shardwise serve``.

Why FastAPI on uvicorn: it is a maintained ASGI stack that needs no code of ours for HTTP itself;
pydantic validates request bodies (a wrong type is one clear 400, never a crash deep inside); and
server-sent events are a ``StreamingResponse`` over an async generator, whose cancellation when the
client goes away is exactly the signal the engine needs to free the request's cache row.

The modules, one job each:

- ``schemas``: the request bodies OpenAI clients send, as pydantic models.
- ``errors``: OpenAI-shaped error bodies, and handlers so every failure is one.
- ``middleware``: API-key check, body size limit, per-request metrics and the catch-all 500.
- ``metrics``: the Prometheus counters and histograms behind ``/metrics``.
- ``detokenize``: token ids to text deltas, incrementally, with stop strings.
- ``streams``: one engine request seen from the event loop (thread-safe bridge, cancel).
- ``responses``: OpenAI-shaped completion, chat and chunk objects.
- ``app``: ``create_app(engine)``, the routes, written against the engine contract only.
- ``launch``: ``serve(options)``: load the engine, bind, run uvicorn, close the engine on shutdown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import create_app
    from .launch import serve

__all__ = ["create_app", "serve"]


def __getattr__(name: str):
    # Lazy, so `import shardwise.server.detokenize` (or the CLI's --help) does not import FastAPI.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "serve":
        from .launch import serve

        return serve
    raise AttributeError(name)
