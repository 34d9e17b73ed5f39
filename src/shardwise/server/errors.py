"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status.

OpenAI client libraries turn the status into an exception class (400 ``BadRequestError``, 404
``NotFoundError``, 429 ``RateLimitError``...) and show ``message``; FastAPI's defaults (a 422 with a
list of pydantic errors, an HTML-less ``{"detail": ...}``) would reach users as unreadable noise. So
every failure, including malformed JSON, unknown routes and our own bugs, leaves as this one shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..untrusted import one_line

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    """A failure to report to the client as an OpenAI error object with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def internal_error(exc: BaseException) -> APIError:
    """A bug of ours, as a one-line 500 (the traceback goes to the server log, never to the client)."""
    return APIError(500, f"internal error: {type(exc).__name__}: {one_line(exc)}", code="internal_error")


def _validation_message(exc: RequestValidationError) -> APIError:
    """The first pydantic error as one line naming the field, e.g. ``max_tokens: Input should be...``."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error")
        return APIError(400, f"request body is not valid JSON{f' ({detail})' if detail else ''}", code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # pydantic names union branches in the location ("prompt.str", "stop.list[str]"); keep field names.
    fields = [p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool")]
    path, param = ".".join(fields), (fields[0] if fields else None)
    if not loc:  # the body as a whole: empty, a list, a form, or JSON sent as another content type
        return APIError(400, "request body must be a JSON object, sent with Content-Type: application/json")
    message = one_line(Exception(first.get("msg", "invalid value")))
    if first.get("type") == "missing" and path:
        return APIError(400, f"missing required field {path!r}", param=param)
    return APIError(400, f"{path or 'request body'}: {message}", param=param)


def install(app: FastAPI) -> None:
    """Route every exception FastAPI would render itself to an OpenAI-shaped body."""

    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_message(exc).response()

    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        return APIError(exc.status_code, message, code=code).response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
