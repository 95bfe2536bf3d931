"""The generation routes of a model server: /v1/completions and /v1/chat/completions, whole or streamed.

Streams ask the engine for DELTA outputs and forward the new text, tokens and logprobs at most once per
`limits.stream_batching_interval_ms` (the engine merges the steps in between); whole responses ask for
FINAL_ONLY and get one output per prompt. Neither re-reads what was sent.
Streams are async generators over the engine's generators: when the caller goes away, Serve cancels the
method, the cancellation closes the engine's generator, and the engine aborts the request."""
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from deployments.limits import Admission
from deployments.logprobs import chat_logprobs, completion_logprobs
from deployments.protocol import (ChatCompletionRequest, ChatCompletionResponse, ChatCompletionResponseChoice,
                                  ChatCompletionResponseStreamChoice, ChatCompletionStreamResponse, ChatMessage,
                                  CompletionRequest, CompletionResponse, CompletionResponseChoice,
                                  CompletionResponseStreamChoice, CompletionStreamResponse, DeltaMessage,
                                  UsageInfo, now, random_id)
from deployments.serving_tokenization import chat_prompt
from engine import AsyncLLM, SamplingParams
from engine.outputs import RequestOutput
from engine.params import RequestOutputKind


@dataclass(slots=True)
class _Usage:
    """Token counts summed over a stream's deltas."""
    prompt: int = 0
    completion: int = 0

    def add(self, out: RequestOutput, first: bool) -> None:
        self.prompt += len(out.prompt_token_ids) if first else 0
        self.completion += sum(len(o.token_ids) for o in out.outputs)

    def info(self) -> UsageInfo:
        return UsageInfo(prompt_tokens=self.prompt, completion_tokens=self.completion,
                         total_tokens=self.prompt + self.completion)


class GenerationServing:
    def __init__(self, engine: AsyncLLM, name: str, admission: Admission):
        self.engine, self.name, self.admission = engine, name, admission

    async def completions(self, req: CompletionRequest) -> CompletionResponse:
        prompts = req.prompts()
        await self.admission.admit(prompts, "prompt")
        params = self._sampling(req, req.max_tokens, req.logprobs, RequestOutputKind.FINAL_ONLY)
        finals = await final_outputs(self.engine.generate(p, params) for p in prompts)
        choices, usage = [], _Usage()
        for i, out in enumerate(finals):
            usage.add(out, first=True)
            echo = self._echo(req, prompts[i])
            for o in out.outputs:
                choices.append(CompletionResponseChoice(
                    index=i * req.n + o.index, text=echo + o.text, finish_reason=o.finish_reason,
                    stop_reason=o.stop_reason,
                    logprobs=completion_logprobs(o, req.logprobs, len(echo), self.engine.detokenize)))
        return CompletionResponse(model=self.name, choices=choices, usage=usage.info())

    async def completions_stream(self, req: CompletionRequest) -> AsyncIterator[CompletionStreamResponse]:
        prompts = req.prompts()
        await self.admission.admit(prompts, "prompt")
        params = self._sampling(req, req.max_tokens, req.logprobs, RequestOutputKind.DELTA)
        rid, created, usage, seen = random_id("cmpl"), now(), _Usage(), set()
        sent: dict[int, int] = {}  # choice index -> characters sent, echo included
        async for i, out in merge([self._stream(p, params) for p in prompts]):
            usage.add(out, first=i not in seen)
            seen.add(i)
            for o in out.outputs:
                if not o.text and not o.token_ids and o.finish_reason is None:
                    continue
                index = i * req.n + o.index
                echo = self._echo(req, prompts[i]) if index not in sent else ""
                offset = sent.get(index, 0) + len(echo)
                sent[index] = offset + len(o.text)
                choice = CompletionResponseStreamChoice(
                    index=index, text=echo + o.text, finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                    logprobs=completion_logprobs(o, req.logprobs, offset, self.engine.detokenize))
                yield CompletionStreamResponse(id=rid, created=created, model=self.name, choices=[choice])
        if req.include_usage:
            yield CompletionStreamResponse(id=rid, created=created, model=self.name, choices=[], usage=usage.info())

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        params = self._sampling(req, req.output_limit(), req.top_logprobs if req.logprobs else None,
                                RequestOutputKind.FINAL_ONLY)
        (out,) = await final_outputs([self.engine.generate(chat_prompt(self.engine, req), params)])
        choices = [ChatCompletionResponseChoice(
            index=o.index, message=ChatMessage(role="assistant", content=o.text), finish_reason=o.finish_reason,
            stop_reason=o.stop_reason,
            logprobs=chat_logprobs(o, req.logprobs, req.top_logprobs or 0, self.engine.detokenize))
            for o in out.outputs]
        usage = _Usage()
        usage.add(out, first=True)
        return ChatCompletionResponse(model=self.name, choices=choices, usage=usage.info())

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[ChatCompletionStreamResponse]:
        params = self._sampling(req, req.output_limit(), req.top_logprobs if req.logprobs else None,
                                RequestOutputKind.DELTA)
        rid, created, usage, opened = random_id("chatcmpl"), now(), _Usage(), set()
        async for _, out in merge([self._stream(chat_prompt(self.engine, req), params)]):
            usage.add(out, first=not opened)
            for o in out.outputs:
                if o.index not in opened:  # vLLM opens each choice with the role, content ""
                    opened.add(o.index)
                    yield self._chat_chunk(rid, created, ChatCompletionResponseStreamChoice(
                        index=o.index, delta=DeltaMessage(role="assistant", content=""), finish_reason=None))
                if not o.text and not o.token_ids and o.finish_reason is None:
                    continue
                yield self._chat_chunk(rid, created, ChatCompletionResponseStreamChoice(
                    index=o.index, delta=DeltaMessage(content=o.text), finish_reason=o.finish_reason,
                    stop_reason=o.stop_reason,
                    logprobs=chat_logprobs(o, req.logprobs, req.top_logprobs or 0, self.engine.detokenize)))
        if req.include_usage and opened:
            yield ChatCompletionStreamResponse(id=rid, created=created, model=self.name, choices=[],
                                               usage=usage.info())

    def _stream(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        return self.engine.generate(prompt, params, interval_s=self.admission.limits.stream_batching_interval_ms / 1e3)

    def _chat_chunk(self, rid: str, created: int, choice: ChatCompletionResponseStreamChoice):
        return ChatCompletionStreamResponse(id=rid, created=created, model=self.name, choices=[choice])

    @staticmethod
    def _sampling(req, max_tokens: int | None, logprobs: int | None, kind: RequestOutputKind) -> SamplingParams:
        return SamplingParams(**req.sampling_kwargs(), max_tokens=max_tokens, logprobs=logprobs, output_kind=kind)

    def _echo(self, req: CompletionRequest, prompt: str | list[int]) -> str:
        if not req.echo:
            return ""
        return prompt if isinstance(prompt, str) else self.engine.detokenize(prompt)


async def final_outputs(streams) -> list[RequestOutput]:
    """Run generations to their end; if one fails or we are cancelled, the others are aborted."""
    async def last(stream):
        out = None
        async for out in stream:
            pass
        return out

    tasks = [asyncio.ensure_future(last(s)) for s in streams]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async iterators as they come, tagged by iterator index. Closing the
    merge (or cancelling its consumer) closes every iterator, so the engine aborts them all."""
    if len(streams) == 1:  # every chat stream and most completions: no task and no wait per item
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[i]))] = i
                yield i, item
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for s in streams:
            await s.aclose()
