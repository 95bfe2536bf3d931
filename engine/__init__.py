"""A small vLLM: paged KV cache, prefix caching, continuous batching; no Ray, no HTTP.

The names below load on first use, so a process that needs only a torch-free part (the HTTP ingress takes
engine.heap) does not import torch and transformers with the package."""
import importlib

_MODULES = {
    "AsyncLLM": "engine.async_engine", "EngineConfig": "engine.config", "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine", "ModelNotFoundError": "engine.loader", "PoolingParams": "engine.params",
    "SamplingParams": "engine.params",
    **dict.fromkeys(["ClassificationOutput", "CompletionOutput", "EmbeddingOutput", "EmbeddingRequestOutput",
                     "Logprob", "PoolingRequestOutput", "RequestOutput", "ScoringOutput"], "engine.outputs"),
}

__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)
