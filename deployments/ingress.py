"""The HTTP ingress: one FastAPI app (via @serve.ingress) with vLLM's OpenAI-compatible routes.

It routes each request by its `model` field to that model's deployment handle (no `model`:
the first served model that supports the route), streams SSE ending in `data: [DONE]`, and
puts the API key, CORS and body-limit middlewares and the one error shape (deployments.errors)
in front of every route. It imports no engine code, so its replicas stay light.
"""
import asyncio
import importlib.metadata
import logging
import os
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from cluster import replica_stats
from deployments.errors import APIError, error_body, to_error
from deployments.metrics import render_prometheus
from deployments.openai_rag_routes import rag_chat, rag_router
from deployments.protocol import (
    API_NAMES, API_TASKS, ChatCompletionRequest, ClassificationRequest, CompletionRequest, DetokenizeRequest,
    EmbeddingRequest, ModelInfo, ModelList, RerankRequest, ScoreRequest, TokenizeRequest)
from deployments.retry import RetryPolicy, call_with_retry, unless_disconnected
from deployments.security import ApiKeyMiddleware, BodyLimitMiddleware
from deployments.sse import EventStream, data_events
from engine.heap import freeze_heap

# (HTTP method, path, OpenAIIngress method). Paths are vLLM's; rerank also answers Cohere's /v2.
ROUTES = [
    ("GET", "/v1/models", "list_models"),
    ("POST", "/v1/embeddings", "embeddings"),
    ("POST", "/v1/score", "score"), ("POST", "/score", "score"),
    ("POST", "/v1/rerank", "rerank"), ("POST", "/rerank", "rerank"), ("POST", "/v2/rerank", "rerank"),
    ("POST", "/classify", "classify"),
    ("POST", "/v1/completions", "completions"),
    ("POST", "/v1/chat/completions", "chat"),
    ("POST", "/tokenize", "tokenize"), ("POST", "/detokenize", "detokenize"),
    ("GET", "/health", "health"), ("GET", "/version", "version"), ("GET", "/metrics", "metrics"),
]  # with `rag` configured, also OpenAI's Files / Vector Stores / Responses routes (deployments.openai_rag_routes)
API_KEY_ENV = "SERVECLUSTER_API_KEY"
log = logging.getLogger("ray.serve")


class IngressSettings(BaseModel):
    # None: the ingress replica's SERVECLUSTER_API_KEY, so the secret need not sit in the config.
    api_key: str | None = None
    allowed_origins: list[str] = []  # CORS; [] sends no CORS headers, ["*"] allows any site
    max_request_body_bytes: int = 16 << 20
    retry: RetryPolicy = RetryPolicy()  # re-running calls whose replica died (deployments.retry)
    rag_chat_model: str | None = None  # a served name whose chat completions the RAG deployment answers


def json_response(model: BaseModel) -> Response:
    # Serialize once; FastAPI's response_model path would validate big embedding lists again.
    return Response(model.model_dump_json(), media_type="application/json")


