"""OpenAI-shaped API errors: `{"error": {"message", "type", "param", "code"}}` with code = HTTP status."""
from __future__ import annotations

from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "internal_server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error the server answers with its HTTP status and OpenAI's nested error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 err_type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.err_type = err_type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.err_type)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, err_type: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type or _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": status}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def from_value_error(exc: ValueError, default_param: str | None = None,
                     renames: dict[str, str] | None = None) -> APIError:
    """A 400 from a ValueError whose message starts with `field: ...` (the engine's convention)."""
    message = str(exc)
    head, sep, _ = message.partition(":")
    param = head.strip() if sep and head.strip().isidentifier() else default_param
    if renames and param in renames:
        param = renames[param]
        message = f"{param}{message[len(head):]}" if sep else message
    return APIError(400, message, param)


def check_keys(value: dict, allowed: set[str] | frozenset[str], where: str) -> None:
    """400 naming `where.key` for the first key of the JSON object `value` outside `allowed`."""
    extra = sorted(set(value) - set(allowed))
    if extra:
        raise bad_request(f"{where}.{extra[0]}: this server does not support the request field `{extra[0]}`",
                          f"{where}.{extra[0]}")
