"""The pooling routes of a model server: embeddings, score, rerank, classify."""
import base64

import numpy as np

from deployments.protocol import (ClassificationData, ClassificationRequest, ClassificationResponse,
                                  EmbeddingRequest, EmbeddingResponse, EmbeddingResponseData, RerankDocument,
                                  RerankRequest, RerankResponse, RerankResult, RerankUsage, ScoreRequest,
                                  ScoreResponse, ScoreResponseData, UsageInfo)
from deployments.limits import Admission
from engine import AsyncLLM, PoolingParams


class PoolingServing:
    def __init__(self, engine: AsyncLLM, name: str, admission: Admission):
        self.engine, self.name, self.admission = engine, name, admission

    async def embeddings(self, req: EmbeddingRequest) -> EmbeddingResponse:
        params = PoolingParams(dimensions=req.dimensions, normalize=req.normalize,
                               truncate_prompt_tokens=req.truncate_prompt_tokens)
        prompts = req.prompts()
        await self.admission.admit(prompts, "input")
        outs = await self.admission.pool(lambda chunk: self.engine.embed(chunk, params), prompts)
        data = [EmbeddingResponseData(index=i, embedding=encode_embedding(o.outputs.data, req.encoding_format))
                for i, o in enumerate(outs)]
        return EmbeddingResponse(model=self.name, data=data, usage=pooling_usage(outs))

    async def score(self, req: ScoreRequest) -> ScoreResponse:
        outs = await self.admission.score_pairs(req.text_1, req.text_2, pooling_params(req), "text_2")
        data = [ScoreResponseData(index=i, score=o.outputs.score) for i, o in enumerate(outs)]
        return ScoreResponse(model=self.name, data=data, usage=pooling_usage(outs))

    async def rerank(self, req: RerankRequest) -> RerankResponse:
        if not req.documents:
            return RerankResponse(model=self.name, usage=RerankUsage(total_tokens=0), results=[])
        outs = await self.admission.score_pairs(req.query, req.documents, pooling_params(req), "documents")
        results = sorted((RerankResult(index=i, document=RerankDocument(text=req.documents[i]),
                                       relevance_score=o.outputs.score) for i, o in enumerate(outs)),
                         key=lambda r: r.relevance_score, reverse=True)
        top_n = req.top_n if req.top_n > 0 else len(results)
        return RerankResponse(model=self.name, usage=RerankUsage(total_tokens=pooling_usage(outs).total_tokens),
                              results=results[:top_n])

    async def classify(self, req: ClassificationRequest) -> ClassificationResponse:
        prompts = [req.input] if isinstance(req.input, str) else req.input
        await self.admission.admit(prompts, "input")
        outs = await self.admission.pool(lambda chunk: self.engine.classify(chunk, pooling_params(req)), prompts)
        data = []
        for i, o in enumerate(outs):
            probs = o.outputs.probs
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append(ClassificationData(index=i, label=self.engine.id2label.get(best), probs=probs,
                                           num_classes=len(probs)))
        return ClassificationResponse(model=self.name, data=data, usage=pooling_usage(outs))


def pooling_params(req: ScoreRequest | RerankRequest | ClassificationRequest) -> PoolingParams:
    return PoolingParams(activation=req.activation is not False, truncate_prompt_tokens=req.truncate_prompt_tokens)


def pooling_usage(outs) -> UsageInfo:
    n = sum(len(o.prompt_token_ids) for o in outs)
    return UsageInfo(prompt_tokens=n, total_tokens=n)


def encode_embedding(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """base64 is little-endian float32 bytes, what the openai client decodes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode()
    return vector.tolist()
