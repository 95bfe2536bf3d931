"""OpenAI's Files, Vector Stores and Responses routes, as a FastAPI router the ingress includes
when `rag` is configured (it imports no engine, tokenizer or FAISS code: the ingress stays light). Each route forwards to the vector-store deployment (deployments.rag)
by handle and answers its dict as JSON, errors in the API's one shape (deployments.errors).

    /v1/files                                  POST (multipart: file, purpose), GET
    /v1/files/{file_id}                        GET, DELETE;  /content: GET (the bytes)
    /v1/vector_stores                          POST, GET
    /v1/vector_stores/{vs}                     GET, POST (update), DELETE
    /v1/vector_stores/{vs}/files               POST (attach), GET (?filter=status)
    /v1/vector_stores/{vs}/files/{file_id}     GET, POST (attributes), DELETE;  /content: GET
    /v1/vector_stores/{vs}/file_batches        POST;  /{batch}: GET;  /{batch}/cancel: POST;  /{batch}/files: GET
    /v1/vector_stores/{vs}/search              POST
    /v1/responses                              POST (tools=[file_search]; SSE with stream)
    /v1/responses/{response_id}                GET, DELETE (stored responses)

The OpenAI-Beta header and unknown body fields are ignored. Store files and batches that are
still in_progress carry `openai-poll-after-ms`, so the SDK's *_and_poll helpers poll quickly.
"""
import json
import mimetypes
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.responses import JSONResponse, Response

from deployments.errors import to_error
from deployments.protocol import ChatCompletionRequest
from deployments.rag_protocol import (
    POLL_AFTER_MS, FileBatchCreateRequest, ResponsesRequest, VectorStoreCreateRequest, VectorStoreFileCreateRequest,
    VectorStoreFileUpdateRequest, VectorStoreSearchRequest, VectorStoreUpdateRequest)
from deployments.sse import EventStream, data_events

Order = Literal["asc", "desc"]
Status = Literal["in_progress", "completed", "failed", "cancelled"]


def error_json(exc: BaseException) -> JSONResponse:
    body, headers = to_error(exc)
    return JSONResponse(body.model_dump(), status_code=body.error.code, headers=headers)


async def answer(call) -> Response:
    """JSON of a deployment call's dict; an in_progress object asks pollers to come back soon."""
    try:
        obj = await call
    except Exception as exc:
        return error_json(exc)
    headers = {"openai-poll-after-ms": str(POLL_AFTER_MS)} if obj.get("status") == "in_progress" else None
    return JSONResponse(obj, headers=headers)


async def rag_chat(rag: DeploymentHandle, body: ChatCompletionRequest) -> Response:
    """The RAG chat model's /v1/chat/completions (the ingress calls this for its served name)."""
    if not body.stream:
        return await answer(rag.chat.remote(body))
    try:
        chunks: DeploymentResponseGenerator = rag.options(stream=True).chat_stream.remote(body)
        first = await anext(chunks)  # before the headers: a rejected request keeps its status
    except Exception as exc:
        return error_json(exc)
    return EventStream(data_events(first, chunks), chunks)


