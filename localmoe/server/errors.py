"""Errors the server answers with OpenAI's error JSON and vLLM's status codes."""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse

from localmoe.server.protocol import ErrorInfo, ErrorResponse

ERROR_TYPES = {
    HTTPStatus.BAD_REQUEST: "BadRequestError",
    HTTPStatus.UNAUTHORIZED: "AuthenticationError",
    HTTPStatus.NOT_FOUND: "NotFoundError",
    HTTPStatus.TOO_MANY_REQUESTS: "RateLimitError",  # the openai client's name for a 429, a key's limit reached
    HTTPStatus.INTERNAL_SERVER_ERROR: "InternalServerError",
    HTTPStatus.SERVICE_UNAVAILABLE: "ServiceUnavailableError",
}


class APIError(Exception):
    """A request the server refuses; raised anywhere in a handler, answered by one exception handler."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.headers = headers

    def body(self) -> ErrorResponse:
        kind = ERROR_TYPES.get(self.status, self.status.phrase.replace(" ", "") + "Error")
        return ErrorResponse(error=ErrorInfo(message=self.message, type=kind, param=self.param, code=self.status))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)
