"""Every failure a client sees has OpenAI's error shape, `{"error": {"message", "type", "code"}}`, and the
status that names it: the official clients raise their typed exceptions from these."""

from __future__ import annotations

from starlette.responses import JSONResponse

from minicpmv_edge.runtime import ChatInputError, EngineError, ImageInputError, VideoInputError, VisionError


class ContextLimitError(ValueError):
    """The prompt and the tokens asked for do not fit the server's context."""


class QueueFullError(RuntimeError):
    """Every place in the engine's queue is taken."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, *, kind: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# The library's own input errors: the request, not the server, is at fault.
LIBRARY_INPUT_ERRORS = (ChatInputError, ImageInputError, VideoInputError, EngineError, VisionError)


def as_api_error(error: BaseException, retry_after_s: int = 2) -> ApiError:
    if isinstance(error, ApiError):
        return error
    message = " ".join(str(error).split())
    if isinstance(error, ContextLimitError):
        return ApiError(400, message, "context_length_exceeded")
    if isinstance(error, QueueFullError):
        return ApiError(503, message, "queue_full", headers={"Retry-After": str(retry_after_s)})
    if isinstance(error, LIBRARY_INPUT_ERRORS):
        return ApiError(400, message, "invalid_request")
    return ApiError(500, f"internal error ({type(error).__name__}): {message}", "internal_error")
