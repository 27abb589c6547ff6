"""Every HTTP error in one place: the status, and OpenAI's body shape or xAI's (api.md §2).

OpenAI: {"error": {"message", "type", "param", "code"}} (the default; OpenAI SDKs raise their matching
exception class with this message). xAI: {"code": <gRPC status text>, "error": <message>}.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContentFilterError, ContextLengthError, GrokstackError, OverloadedError, RateLimitError

# status -> (OpenAI type, default code, xAI gRPC status text)
KINDS = {
    400: ("invalid_request_error", "invalid_value", "Client specified an invalid argument"),
    401: ("authentication_error", "invalid_api_key", "Client specified an invalid argument"),
    403: (
        "permission_error",
        "permission_denied",
        "The caller does not have permission to execute the specified operation",
    ),
    404: ("not_found_error", "not_found", "Some requested entity was not found"),
    405: ("invalid_request_error", "method_not_allowed", "Client specified an invalid argument"),
    413: ("invalid_request_error", "request_too_large", "Client specified an invalid argument"),
    422: ("invalid_request_error", "missing_field", "Client specified an invalid argument"),
    429: ("rate_limit_error", "rate_limit_exceeded", "Some resource has been exhausted"),
    500: ("server_error", "internal_error", "Internal error"),
    503: ("server_error", "overloaded", "The service is currently unavailable"),
}


def error_response(
    status: int, message: str, style: str = "openai", code: str | None = None, param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    kind, default_code, grpc = KINDS.get(status, KINDS[500 if status >= 500 else 400])
    if style == "xai":
        body: dict = {"code": grpc, "error": message}
    else:
        body = {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _style(request: Request) -> str:
    return getattr(request.app.state, "error_style", "openai")


async def on_grokstack_error(request: Request, exc: GrokstackError) -> JSONResponse:
    headers = {}
    code = None
    if isinstance(exc, (RateLimitError, OverloadedError)):
        headers["retry-after"] = str(max(1, round(exc.retry_after)))
        headers["retry-after-ms"] = str(int(exc.retry_after * 1000))
        if getattr(exc, "no_retry", False):
            headers["x-should-retry"] = "false"
    if isinstance(exc, ContextLengthError):
        code = "context_length_exceeded"
    if isinstance(exc, ContentFilterError):
        code = "content_filter"
    return error_response(exc.http_status, str(exc), _style(request), code=code, headers=headers)


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """pydantic's complaints as one readable message: 422 for a missing field, 400 for a bad value."""
    errors = exc.errors()
    first = errors[0] if errors else {"type": "value_error", "loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return error_response(400, f"the request body is not valid JSON: {first.get('msg')}", _style(request))
    if field is None:  # the body as a whole: absent, or not an object
        return error_response(400, "the request body must be a JSON object", _style(request))
    if first.get("type") == "missing":
        return error_response(422, f"missing required field '{field}'", _style(request), param=field)
    msg = first.get("msg", "invalid value")
    where = f"'{field}': " if field else ""
    return error_response(400, f"invalid value for {where}{msg}", _style(request), param=field)


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    return error_response(exc.status_code, message, _style(request), headers=getattr(exc, "headers", None))


def install(app) -> None:
    app.add_exception_handler(GrokstackError, on_grokstack_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