@serve.deployment
@serve.ingress()  # the app is built per replica by __serve_build_asgi_app__, from the settings
class OpenAIIngress:
    async def __init__(self, servers: dict[str, DeploymentHandle], rag: DeploymentHandle | None,
                       settings: IngressSettings):
        self.servers, self.rag, self.settings = servers, rag, settings
        self.streams = {name: h.options(stream=True) for name, h in servers.items()}
        infos = await asyncio.gather(*(h.describe.remote() for h in servers.values()))
        self.models: dict[str, ModelInfo] = dict(zip(servers, infos))
        # Ray, FastAPI and pydantic: ~115k objects (imported outside a Ray worker) that a full collection would
        # walk (~70 ms here) while every request and stream through this replica waits; streamed chunks'
        # garbage triggers one now and then.
        freeze_heap()

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="servecluster", version=importlib.metadata.version("servecluster"))
        for method, path, name in ROUTES:
            app.add_api_route(path, getattr(self, name), methods=[method])
        if self.rag is not None:
            app.include_router(rag_router(self.rag))
        app.add_exception_handler(RequestValidationError, handle_validation_error)
        app.add_exception_handler(HTTPException, handle_http_error)
        app.add_exception_handler(Exception, handle_error)
        # Added last is outermost: CORS answers preflights, then the key, then the body limit.
        s = self.settings
        app.add_middleware(BodyLimitMiddleware, max_bytes=s.max_request_body_bytes)
        api_key = s.api_key or os.environ.get(API_KEY_ENV)
        if api_key:
            app.add_middleware(ApiKeyMiddleware, api_key=api_key)
        if s.allowed_origins:
            app.add_middleware(CORSMiddleware, allow_origins=s.allowed_origins, allow_methods=["*"],
                               allow_headers=["*"], allow_credentials="*" not in s.allowed_origins)
        return app

    def _pick(self, model: str | None, api: str) -> str:
        """The served model a request goes to, or 404 naming the served models."""
        if model is None:  # the first served model whose task serves this API best (e.g. a reranker over an embedder)
            tasks = API_TASKS[api]
            candidates = [(tasks.index(info.task), name) for name, info in self.models.items() if info.task in tasks]
            if candidates:
                return min(candidates, key=lambda c: c[0])[1]
            raise APIError(f"No served model supports the {API_NAMES[api]}; served models: "
                           f"{', '.join(self.models)}", 404, "model")
        if model not in self.models:
            raise APIError(f"The model `{model}` does not exist. Served models: {', '.join(self.models)}",
                           404, "model")
        return model

    def _replicas(self, name: str) -> Callable[[], int | None]:
        """How many replicas of a model the routers of this ingress replica can send to now."""
        deployment = self.servers[name].deployment_name
        return lambda: replica_stats.running_replicas(deployment)

    async def _call(self, api: str, method: str, body, request: Request) -> Response:
        # Errors are answered here, not by exception handlers: Serve installs its own handler
        # for BackPressureError on the app, which would bypass our error shape.
        try:
            name = self._pick(body.model, api)
            handle = getattr(self.servers[name], method)
            answer = await unless_disconnected(request, call_with_retry(
                lambda: handle.remote(body), lambda call: call, self.settings.retry, f"{api} on {name}",
                self._replicas(name)))
            if answer is None:  # the client left; the replica's work was cancelled
                return Response(status_code=499)
            return json_response(answer[1])
        except Exception as exc:
            return error_response(exc)

    async def _stream(self, api: str, method: str, body, request: Request) -> Response:
        try:
            name = self._pick(body.model, api)
            handle = getattr(self.streams[name], method)
            # Wait for the first chunk before sending headers: a rejected request still gets its status,
            # and a replica that dies before it is replaced by another.
            answer = await unless_disconnected(request, call_with_retry(
                lambda: handle.remote(body), lambda chunks: anext(chunks, None), self.settings.retry,
                f"{api} on {name}", self._replicas(name)))
            if answer is None:
                return Response(status_code=499)
        except Exception as exc:
            return error_response(exc)
        chunks, first = answer
        return EventStream(data_events(first, chunks), chunks)

    # ---- routes ---------------------------------------------------------------------------------
    async def list_models(self) -> Response:
        return json_response(ModelList(data=[info.card for info in self.models.values()]))

    async def embeddings(self, body: EmbeddingRequest, request: Request) -> Response:
        return await self._call("embeddings", "embeddings", body, request)

    async def score(self, body: ScoreRequest, request: Request) -> Response:
        return await self._call("score", "score", body, request)

    async def rerank(self, body: RerankRequest, request: Request) -> Response:
        return await self._call("rerank", "rerank", body, request)

    async def classify(self, body: ClassificationRequest, request: Request) -> Response:
        return await self._call("classify", "classify", body, request)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        if body.stream:
            return await self._stream("completions", "completions_stream", body, request)
        return await self._call("completions", "completions", body, request)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        if self.rag is not None and body.model is not None and body.model == self.settings.rag_chat_model:
            return await rag_chat(self.rag, body)
        if body.stream:
            return await self._stream("chat", "chat_stream", body, request)
        return await self._call("chat", "chat", body, request)

    async def tokenize(self, body: TokenizeRequest, request: Request) -> Response:
        return await self._call("tokenize", "tokenize", body, request)

    async def detokenize(self, body: DetokenizeRequest, request: Request) -> Response:
        return await self._call("detokenize", "detokenize", body, request)

    async def health(self) -> Response:
        """200 while every served model has a replica to take requests. Otherwise 503 naming the models
        without one, e.g. replicas that died and cannot be placed again (Serve's controller log names the
        resources they wait for; `serve status` shows the deployment UNHEALTHY or short of replicas)."""
        missing = [name for name, handle in self.servers.items()
                   if replica_stats.running_replicas(handle.deployment_name) == 0]
        if missing:
            message = f"no replica is running for: {', '.join(missing)}"
            log.warning("/health: %s", message)
            return error_response(APIError(message, 503))
        return Response(status_code=200)

    async def version(self) -> Response:
        return JSONResponse({"version": importlib.metadata.version("servecluster")})

    async def metrics(self) -> Response:
        """Prometheus text for every replica of every model, from the stats Serve pushes to this
        replica's routers (cluster.replica_stats); a model whose router has none yet is asked by handle."""
        snapshots, asked = [], []
        for handle in self.servers.values():
            found = replica_stats.snapshots(handle.deployment_name)
            snapshots += found or []
            if not found:
                asked.append(handle)
        answers = await asyncio.gather(*(h.stats.remote() for h in asked), return_exceptions=True)
        text = render_prometheus(snapshots + [s for s in answers if isinstance(s, dict)])
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


# ---- errors: every failure leaves in the one error shape --------------------------------------
def error_response(exc: BaseException) -> JSONResponse:
    body, headers = to_error(exc)
    return JSONResponse(body.model_dump(), status_code=body.error.code, headers=headers)


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


async def handle_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    body = error_body(str(exc.detail), exc.status_code)
    return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)


async def handle_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400, not FastAPI's 422, naming the offending field(s) as vLLM does."""
    messages, param = [], None
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        if err.get("type") == "json_invalid":
            loc = []
        field = ".".join(loc) or None
        param = param or field
        messages.append(f"{field}: {err['msg']}" if field else err["msg"])
    body = error_body("; ".join(messages) or "Invalid request", 400, param)
    return JSONResponse(body.model_dump(), status_code=400)
