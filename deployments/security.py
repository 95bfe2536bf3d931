"""Two ASGI middlewares in front of the API: an optional bearer API key and a request-body limit.
Both answer with the API's error shape (deployments.errors)."""
import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import error_body

OPEN_PATHS = ("/health",)  # load balancers probe it without credentials


def error_json(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status).model_dump(), status_code=status, headers=headers)


def route_path(scope: Scope) -> str:
    """The path below the app's route prefix (Serve puts the prefix in root_path)."""
    path, root = scope["path"], scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on every route but /health; 401 otherwise. CORS preflight
    (OPTIONS) carries no credentials, so it passes through to the CORS middleware's answer."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and route_path(scope) not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_json("Unauthorized: give the API key as `Authorization: Bearer <key>`",
                                          401, {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: checked on Content-Length, and counted while reading for
    chunked uploads that carry none. The body is read before the app runs and replayed to it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._reject(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # later calls wait for the disconnect, as streaming needs
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_json(f"Request body is larger than the limit of {self.max_bytes} bytes", 413)
        await response(scope, receive, send)
