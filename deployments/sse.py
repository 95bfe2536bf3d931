"""Server-sent events as vLLM and OpenAI stream chat and completions: one `data:` line per chunk, then
`data: [DONE]`. Chunks are the model server's pydantic chunks, or dicts where a chunk carries extra
fields (the RAG chat model's `sources`)."""
import asyncio
import json
from collections.abc import AsyncIterator

from pydantic import BaseModel
from ray.serve.handle import DeploymentResponseGenerator

from deployments.errors import to_error


def _data(chunk: BaseModel | dict) -> str:
    return f"data: {chunk.model_dump_json() if isinstance(chunk, BaseModel) else json.dumps(chunk)}\n\n"


async def data_events(first: BaseModel | dict | None, rest: DeploymentResponseGenerator) -> AsyncIterator[str]:
    """first: the chunk already awaited (before the headers went out), or None. An error after the
    headers becomes an error event; a client that disconnects cancels the model's stream (and its
    engine request)."""
    try:
        if first is not None:
            yield _data(first)
        async for chunk in rest:
            yield _data(chunk)
    except asyncio.CancelledError:
        rest.cancel()
        raise
    except Exception as exc:
        yield _data(to_error(exc)[0])
    yield "data: [DONE]\n\n"
