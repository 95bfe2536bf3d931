"""The application builder that serve_config.yaml names in its import_path:

    applications:
      - name: default
        route_prefix: /
        import_path: deployments.builder:build_app
        args: {models: [...], api_key: ..., ...}     # validated as AppArgs

Serve validates `args` into AppArgs (the builder's annotation), so a typo in the config fails
at deploy time. The CLI (deployments.cli) builds the same application for one model.
"""
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from cluster.shapes import ingress_deployment_defaults, model_deployment_defaults, torch_threads
from deployments.ingress import IngressSettings, OpenAIIngress
from deployments.limits import ServingLimits
from deployments.rag import RAGSettings, VectorStoreServer
from deployments.retry import RetryPolicy
from deployments.server import ModelServer
from engine import EngineConfig

KINDS = {"embed": "Embedder", "score": "Reranker", "classify": "Classifier", "generate": "Generator",
         "auto": "ModelServer"}


class ModelArgs(BaseModel):
    """One model deployment: its engine's arguments and its Serve deployment options."""
    model_config = ConfigDict(extra="forbid")
    model: str  # Hugging Face id or local directory
    task: str = "auto"
    served_model_name: str | None = None
    dtype: str = "auto"
    quantization: str | None = None  # decoders: "int8" / "int4" (weight-only), "w8a8" or "fp8"; engine.quantization
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    kv_cache_memory_bytes: int | None = None
    num_threads: int | None = None  # None: the replica's reserved CPUs (cluster.shapes.torch_threads)
    auto_truncate: bool = False  # embed/score/classify: cut over-long inputs to max_model_len, not 400
    engine_kwargs: dict[str, Any] = {}  # any other engine.EngineConfig field
    deployment_config: dict[str, Any] = {}  # @serve.deployment options, over cluster.shapes' defaults

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def deployment_name(self) -> str:
        return deployment_name(self.task, self.served_name)

    def deployment_options(self, max_queued_requests: int) -> dict[str, Any]:
        defaults = {**model_deployment_defaults(self.task), "max_queued_requests": max_queued_requests,
                    "backpressure_config": {"status_code": 503, "retry_after_s": 1}}
        return deployment_options(defaults, self.deployment_config)

    def engine_config(self, ray_actor_options: dict[str, Any]) -> dict[str, Any]:
        """EngineConfig keyword arguments, checked here so a bad value fails at deploy time."""
        fields = self.model_dump(include={"model", "task", "served_model_name", "dtype", "quantization", "max_model_len",
                                          "max_num_batched_tokens", "max_num_seqs", "kv_cache_memory_bytes",
                                          "auto_truncate"},
                                 exclude_none=True)
        kwargs = {**fields, "num_threads": self.num_threads or torch_threads(ray_actor_options), **self.engine_kwargs}
        EngineConfig(**kwargs)
        return kwargs


class RAGArgs(BaseModel):
    """The vector-store deployment (OpenAI Files / Vector Stores / Responses file_search): served
    names of the models it calls by handle, and where its state lives."""
    model_config = ConfigDict(extra="forbid")
    embed_model: str
    generate_model: str
    rerank_model: str | None = None  # a served reranker that ranking_options.ranker may name
    default_ranker: str = "none"  # what ranker "auto" means: "none" or rerank_model
    data_dir: str = "~/.cache/servecluster/rag"  # SQLite metadata, file bytes, FAISS indexes
    max_file_bytes: int = 16 << 20  # larger uploads get 413 (the request body limit applies too)
    ingest_workers: int = 2
    embed_batch_size: int = 64
    context_chars: int = 6000
    rerank_depth: int = 20  # candidates a reranker reorders
    chat_model: str | None = None  # a served name for /v1/chat/completions that answers from chat_vector_stores
    chat_vector_stores: list[str] = []  # vector store ids or names
    deployment_config: dict[str, Any] = {}

    def settings(self) -> RAGSettings:
        if self.default_ranker not in ("none", self.rerank_model):
            raise ValueError(f"rag.default_ranker must be 'none' or rag.rerank_model, got {self.default_ranker!r}")
        fields = self.model_dump(exclude={"embed_model", "deployment_config"})
        return RAGSettings(**{**fields, "data_dir": os.path.expanduser(self.data_dir)})


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[ModelArgs] = Field(min_length=1)
    api_key: str | None = None  # None: the ingress reads SERVECLUSTER_API_KEY; unset too: no key
    allowed_origins: list[str] = []
    max_request_body_bytes: int = 16 << 20
    # Requests a model deployment may queue beyond its max_ongoing_requests before it answers
    # 503 with Retry-After (Ray Serve's max_queued_requests); a model's deployment_config overrides it.
    max_queued_requests: int = 64
    limits: ServingLimits = ServingLimits()  # per-request caps and fair pooling admission, on every model
    retry: RetryPolicy = RetryPolicy()  # the ingress re-runs calls whose replica died before answering
    ingress_deployment_config: dict[str, Any] = {}
    rag: RAGArgs | None = None


# Options whose overrides refine the defaults key by key: a config that sets max_replicas keeps
# the LLM delays and the engine policy; one that sets a router class keeps the stats period.
MERGED_OPTIONS = ("autoscaling_config", "request_router_config")


def deployment_options(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    options = {**defaults, **overrides}
    for key in MERGED_OPTIONS:
        if isinstance(defaults.get(key), dict) and isinstance(overrides.get(key), dict):
            options[key] = {**defaults[key], **overrides[key]}
    if "num_replicas" in overrides and "autoscaling_config" not in overrides:
        options.pop("autoscaling_config", None)  # a fixed replica count replaces the default autoscaling
    return options


def deployment_name(task: str, served_name: str) -> str:
    """The deployment of a model, for serve.get_deployment_handle: e.g. "Embedder:<served name>"."""
    return f"{KINDS.get(task, 'ModelServer')}:{served_name}"


def build_app(args: AppArgs) -> Application:
    servers = {}
    for m in args.models:
        if m.served_name in servers:
            raise ValueError(f"two models are served as {m.served_name!r}; set served_model_name")
        options = m.deployment_options(args.max_queued_requests)
        engine_kwargs = m.engine_config(options.get("ray_actor_options", {}))
        servers[m.served_name] = ModelServer.options(name=m.deployment_name, **options).bind(
            engine_kwargs, args.limits.model_dump())
    rag = None
    if args.rag is not None:
        missing = [n for n in (args.rag.embed_model, args.rag.rerank_model, args.rag.generate_model)
                   if n is not None and n not in servers]
        if missing:
            raise ValueError(f"rag names models that are not served: {', '.join(missing)}")
        # One replica by default: it runs the ingestion; more replicas share data_dir (see the README).
        defaults = {"ray_actor_options": {"num_cpus": 0.1}, "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
        rag = VectorStoreServer.options(**deployment_options(defaults, args.rag.deployment_config)).bind(
            servers[args.rag.embed_model], servers[args.rag.rerank_model] if args.rag.rerank_model else None,
            servers[args.rag.generate_model], args.rag.settings())
    settings = IngressSettings(api_key=args.api_key, allowed_origins=args.allowed_origins,
                               max_request_body_bytes=args.max_request_body_bytes, retry=args.retry,
                               rag_chat_model=args.rag.chat_model if args.rag else None)
    options = deployment_options(ingress_deployment_defaults(), args.ingress_deployment_config)
    return OpenAIIngress.options(**options).bind(servers, rag, settings)
