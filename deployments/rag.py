"""The vector-store deployment: serves the rag/ library (OpenAI Files, Vector Stores, search) and
answers Responses `file_search` requests and the RAG chat model, calling the embedding, reranker
and generator deployments by handle.

State lives under `data_dir` (rag.store: SQLite + file bytes + FAISS index files), so a replica
that restarts finds every completed file searchable and resumes the ingestion a dead replica
left in_progress (rag.ingest.Ingester.recover). Methods return OpenAI's objects as dicts; an
unknown id is a 404 APIError, a bad field a 400 naming it.
"""
import asyncio
import base64
import contextlib
import functools
import inspect
import logging
import re
from collections.abc import AsyncIterator

import numpy as np
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle
from transformers import AutoTokenizer

from deployments.errors import APIError
from deployments.protocol import ChatCompletionRequest, EmbeddingRequest, RerankRequest, now, random_id
from deployments.rag_protocol import (
    FileBatchCreateRequest, RankingOptions, ResponsesRequest, VectorStoreCreateRequest, VectorStoreFileCreateRequest,
    VectorStoreSearchRequest, VectorStoreUpdateRequest)
from engine.heap import freeze_heap
from engine.loader import resolve_model
from rag import Ingester, NotFoundError, StoredResponses, VectorStores
from rag.chunking import max_chunk_tokens

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = ("Answer the question using only the numbered sources below, citing them like [1]. "
                 "If the sources do not contain the answer, say you do not know.")
DEFAULT_RANKERS = ("auto", "default-2024-11-15")
CITATION = re.compile(r"\[(\d{1,2})\]")


class RAGSettings(BaseModel):
    data_dir: str
    generate_model: str  # served names, for `model` in requests and responses
    rerank_model: str | None = None
    default_ranker: str = "none"  # what ranker "auto" means: "none" or rerank_model
    max_file_bytes: int = 16 << 20
    ingest_workers: int = 2
    embed_batch_size: int = 64  # chunks per embedding request during ingestion
    context_chars: int = 6000  # retrieved text put in a prompt, at most (the generator's context is finite)
    rerank_depth: int = 20  # candidates the reranker reorders (at least max_num_results, at most 50)
    chat_model: str | None = None  # a served name whose chat completions answer from chat_vector_stores
    chat_vector_stores: list[str] = []  # vector store ids or names