def rag_router(rag: DeploymentHandle) -> APIRouter:
    router = APIRouter()
    stream = rag.options(stream=True)

    # ---- files ----------------------------------------------------------------------------------
    @router.post("/v1/files")
    async def create_file(file: UploadFile = File(...), purpose: str = Form(...)) -> Response:
        return await answer(rag.create_file.remote(file.filename or "", purpose, await file.read()))

    @router.get("/v1/files")
    async def list_files(purpose: str | None = None, limit: int = Query(10000), order: Order = "desc",
                         after: str | None = None) -> Response:
        return await answer(rag.list_files.remote(purpose, limit, order, after))

    @router.get("/v1/files/{file_id}")
    async def get_file(file_id: str) -> Response:
        return await answer(rag.get_file.remote(file_id))

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> Response:
        return await answer(rag.delete_file.remote(file_id))

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        try:
            filename, data = await rag.file_content.remote(file_id)
        except Exception as exc:
            return error_json(exc)
        media_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        return Response(data, media_type=media_type)

    # ---- vector stores --------------------------------------------------------------------------
    @router.post("/v1/vector_stores")
    async def create_store(body: VectorStoreCreateRequest) -> Response:
        return await answer(rag.create_store.remote(body))

    @router.get("/v1/vector_stores")
    async def list_stores(limit: int = 20, order: Order = "desc", after: str | None = None,
                          before: str | None = None) -> Response:
        return await answer(rag.list_stores.remote(limit, order, after, before))

    @router.get("/v1/vector_stores/{vs_id}")
    async def get_store(vs_id: str) -> Response:
        return await answer(rag.get_store.remote(vs_id))

    @router.post("/v1/vector_stores/{vs_id}")
    async def update_store(vs_id: str, body: VectorStoreUpdateRequest) -> Response:
        return await answer(rag.update_store.remote(vs_id, body))

    @router.delete("/v1/vector_stores/{vs_id}")
    async def delete_store(vs_id: str) -> Response:
        return await answer(rag.delete_store.remote(vs_id))

    # ---- files in a store -----------------------------------------------------------------------
    @router.post("/v1/vector_stores/{vs_id}/files")
    async def attach_file(vs_id: str, body: VectorStoreFileCreateRequest) -> Response:
        return await answer(rag.attach_file.remote(vs_id, body))

    @router.get("/v1/vector_stores/{vs_id}/files")
    async def list_store_files(vs_id: str, filter: Status | None = None, limit: int = 20, order: Order = "desc",
                               after: str | None = None, before: str | None = None) -> Response:
        return await answer(rag.list_store_files.remote(vs_id, filter, limit, order, after, before))

    @router.get("/v1/vector_stores/{vs_id}/files/{file_id}")
    async def get_store_file(vs_id: str, file_id: str) -> Response:
        return await answer(rag.get_store_file.remote(vs_id, file_id))

    @router.post("/v1/vector_stores/{vs_id}/files/{file_id}")
    async def update_store_file(vs_id: str, file_id: str, body: VectorStoreFileUpdateRequest) -> Response:
        return await answer(rag.update_store_file.remote(vs_id, file_id, body.attributes))

    @router.delete("/v1/vector_stores/{vs_id}/files/{file_id}")
    async def detach_file(vs_id: str, file_id: str) -> Response:
        return await answer(rag.detach_file.remote(vs_id, file_id))

    @router.get("/v1/vector_stores/{vs_id}/files/{file_id}/content")
    async def store_file_content(vs_id: str, file_id: str) -> Response:
        return await answer(rag.store_file_content.remote(vs_id, file_id))

    # ---- batches --------------------------------------------------------------------------------
    @router.post("/v1/vector_stores/{vs_id}/file_batches")
    async def create_batch(vs_id: str, body: FileBatchCreateRequest) -> Response:
        return await answer(rag.create_batch.remote(vs_id, body))

    @router.get("/v1/vector_stores/{vs_id}/file_batches/{batch_id}")
    async def get_batch(vs_id: str, batch_id: str) -> Response:
        return await answer(rag.get_batch.remote(vs_id, batch_id))

    @router.post("/v1/vector_stores/{vs_id}/file_batches/{batch_id}/cancel")
    async def cancel_batch(vs_id: str, batch_id: str) -> Response:
        return await answer(rag.cancel_batch.remote(vs_id, batch_id))

    @router.get("/v1/vector_stores/{vs_id}/file_batches/{batch_id}/files")
    async def list_batch_files(vs_id: str, batch_id: str, filter: Status | None = None, limit: int = 20,
                               order: Order = "desc", after: str | None = None, before: str | None = None) -> Response:
        return await answer(rag.list_batch_files.remote(vs_id, batch_id, filter, limit, order, after, before))

    # ---- search and answers ---------------------------------------------------------------------
    @router.post("/v1/vector_stores/{vs_id}/search")
    async def search(vs_id: str, body: VectorStoreSearchRequest) -> Response:
        return await answer(rag.search.remote(vs_id, body))

    @router.post("/v1/responses")
    async def responses(body: ResponsesRequest) -> Response:
        if not body.stream:
            return await answer(rag.responses.remote(body))
        try:
            events: DeploymentResponseGenerator = stream.responses_stream.remote(body)
            first = await anext(events)  # before the headers: a rejected request keeps its status
        except Exception as exc:
            return error_json(exc)
        return EventStream(sse(first, events), events)

    @router.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> Response:
        return await answer(rag.get_response.remote(response_id))

    @router.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> Response:
        return await answer(rag.delete_response.remote(response_id))

    return router


async def sse(first: dict, rest: DeploymentResponseGenerator) -> AsyncIterator[str]:
    """Responses events as OpenAI sends them (`event:` + `data:`, no [DONE]); an error after the
    headers went out is an `error` event."""
    def frame(event: dict) -> str:
        return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

    yield frame(first)
    seq = first["sequence_number"]
    try:
        async for event in rest:
            seq = event["sequence_number"]
            yield frame(event)
    except Exception as exc:
        error = to_error(exc)[0].error
        yield frame({"type": "error", "sequence_number": seq + 1, "code": str(error.code), "message": error.message,
                     "param": error.param})
