"""What every request goes through before and after its route: API key, body limit, metrics, catch-all.

Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which runs the app in a separate task and
would hide a streaming client's disconnect from the response that must notice it.
"""

from __future__ import annotations

import hmac
import logging
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import settings
from ..untrusted import one_line
from .errors import APIError, internal_error
from .metrics import Metrics

log = logging.getLogger("shardwise.server")

MAX_BODY_BYTES = 16 << 20  # far above any prompt that fits a context; a bound on what one request makes us hold
OPEN_PATHS = ("/health",)  # answered without an API key, for load balancers and liveness probes


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` mid-body; an ``HTTPException`` so FastAPI passes it through as a 413."""

    def __init__(self) -> None:
        super().__init__(413, f"request body is larger than {MAX_BODY_BYTES >> 20} MiB")


class Gate:
    """Counts and times every HTTP request, refuses bad keys and huge bodies, and turns a bug into a 500.

    The catch-all lives here, inside Starlette's outermost error middleware, so an unexpected exception
    becomes one OpenAI-shaped JSON 500 and one log line, instead of a traceback re-raised to uvicorn.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, api_key: str | None = None):
        self.app, self.metrics, self.api_key = app, metrics, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refuse(scope)
            if refusal is not None:
                await refusal.response()(scope, receive, send_counted)
            else:
                await self.app(scope, _limited(receive), send_counted)
        except Exception as exc:  # noqa: BLE001 - the last line of defence: nothing reaches the client raw
            log.error("%s %s failed: %s: %s", scope.get("method"), scope.get("path"), type(exc).__name__,
                      one_line(exc), exc_info=_debug())
            if status == 0:
                await internal_error(exc).response()(scope, receive, send_counted)
        finally:
            # 499 (nginx's "client closed request"): the client left before any response started.
            self.metrics.observe_request(scope.get("path", ""), status or 499, time.perf_counter() - start)

    def _refuse(self, scope: Scope) -> APIError | None:
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return APIError(413, BodyTooLarge().detail)
        if self.api_key is None or scope.get("path") in OPEN_PATHS:
            return None
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not key:
            return APIError(401, "missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            return APIError(401, "incorrect API key", code="invalid_api_key")
        return None


def _limited(receive: Receive) -> Receive:
    """``receive`` that refuses a body growing past the limit (chunked bodies carry no length)."""
    seen = 0

    async def receive_limited() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                raise BodyTooLarge()
        return message

    return receive_limited


def _debug() -> bool:
    try:
        return settings.debug()
    except Exception:  # noqa: BLE001 - a malformed SHARDWISE_DEBUG must not turn one error into two
        return False
