"""Server-sent events as vLLM and OpenAI stream chat and completions: one `data:` line per chunk, then
`data: [DONE]`. Chunks are the model server's pydantic chunks, or dicts where a chunk carries extra
fields (the RAG chat model's `sources`)."""
import json
from collections.abc import AsyncIterator

from pydantic import BaseModel
from ray.serve.handle import DeploymentResponseGenerator
from starlette.responses import StreamingResponse
from starlette.types import Send

from deployments.errors import to_error


class EventStream(StreamingResponse):
    """An SSE response that cancels the deployment stream it relays when the client leaves mid-stream
    (and with it the engine's requests). The leaving can land anywhere: Starlette cancels its task at
    whatever it awaits, often the send of a chunk while the event generator is parked at a `yield`,
    and it never closes that generator, so cleanup inside the generator would wait on the garbage
    collector while the model generates for nobody."""

    def __init__(self, events: AsyncIterator[str], upstream: DeploymentResponseGenerator):
        super().__init__(events, media_type="text/event-stream")
        self.upstream = upstream

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        except BaseException:  # cancelled, or the send failed: the client is gone
            self.upstream.cancel()
            raise


def _data(chunk: BaseModel | dict) -> str:
    return f"data: {chunk.model_dump_json() if isinstance(chunk, BaseModel) else json.dumps(chunk)}\n\n"


async def data_events(first: BaseModel | dict | None, rest: DeploymentResponseGenerator) -> AsyncIterator[str]:
    """first: the chunk already awaited (before the headers went out), or None. An error after the
    headers becomes an error event (EventStream handles a client that leaves)."""
    try:
        if first is not None:
            yield _data(first)
        async for chunk in rest:
            yield _data(chunk)
    except Exception as exc:
        yield _data(to_error(exc)[0])
    yield "data: [DONE]\n\n"
