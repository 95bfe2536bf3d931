"""A composed RAG deployment: embed -> FAISS retrieval -> rerank -> generate, calling the three
model deployments by handle with the same protocol objects the HTTP routes use.

The index is FAISS IndexFlatIP over L2-normalized embeddings (inner product = cosine). It
lives in this replica's memory, so the deployment runs exactly one replica and the index is
lost on restart; documents come in through `add_documents` (POST /v1/rag/documents).
"""
import asyncio

import faiss
import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.errors import APIError
from deployments.protocol import (
    ChatCompletionRequest, ChatMessageParam, EmbeddingRequest, RAGDocument, RAGDocumentsRequest,
    RAGDocumentsResponse, RAGQueryRequest, RAGQueryResponse, RerankRequest, UsageInfo)

SYSTEM_PROMPT = ("Answer the question using only the numbered context passages. "
                 "If they do not contain the answer, say you do not know.")


@serve.deployment
class RAGPipeline:
    def __init__(self, embedder: DeploymentHandle, reranker: DeploymentHandle | None, generator: DeploymentHandle):
        self.embedder, self.reranker, self.generator = embedder, reranker, generator
        self.index: faiss.IndexFlatIP | None = None  # made at the first add, when the dimension is known
        self.texts: list[str] = []
        self.lock = asyncio.Lock()  # adds are read-modify-write of index and texts

    async def _embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        # Long documents are truncated to the embedder's limit instead of rejected.
        resp = await self.embedder.embeddings.remote(EmbeddingRequest(input=texts, truncate_prompt_tokens=-1))
        vectors = np.array([d.embedding for d in resp.data], dtype=np.float32)
        faiss.normalize_L2(vectors)
        return vectors, resp.usage.prompt_tokens

    async def add_documents(self, req: RAGDocumentsRequest) -> RAGDocumentsResponse:
        vectors, _ = await self._embed(req.documents)
        async with self.lock:
            if self.index is None:
                self.index = faiss.IndexFlatIP(vectors.shape[1])
            start = len(self.texts)
            self.index.add(vectors)
            self.texts.extend(req.documents)
            return RAGDocumentsResponse(ids=list(range(start, len(self.texts))), count=len(self.texts))

    async def query(self, req: RAGQueryRequest) -> RAGQueryResponse:
        if not self.texts:
            raise APIError("The RAG index is empty: add documents first (POST /v1/rag/documents)", 400)
        vector, prompt_tokens = await self._embed([req.query])
        scores, ids = self.index.search(vector, min(req.top_k, len(self.texts)))
        retrieved = [RAGDocument(id=int(i), text=self.texts[i], score=float(s))
                     for s, i in zip(scores[0], ids[0]) if i >= 0]
        reranked = retrieved[:req.top_n]
        if self.reranker is not None:
            resp = await self.reranker.rerank.remote(RerankRequest(
                query=req.query, documents=[d.text for d in retrieved], top_n=req.top_n, truncate_prompt_tokens=-1))
            reranked = [RAGDocument(id=retrieved[r.index].id, text=retrieved[r.index].text, score=r.relevance_score)
                        for r in resp.results]
            prompt_tokens += resp.usage.total_tokens
        context = "\n\n".join(f"[{k + 1}] {d.text}" for k, d in enumerate(reranked))
        chat = await self.generator.chat.remote(ChatCompletionRequest(
            messages=[ChatMessageParam(role="system", content=SYSTEM_PROMPT),
                      ChatMessageParam(role="user", content=f"Context:\n{context}\n\nQuestion: {req.query}")],
            max_tokens=req.max_tokens, temperature=req.temperature))
        usage = UsageInfo(prompt_tokens=prompt_tokens + chat.usage.prompt_tokens,
                          completion_tokens=chat.usage.completion_tokens)
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return RAGQueryResponse(query=req.query, retrieved=retrieved, reranked=reranked,
                                answer=chat.choices[0].message.content or "", usage=usage)