def api_errors(method):
    """The library's NotFoundError becomes a 404 APIError (which crosses Ray intact), from a method or
    from a streaming method (an async generator) at whichever event it happens."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, *args, **kwargs):
            try:
                async with contextlib.aclosing(method(self, *args, **kwargs)) as events:
                    async for item in events:
                        yield item
            except NotFoundError as exc:
                raise APIError(exc.message, 404, exc.param) from None
        return stream

    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except NotFoundError as exc:
            raise APIError(exc.message, 404, exc.param) from None
    return wrapper


@serve.deployment
class VectorStoreServer:
    async def __init__(self, embedder: DeploymentHandle, reranker: DeploymentHandle | None,
                       generator: DeploymentHandle, settings: RAGSettings):
        # What this process imported (Ray, torch, transformers: ~500k objects, a full collection ~270 ms here),
        # frozen before the stores are built: their FAISS indexes are replaced while serving, and what is
        # frozen is never collected.
        freeze_heap()
        self.embedder, self.reranker, self.generator, self.settings = embedder, reranker, generator, settings
        self.generator_stream = generator.options(stream=True)
        info = await embedder.describe.remote()
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, resolve_model(info.card.root))
        self.stores = VectorStores(settings.data_dir, tokenizer, max_chunk_tokens(tokenizer, info.card.max_model_len))
        self.stored_responses = StoredResponses(self.stores)
        self.ingester = Ingester(self.stores, self._embed, settings.ingest_workers, settings.embed_batch_size)
        resumed = self.ingester.recover()
        if resumed:
            logger.info("resuming ingestion of %d files left in_progress", resumed)
        self.flusher = asyncio.ensure_future(self._flush_every(2.0))

    async def _flush_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await asyncio.to_thread(self.stores.flush)
            except Exception:
                logger.exception("writing FAISS index files failed; SQLite still has every chunk")

    async def _embed(self, texts: list[str]) -> np.ndarray:
        # base64: float32 bytes, not a JSON-shaped list of Python floats (256 vectors: ~4 against ~20 ms to build
        # and pass)
        resp = await self.embedder.embeddings.remote(EmbeddingRequest(input=texts, truncate_prompt_tokens=-1,
                                                                      encoding_format="base64"))
        vectors = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in resp.data])
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def _enqueue(self, vs_id: str) -> None:
        for pending_vs, file_id in self.stores.pending():
            if pending_vs == vs_id:
                self.ingester.submit(vs_id, file_id)

    # ---- files ----------------------------------------------------------------------------------
    @api_errors
    async def create_file(self, filename: str, purpose: str, data: bytes) -> dict:
        if len(data) > self.settings.max_file_bytes:
            raise APIError(f"file: {len(data)} bytes is over the limit of {self.settings.max_file_bytes}", 413, "file")
        return await asyncio.to_thread(self.stores.create_file, filename, purpose, data)

    @api_errors
    async def list_files(self, purpose: str | None, limit: int, order: str, after: str | None) -> dict:
        return self.stores.list_files(purpose, limit, order, after)

    @api_errors
    async def get_file(self, file_id: str) -> dict:
        return self.stores.get_file(file_id)

    @api_errors
    async def delete_file(self, file_id: str) -> dict:
        return await asyncio.to_thread(self.stores.delete_file, file_id)

    @api_errors
    async def file_content(self, file_id: str) -> tuple[str, bytes]:
        return await asyncio.to_thread(self.stores.file_content, file_id)

    # ---- vector stores --------------------------------------------------------------------------
    @api_errors
    async def create_store(self, req: VectorStoreCreateRequest) -> dict:
        store = self.stores.create_store(req.name, req.metadata, req.expires_after, req.index_type, req.file_ids,
                                         req.chunking_strategy)
        self._enqueue(store["id"])
        return store

    @api_errors
    async def list_stores(self, limit: int, order: str, after: str | None, before: str | None) -> dict:
        return self.stores.list_stores(limit, order, after, before)

    @api_errors
    async def get_store(self, vs_id: str) -> dict:
        return self.stores.get_store(vs_id)

    @api_errors
    async def update_store(self, vs_id: str, req: VectorStoreUpdateRequest) -> dict:
        return self.stores.update_store(vs_id, req.name, req.metadata, req.expires_after)

    @api_errors
    async def delete_store(self, vs_id: str) -> dict:
        return await asyncio.to_thread(self.stores.delete_store, vs_id)

    @api_errors
    async def attach_file(self, vs_id: str, req: VectorStoreFileCreateRequest) -> dict:
        store_file = self.stores.attach_file(vs_id, req.file_id, req.attributes, req.chunking_strategy)
        self.ingester.submit(vs_id, req.file_id)
        return store_file

    @api_errors
    async def list_store_files(self, vs_id: str, status: str | None, limit: int, order: str, after: str | None,
                               before: str | None) -> dict:
        return self.stores.list_store_files(vs_id, status, limit, order, after, before)

    @api_errors
    async def get_store_file(self, vs_id: str, file_id: str) -> dict:
        return self.stores.get_store_file(vs_id, file_id)

    @api_errors
    async def update_store_file(self, vs_id: str, file_id: str, attributes: dict | None) -> dict:
        return self.stores.update_store_file(vs_id, file_id, attributes)

    @api_errors
    async def detach_file(self, vs_id: str, file_id: str) -> dict:
        return await asyncio.to_thread(self.stores.detach_file, vs_id, file_id)

    @api_errors
    async def store_file_content(self, vs_id: str, file_id: str) -> dict:
        return await asyncio.to_thread(self.stores.store_file_content, vs_id, file_id)

    @api_errors
    async def create_batch(self, vs_id: str, req: FileBatchCreateRequest) -> dict:
        batch = await asyncio.to_thread(self.stores.create_batch, vs_id, req.file_ids, req.files, req.attributes,
                                        req.chunking_strategy)
        self._enqueue(vs_id)
        return batch

    @api_errors
    async def get_batch(self, vs_id: str, batch_id: str) -> dict:
        return self.stores.get_batch(vs_id, batch_id)

    @api_errors
    async def cancel_batch(self, vs_id: str, batch_id: str) -> dict:
        return self.stores.cancel_batch(vs_id, batch_id)

    @api_errors
    async def list_batch_files(self, vs_id: str, batch_id: str, status: str | None, limit: int, order: str,
                               after: str | None, before: str | None) -> dict:
        return self.stores.list_batch_files(vs_id, batch_id, status=status, limit=limit, order=order, after=after,
                                            before=before)

    # ---- search ---------------------------------------------------------------------------------
    @api_errors
    async def search(self, vs_id: str, req: VectorStoreSearchRequest) -> dict:
        data = await self._retrieve([vs_id], req.queries(), req.max_num_results, req.filters, req.ranking_options)
        return {"object": "vector_store.search_results.page", "search_query": req.queries(), "data": data,
                "has_more": False, "next_page": None}

    def _use_reranker(self, ranking: RankingOptions | None) -> bool:
        name = ranking.ranker if ranking is not None else "auto"
        if name in DEFAULT_RANKERS:
            name = self.settings.default_ranker
        if name == "none":
            return False
        if self.reranker is None or name != self.settings.rerank_model:
            names = ", ".join(["none", *DEFAULT_RANKERS, *([self.settings.rerank_model] if self.reranker else [])])
            raise APIError(f"ranking_options.ranker: must be one of {names}, got {name!r}", 400,
                           "ranking_options.ranker")
        return True

    async def _retrieve(self, vs_ids: list[str], queries: list[str], k: int, filters: dict | None,
                        ranking: RankingOptions | None) -> list[dict]:
        """The k best chunks over the stores: filtered before the top-k, reranked if asked."""
        rerank = self._use_reranker(ranking)
        threshold = ranking.score_threshold if ranking is not None else 0.0
        for vs_id in vs_ids:
            self.stores.get_store(vs_id)  # 404 before any work
        vectors = await self._embed(queries)
        fetch = min(50, max(k, self.settings.rerank_depth)) if rerank else k
        hits = []
        for vs_id in vs_ids:
            hits += await asyncio.to_thread(self.stores.search, vs_id, vectors, fetch, filters)
        hits = sorted(hits, key=lambda h: -h["score"])[:fetch]
        if rerank and hits:
            resp = await self.reranker.rerank.remote(RerankRequest(
                query=" ".join(queries), documents=[h["content"][0]["text"] for h in hits], truncate_prompt_tokens=-1))
            hits = [{**hits[r.index], "score": min(1.0, max(0.0, r.relevance_score))} for r in resp.results]
        return [h for h in hits if h["score"] >= threshold][:k]

    # ---- answers --------------------------------------------------------------------------------
    def _prompt(self, system: str | None, messages: list[dict], hits: list[dict]) -> tuple[list[dict], list[dict]]:
        """Chat messages with the sources in the system message, and the sources that fit."""
        used, sources, size = [], [], 0
        for hit in hits:
            text = hit["content"][0]["text"]
            if used and size + len(text) > self.settings.context_chars:
                break
            size += len(text)
            used.append(hit)
            sources.append(f"[{len(used)}] ({hit['filename']}) {text}")
        parts = [p for p in (system, SYSTEM_PROMPT if hits else None) if p]
        if sources:
            parts.append("Sources:\n" + "\n\n".join(sources))
        rest = [m for m in messages if m["role"] != "system"]
        system_text = "\n\n".join([m["content"] for m in messages if m["role"] == "system"] + parts)
        return ([{"role": "system", "content": system_text}] if system_text else []) + rest, used

    def _chat_request(self, req: ResponsesRequest, messages: list[dict], stream: bool) -> ChatCompletionRequest:
        return ChatCompletionRequest(model=self.settings.generate_model, messages=messages, stream=stream,
                                     max_tokens=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p,
                                     stream_options={"include_usage": True} if stream else None)

    def _check_model(self, model: str) -> None:
        if model != self.settings.generate_model:
            raise APIError(f"model: the Responses API is served by `{self.settings.generate_model}`, got `{model}`",
                           404, "model")

    def _history(self, req: ResponsesRequest) -> list[dict]:
        """The conversation of `previous_response_id` (404 naming it if unknown), else none."""
        return self.stored_responses.conversation(req.previous_response_id) if req.previous_response_id else []

    async def _store(self, req: ResponsesRequest, response: dict, history: list[dict], text: str) -> None:
        if req.store:
            conversation = history + req.messages() + [{"role": "assistant", "content": text}]
            await asyncio.to_thread(self.stored_responses.save, response, conversation)

    @api_errors
    async def get_response(self, response_id: str) -> dict:
        return await asyncio.to_thread(self.stored_responses.get, response_id)

    @api_errors
    async def delete_response(self, response_id: str) -> dict:
        return await asyncio.to_thread(self.stored_responses.delete, response_id)

    @api_errors
    async def responses(self, req: ResponsesRequest) -> dict:
        self._check_model(req.model)
        history = self._history(req)
        tool = req.file_search()
        call, hits = None, []
        if tool is not None:
            hits = await self._retrieve(tool.vector_store_ids, [req.user_text()], tool.max_num_results, tool.filters,
                                        tool.ranking_options)
            call = file_search_call(random_id("fs"), req.user_text(), hits, req.include, "completed")
        messages, used = self._prompt(req.instructions, history + req.messages(), hits)
        chat = await self.generator.chat.remote(self._chat_request(req, messages, stream=False))
        choice = chat.choices[0]
        text = choice.message.content or ""
        message = output_message(random_id("msg"), text, citations(text, used), "completed")
        usage = {"input_tokens": chat.usage.prompt_tokens, "output_tokens": chat.usage.completion_tokens or 0}
        response = response_object(req, random_id("resp"), [o for o in (call, message) if o], usage,
                                   "incomplete" if choice.finish_reason == "length" else "completed")
        await self._store(req, response, history, text)
        return response

    @api_errors
    async def responses_stream(self, req: ResponsesRequest) -> AsyncIterator[dict]:
        """Responses streaming events, in OpenAI's order, each with its sequence_number."""
        self._check_model(req.model)  # errors found before the first event get their HTTP status
        history = self._history(req)
        tool, hits = req.file_search(), []
        if tool is not None:
            self._use_reranker(tool.ranking_options)
            for vs_id in tool.vector_store_ids:
                try:
                    self.stores.get_store(vs_id)
                except NotFoundError as exc:
                    raise APIError(exc.message, 404, "tools[0].vector_store_ids") from None
        rid, seq = random_id("resp"), iter(range(1 << 30))
        output: list[dict] = []

        def event(kind: str, **fields) -> dict:
            return {"type": kind, "sequence_number": next(seq), **fields}

        yield event("response.created", response=response_object(req, rid, [], None, "in_progress"))
        yield event("response.in_progress", response=response_object(req, rid, [], None, "in_progress"))
        if tool is not None:
            call_id, query = random_id("fs"), req.user_text()
            yield event("response.output_item.added", output_index=0,
                        item=file_search_call(call_id, query, [], req.include, "in_progress"))
            yield event("response.file_search_call.in_progress", output_index=0, item_id=call_id)
            yield event("response.file_search_call.searching", output_index=0, item_id=call_id)
            hits = await self._retrieve(tool.vector_store_ids, [query], tool.max_num_results, tool.filters,
                                        tool.ranking_options)
            yield event("response.file_search_call.completed", output_index=0, item_id=call_id)
            output.append(file_search_call(call_id, query, hits, req.include, "completed"))
            yield event("response.output_item.done", output_index=0, item=output[-1])
        messages, used = self._prompt(req.instructions, history + req.messages(), hits)
        index, msg_id, text, usage, finish = len(output), random_id("msg"), "", None, None
        yield event("response.output_item.added", output_index=index,
                    item=output_message(msg_id, "", [], "in_progress"))
        yield event("response.content_part.added", output_index=index, item_id=msg_id, content_index=0,
                    part=output_text("", []))
        async for chunk in self.generator_stream.chat_stream.remote(self._chat_request(req, messages, stream=True)):
            if chunk.usage is not None:
                usage = {"input_tokens": chunk.usage.prompt_tokens, "output_tokens": chunk.usage.completion_tokens or 0}
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                if choice.delta.content:
                    text += choice.delta.content
                    yield event("response.output_text.delta", output_index=index, item_id=msg_id, content_index=0,
                                delta=choice.delta.content, logprobs=[])
        annotations = citations(text, used)
        yield event("response.output_text.done", output_index=index, item_id=msg_id, content_index=0, text=text,
                    logprobs=[])
        for k, annotation in enumerate(annotations):
            yield event("response.output_text.annotation.added", output_index=index, item_id=msg_id,
                        content_index=0, annotation_index=k, annotation=annotation)
        yield event("response.content_part.done", output_index=index, item_id=msg_id, content_index=0,
                    part=output_text(text, annotations))
        output.append(output_message(msg_id, text, annotations, "completed"))
        yield event("response.output_item.done", output_index=index, item=output[-1])
        status = "incomplete" if finish == "length" else "completed"
        response = response_object(req, rid, output, usage, status)
        await self._store(req, response, history, text)  # before the last event: a client may fetch it next
        yield event(f"response.{status}", response=response)

    # ---- the RAG chat model ---------------------------------------------------------------------
    @api_errors
    async def chat(self, req: ChatCompletionRequest) -> dict:
        """A chat completion from the generator with sources from the bound vector stores; the
        sources come back in the extra field `sources` (search results)."""
        body, used = await self._chat_with_sources(req)
        resp = (await self.generator.chat.remote(body)).model_dump()
        return {**resp, "model": self.settings.chat_model, "sources": used}

    @api_errors
    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[dict]:
        """chat.completion.chunk dicts; the first one carries the extra field `sources`, so a
        client can show them before the answer arrives."""
        body, used = await self._chat_with_sources(req)
        sources = {"sources": used}
        async for chunk in self.generator_stream.chat_stream.remote(body):
            yield {**chunk.model_dump(mode="json"), "model": self.settings.chat_model, **sources}
            sources = {}

    async def _chat_with_sources(self, req: ChatCompletionRequest) -> tuple[ChatCompletionRequest, list[dict]]:
        """The generator's request, its system message holding the bound stores' best chunks for
        the last user message, and those chunks."""
        vs_ids = self._bound_stores()
        messages = [m.template_dict() for m in req.messages]
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users or not isinstance(users[-1], str) or not users[-1].strip():
            raise APIError("messages: needs a user message with text", 400, "messages")
        hits = await self._retrieve(vs_ids, [users[-1]], 5, None, None) if vs_ids else []
        prompt, used = self._prompt(None, messages, hits)
        body = ChatCompletionRequest.model_validate({**req.model_dump(exclude_none=True),
                                                     "model": self.settings.generate_model, "messages": prompt})
        return body, used

    def _bound_stores(self) -> list[str]:
        stores = self.stores.list_stores(limit=100)["data"]
        by_name = {s["name"]: s["id"] for s in stores}
        ids = {s["id"] for s in stores}
        return [ref if ref in ids else by_name[ref] for ref in self.settings.chat_vector_stores
                if ref in ids or ref in by_name]


