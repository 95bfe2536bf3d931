"""Per-request caps and fair admission of big pooling requests, applied on the model replica.

- `max_inputs_per_request` (OpenAI's 2,048 by default) counts a request's inputs: embedding or
  classification inputs, completion prompts, score/rerank texts. More is a 400 naming the limit.
- `max_tokens_per_request` caps the prompt tokens of one request. Texts are counted (tokenized on a
  worker thread) only when their characters could exceed it (a token is at least one character), so
  ordinary requests pay nothing for the check.
- Fairness: a pooling request enters the engine in slices of `pooling_slice_inputs` inputs, at most
  two slices at a time, so a request that arrives behind a huge one waits for at most two slices,
  not the whole request; a cancelled request leaves at most two slices to abort.
- `engine_stall_timeout_s`: check_health fails when the engine thread has work but has not finished
  a step for this long (a wedged loop), so Serve replaces the replica.
- `stream_batching_interval_ms` (Ray Serve LLM's knob, its default): a stream sends at most one chunk
  per interval, with every token generated since the last. Each chunk is a Ray object and an SSE
  event; one per token capped a replica's streams at a few hundred tokens/s (README). 0: one chunk
  per engine step. The first chunk and the last are never held back.
"""
import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from pydantic import BaseModel, Field

from deployments.errors import APIError
from engine import AsyncLLM, PoolingParams
from engine.tokenizer import pair_texts

T = TypeVar("T")
# Two slices in flight keep the engine busy while the next one is built.
SLICES_IN_FLIGHT = 2


class ServingLimits(BaseModel):
    max_inputs_per_request: int = Field(2048, ge=1)
    max_tokens_per_request: int = Field(1 << 20, ge=1)
    pooling_slice_inputs: int = Field(256, ge=1)
    engine_stall_timeout_s: float = Field(120.0, gt=0)
    stream_batching_interval_ms: float = Field(50.0, ge=0)

    def check_inputs(self, count: int, field: str) -> None:
        if count > self.max_inputs_per_request:
            raise APIError(f"{field} has {count} inputs; at most max_inputs_per_request="
                           f"{self.max_inputs_per_request} are allowed per request", 400, field)

    async def check_tokens(self, texts: Sequence[str | list[int]], field: str,
                           count_tokens: Callable[[str], Awaitable[int]]) -> None:
        """400 if the texts have more than max_tokens_per_request tokens in all."""
        limit = self.max_tokens_per_request
        # Upper bound first: a token covers at least one character, plus a few special tokens.
        if sum(len(t) + 4 for t in texts) <= limit:
            return
        counts = await asyncio.gather(*(count_tokens(t) for t in texts if isinstance(t, str)))
        total = sum(counts) + sum(len(t) for t in texts if not isinstance(t, str))
        if total > limit:
            raise APIError(f"{field} has {total} tokens; at most max_tokens_per_request={limit} are allowed "
                           f"per request", 400, field)


async def in_slices(run: Callable[[list], Awaitable[list[T]]], items: list, size: int) -> list[T]:
    """run(items) as run(slice) calls of `size` items, SLICES_IN_FLIGHT at a time, results in order.
    If the caller is cancelled or a slice fails, the slices in flight are cancelled."""
    if len(items) <= size:
        return await run(items)
    starts = iter(range(0, len(items), size))
    in_flight: deque[asyncio.Future] = deque()
    results: list[T] = []
    try:
        for start in starts:
            in_flight.append(asyncio.ensure_future(run(items[start:start + size])))
            if len(in_flight) >= SLICES_IN_FLIGHT:
                results.extend(await in_flight.popleft())
        while in_flight:
            results.extend(await in_flight.popleft())
        return results
    finally:
        for task in in_flight:
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)


class Admission:
    """The caps and the slicing applied to one replica's engine, shared by its pooling and generation routes."""
    def __init__(self, engine: AsyncLLM, limits: ServingLimits):
        self.engine, self.limits = engine, limits

    async def admit(self, texts: list, field: str, num_inputs: int | None = None) -> None:
        """The per-request caps, before any work starts."""
        self.limits.check_inputs(len(texts) if num_inputs is None else num_inputs, field)
        await self.limits.check_tokens(texts, field, self._count_tokens)

    async def _count_tokens(self, text: str) -> int:
        return len(await self.engine.tokenize_async(text))

    async def pool(self, run: Callable[[list], Awaitable[list[T]]], items: list) -> list[T]:
        """run(items) admitted in slices, so one huge request does not starve the others."""
        return await in_slices(run, items, self.limits.pooling_slice_inputs)

    async def score_pairs(self, text_1: str | list[str], text_2: str | list[str], params: PoolingParams,
                          field: str) -> list:
        pairs = pair_texts(text_1, text_2)
        await self.admit([t for pair in pairs for t in pair], field, num_inputs=len(pairs))
        return await self.pool(lambda chunk: self.engine.score([q for q, _ in chunk], [d for _, d in chunk], params),
                               pairs)
