"""A small vLLM: paged KV cache, prefix caching, continuous batching; no Ray, no HTTP."""
from engine.async_engine import AsyncLLM
from engine.config import EngineConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.loader import ModelNotFoundError
from engine.outputs import (ClassificationOutput, CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput,
                            Logprob, PoolingRequestOutput, RequestOutput, ScoringOutput)
from engine.params import PoolingParams, SamplingParams

__all__ = ["AsyncLLM", "ClassificationOutput", "CompletionOutput", "EmbeddingOutput", "EmbeddingRequestOutput",
           "EngineConfig", "LLM", "LLMEngine", "Logprob", "ModelNotFoundError", "PoolingParams",
           "PoolingRequestOutput", "RequestOutput", "SamplingParams", "ScoringOutput"]