# ---- OpenAI Responses objects -------------------------------------------------------------------
def file_search_call(call_id: str, query: str, hits: list[dict], include: list[str], status: str) -> dict:
    results = None
    if "file_search_call.results" in include and status == "completed":
        results = [{"file_id": h["file_id"], "filename": h["filename"], "score": h["score"],
                    "attributes": h["attributes"], "text": h["content"][0]["text"]} for h in hits]
    return {"id": call_id, "type": "file_search_call", "status": status, "queries": [query], "results": results}


def output_text(text: str, annotations: list[dict]) -> dict:
    return {"type": "output_text", "text": text, "annotations": annotations, "logprobs": []}


def output_message(msg_id: str, text: str, annotations: list[dict], status: str) -> dict:
    return {"id": msg_id, "type": "message", "role": "assistant", "status": status,
            "content": [output_text(text, annotations)] if status == "completed" else []}


def citations(text: str, used: list[dict]) -> list[dict]:
    """file_citation annotations: one at each [n] the answer wrote for source n; if it wrote none,
    one per cited file at the end of the text (the answer came from these sources)."""
    def cite(hit: dict, index: int) -> dict:
        return {"type": "file_citation", "file_id": hit["file_id"], "filename": hit["filename"], "index": index}

    marked = [cite(used[int(m.group(1)) - 1], m.start()) for m in CITATION.finditer(text)
              if 1 <= int(m.group(1)) <= len(used)]
    if marked:
        return marked
    files = {h["file_id"]: h for h in used}
    return [cite(h, len(text)) for h in files.values()]


def response_object(req: ResponsesRequest, rid: str, output: list[dict], usage: dict | None, status: str) -> dict:
    if usage is not None:
        usage = {"input_tokens": usage["input_tokens"], "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": usage["output_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": usage["input_tokens"] + usage["output_tokens"]}
    return {"id": rid, "object": "response", "created_at": now(), "status": status, "model": req.model,
            "output": output, "instructions": req.instructions, "tools": req.tools, "tool_choice": req.tool_choice,
            "parallel_tool_calls": req.parallel_tool_calls, "temperature": req.temperature, "top_p": req.top_p,
            "max_output_tokens": req.max_output_tokens, "metadata": req.metadata or {}, "usage": usage,
            "error": None, "previous_response_id": req.previous_response_id, "store": req.store,
            "text": {"format": {"type": "text"}}, "truncation": "disabled",
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None}
