"""The model-server deployment: one replica hosts one AsyncLLM (Ray Serve LLM's thin LLMServer shape).

One class serves every replica kind; the engine's task decides which methods answer (see
protocol.API_TASKS) and the builder names each deployment by its kind (Embedder, Reranker,
Classifier, Generator). Handle callers get the same pydantic objects the HTTP routes send
(usage: the deployments package docstring). Each route's work lives in one serving module:
serving_pooling, serving_generation (streams as engine deltas), serving_tokenization.
"""
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from deployments.errors import APIError
from deployments.limits import Admission, ServingLimits
from deployments.protocol import (
    API_NAMES, API_TASKS, ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamResponse,
    ClassificationRequest, ClassificationResponse, CompletionRequest, CompletionResponse, CompletionStreamResponse,
    DetokenizeRequest, DetokenizeResponse, EmbeddingRequest, EmbeddingResponse, ModelCard, ModelInfo,
    ModelPermission, RerankRequest, RerankResponse, ScoreRequest, ScoreResponse, TokenizeRequest, TokenizeResponse)
from deployments.serving_generation import GenerationServing
from deployments.serving_pooling import PoolingServing
from deployments.serving_tokenization import TokenizationServing
from engine import AsyncLLM, EngineConfig


@serve.deployment  # options: cluster.shapes.model_deployment_defaults, overridden per model by the config
class ModelServer:
    def __init__(self, engine_kwargs: dict[str, Any], limits: dict[str, Any] | None = None):
        self.engine = AsyncLLM(EngineConfig(**engine_kwargs))
        self.limits = ServingLimits(**(limits or {}))
        config = self.engine.config
        self.name = config.served_name
        self.card = ModelCard(id=self.name, root=config.model, max_model_len=self.engine.max_model_len,
                              permission=[ModelPermission()])
        admission = Admission(self.engine, self.limits)
        self.pooling = PoolingServing(self.engine, self.name, admission)
        self.generation = GenerationServing(self.engine, self.name, admission)
        self.tokenization = TokenizationServing(self.engine)

    # ---- model facts, health and stats ----------------------------------------------------------
    def describe(self) -> ModelInfo:
        return ModelInfo(card=self.card, task=self.engine.task)

    def stats(self) -> dict:
        """The engine's counters, named for /metrics (see deployments.metrics)."""
        replica = serve.get_replica_context().replica_id.unique_id
        return {**self.engine.stats(), "model_name": self.name, "replica": replica}

    def record_routing_stats(self) -> dict:
        """Serve polls this into every handle's router: the prefix router reads KV usage from it and
        the ingress renders all replicas' /metrics from it (cluster.replica_stats)."""
        return self.stats()

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica. A dead actor fails
        by itself; this also catches an engine thread that died or stopped making progress."""
        stalled = self.engine.stalled_for()
        if stalled > self.limits.engine_stall_timeout_s:
            raise RuntimeError(f"the engine loop of {self.name} has made no progress for {stalled:.0f} s "
                               f"with work pending (engine_stall_timeout_s={self.limits.engine_stall_timeout_s})")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this on each replica; cluster.autoscaling.EnginePressurePolicy reads it."""
        stats = self.engine.stats()
        return {"kv_cache_usage": float(stats["kv_cache_usage"]), "num_waiting": float(stats["num_waiting"])}

    def _require(self, api: str) -> None:
        if self.engine.task not in API_TASKS[api]:
            raise APIError(f"The model `{self.name}` does not support the {API_NAMES[api]}: "
                           f"it serves task {self.engine.task!r}", 400, "model")

    # ---- routes ---------------------------------------------------------------------------------
    async def embeddings(self, req: EmbeddingRequest) -> EmbeddingResponse:
        self._require("embeddings")
        return await self.pooling.embeddings(req)

    async def score(self, req: ScoreRequest) -> ScoreResponse:
        self._require("score")
        return await self.pooling.score(req)

    async def rerank(self, req: RerankRequest) -> RerankResponse:
        self._require("rerank")
        return await self.pooling.rerank(req)

    async def classify(self, req: ClassificationRequest) -> ClassificationResponse:
        self._require("classify")
        return await self.pooling.classify(req)

    async def completions(self, req: CompletionRequest) -> CompletionResponse:
        self._require("completions")
        return await self.generation.completions(req)

    async def completions_stream(self, req: CompletionRequest) -> AsyncIterator[CompletionStreamResponse]:
        self._require("completions")
        async for chunk in self.generation.completions_stream(req):
            yield chunk

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        self._require("chat")
        return await self.generation.chat(req)

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[ChatCompletionStreamResponse]:
        self._require("chat")
        async for chunk in self.generation.chat_stream(req):
            yield chunk

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        return await self.tokenization.tokenize(req)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        return self.tokenization.detokenize(req)
