"""One error shape for every route (OpenAI's, see protocol.ErrorResponse) and the exception
-> HTTP status mapping.

- `APIError` is raised by our own code with its status (404 unknown model, 400 wrong task, ...).
- `ValueError` from the engine or from SamplingParams names the bad field or limit: 400.
- Ray Serve's `BackPressureError` (a deployment's `max_queued_requests` is full) keeps its
  status (503, or 429 if configured) and always gets a `Retry-After` header; so does a
  deployment that is not up (503), and any APIError with status 503 (e.g. no replica left).
- An exception raised inside another deployment arrives wrapped in `RayTaskError`; its
  `cause` is the original exception and is mapped as above.
"""
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.protocol import ErrorInfo, ErrorResponse

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable_error"}
DEFAULT_RETRY_AFTER_S = 1


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message, status, param)  # all args, so the error pickles across Ray
        self.message, self.status, self.param = message, status, param

    def __str__(self) -> str:
        return self.message


def error_body(message: str, status: int, param: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=ERROR_TYPES.get(status, "server_error"),
                                         param=param, code=status))


def to_error(exc: BaseException) -> tuple[ErrorResponse, dict[str, str]]:
    """The error body and extra headers for any exception a route can meet."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    if isinstance(exc, APIError):
        headers = {"Retry-After": str(DEFAULT_RETRY_AFTER_S)} if exc.status == 503 else {}
        return error_body(exc.message, exc.status, exc.param), headers
    if isinstance(exc, BackPressureError):
        retry_after = exc.retry_after_s or DEFAULT_RETRY_AFTER_S
        return error_body(exc.message, exc.status_code), {"Retry-After": str(int(-(-retry_after // 1)))}
    if isinstance(exc, DeploymentUnavailableError):
        return error_body(str(exc), 503), {"Retry-After": str(DEFAULT_RETRY_AFTER_S)}
    if isinstance(exc, ValueError):
        return error_body(str(exc), 400), {}
    return error_body(f"Internal server error: {type(exc).__name__}: {exc}", 500), {}
