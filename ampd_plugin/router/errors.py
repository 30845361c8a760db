"""Errors in the OpenAI error shape, so clients written for the OpenAI API can read the router's refusals.

`{"error": {"message", "type", "param", "code"}}` with a matching HTTP status. Every refusal of the router
goes through `RouterError`; nothing raised from client input ever escapes as a 500.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

# status -> OpenAI error "type"
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class RouterError(Exception):
    """A request the router refuses or cannot complete; `kind` labels the errors metric."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code or kind

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, kind: str = "bad_request", param: str | None = None) -> RouterError:
    return RouterError(400, message, kind, param)
