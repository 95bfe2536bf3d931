"""The model-server deployment: one replica hosts one AsyncLLM and turns protocol requests
into protocol responses (Ray Serve LLM's LLMServer shape).

One class serves every replica kind; the engine's task decides which methods answer (see
protocol.API_TASKS) and the builder names each deployment by its kind (Embedder, Reranker,
Classifier, Generator). Handle callers get the same pydantic objects the HTTP routes send
(usage: the deployments package docstring).

Streams are async generators over the engine's generator: when the caller goes away, Serve
cancels this method, the cancellation closes the engine's generator, and the engine aborts
the request and frees its KV blocks.
"""
import asyncio
import base64
import struct
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from deployments.errors import APIError
from deployments.limits import ServingLimits, in_slices
from deployments.protocol import (
    API_NAMES, API_TASKS, ChatCompletionLogProb, ChatCompletionLogProbs, ChatCompletionLogProbsContent,
    ChatCompletionRequest, ChatCompletionResponse, ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice, ChatCompletionStreamResponse, ChatMessage, ClassificationData,
    ClassificationRequest, ClassificationResponse, CompletionLogProbs, CompletionRequest, CompletionResponse,
    CompletionResponseChoice, CompletionResponseStreamChoice, CompletionStreamResponse, DeltaMessage,
    DetokenizeRequest, DetokenizeResponse, EmbeddingRequest, EmbeddingResponse, EmbeddingResponseData,
    ModelCard, ModelInfo, ModelPermission, RerankDocument, RerankRequest, RerankResponse, RerankResult,
    RerankUsage, ScoreRequest, ScoreResponse, ScoreResponseData, TokenizeRequest, TokenizeResponse, UsageInfo,
    now, random_id)
from engine import AsyncLLM, EngineConfig, PoolingParams, SamplingParams
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.tokenizer import pair_texts


@serve.deployment  # options: cluster.shapes.model_deployment_defaults, overridden per model by the config
class ModelServer:
    def __init__(self, engine_kwargs: dict[str, Any], limits: dict[str, Any] | None = None):
        self.engine = AsyncLLM(EngineConfig(**engine_kwargs))
        self.limits = ServingLimits(**(limits or {}))
        config = self.engine.config
        self.name = config.served_name
        self.card = ModelCard(id=self.name, root=config.model, max_model_len=self.engine.max_model_len,
                              permission=[ModelPermission()])

    # ---- model facts, health and stats ----------------------------------------------------------
    def describe(self) -> ModelInfo:
        return ModelInfo(card=self.card, task=self.engine.task)

    def stats(self) -> dict:
        """The engine's counters, named for /metrics (see deployments.metrics)."""
        replica = serve.get_replica_context().replica_id.unique_id
        return {**self.engine.stats(), "model_name": self.name, "replica": replica}

    def record_routing_stats(self) -> dict:
        """Serve polls this into every handle's router: the prefix router reads KV usage from it and
        the ingress renders all replicas' /metrics from it (cluster.replica_stats)."""
        return self.stats()

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica. A dead actor fails
        by itself; this also catches an engine thread that died or stopped making progress."""
        stalled = self.engine.stalled_for()
        if stalled > self.limits.engine_stall_timeout_s:
            raise RuntimeError(f"the engine loop of {self.name} has made no progress for {stalled:.0f} s "
                               f"with work pending (engine_stall_timeout_s={self.limits.engine_stall_timeout_s})")

    async def _admit(self, texts: list, field: str, num_inputs: int | None = None) -> None:
        """The per-request caps (deployments.limits), before any work starts."""
        self.limits.check_inputs(len(texts) if num_inputs is None else num_inputs, field)
        await self.limits.check_tokens(texts, field, self._count_tokens)

    async def _count_tokens(self, text: str) -> int:
        return len(await self.engine.tokenize_async(text))

    async def _pool(self, run, items: list) -> list:
        """run(items) admitted in slices, so one huge request does not starve the others."""
        return await in_slices(run, items, self.limits.pooling_slice_inputs)

    async def _score_pairs(self, text_1: str | list[str], text_2: str | list[str], params: PoolingParams,
                           field: str):
        pairs = pair_texts(text_1, text_2)
        await self._admit([t for pair in pairs for t in pair], field, num_inputs=len(pairs))
        return await self._pool(lambda chunk: self.engine.score([q for q, _ in chunk], [d for _, d in chunk], params),
                                pairs)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this on each replica; cluster.autoscaling.EnginePressurePolicy reads it."""
        stats = self.engine.stats()
        return {"kv_cache_usage": float(stats["kv_cache_usage"]), "num_waiting": float(stats["num_waiting"])}

    def _require(self, api: str) -> None:
        if self.engine.task not in API_TASKS[api]:
            raise APIError(f"The model `{self.name}` does not support the {API_NAMES[api]}: "
                           f"it serves task {self.engine.task!r}", 400, "model")

    # ---- pooling --------------------------------------------------------------------------------
    async def embeddings(self, req: EmbeddingRequest) -> EmbeddingResponse:
        self._require("embeddings")
        params = PoolingParams(dimensions=req.dimensions, normalize=req.normalize,
                               truncate_prompt_tokens=req.truncate_prompt_tokens)
        prompts = req.prompts()
        await self._admit(prompts, "input")
        outs = await self._pool(lambda chunk: self.engine.embed(chunk, params), prompts)
        data = [EmbeddingResponseData(index=i, embedding=encode_embedding(o.outputs.embedding, req.encoding_format))
                for i, o in enumerate(outs)]
        return EmbeddingResponse(model=self.name, data=data, usage=pooling_usage(outs))

    async def score(self, req: ScoreRequest) -> ScoreResponse:
        self._require("score")
        outs = await self._score_pairs(req.text_1, req.text_2, pooling_params(req), "text_2")
        data = [ScoreResponseData(index=i, score=o.outputs.score) for i, o in enumerate(outs)]
        return ScoreResponse(model=self.name, data=data, usage=pooling_usage(outs))

    async def rerank(self, req: RerankRequest) -> RerankResponse:
        self._require("rerank")
        if not req.documents:
            return RerankResponse(model=self.name, usage=RerankUsage(total_tokens=0), results=[])
        outs = await self._score_pairs(req.query, req.documents, pooling_params(req), "documents")
        results = sorted((RerankResult(index=i, document=RerankDocument(text=req.documents[i]),
                                       relevance_score=o.outputs.score) for i, o in enumerate(outs)),
                         key=lambda r: r.relevance_score, reverse=True)
        top_n = req.top_n if req.top_n > 0 else len(results)
        return RerankResponse(model=self.name, usage=RerankUsage(total_tokens=pooling_usage(outs).total_tokens),
                              results=results[:top_n])

    async def classify(self, req: ClassificationRequest) -> ClassificationResponse:
        self._require("classify")
        prompts = [req.input] if isinstance(req.input, str) else req.input
        await self._admit(prompts, "input")
        outs = await self._pool(lambda chunk: self.engine.classify(chunk, pooling_params(req)), prompts)
        data = []
        for i, o in enumerate(outs):
            probs = o.outputs.probs
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append(ClassificationData(index=i, label=self.engine.id2label.get(best), probs=probs,
                                           num_classes=len(probs)))
        return ClassificationResponse(model=self.name, data=data, usage=pooling_usage(outs))

    # ---- generation -----------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest) -> CompletionResponse:
        self._require("completions")
        prompts, params = req.prompts(), self._sampling(req, req.max_tokens, req.logprobs)
        await self._admit(prompts, "prompt")
        finals = await final_outputs(self.engine.generate(p, params) for p in prompts)
        choices = []
        for i, out in enumerate(finals):
            echo = self._echo(req, prompts[i])
            for o in out.outputs:
                choices.append(CompletionResponseChoice(
                    index=i * req.n + o.index, text=echo + o.text, finish_reason=o.finish_reason,
                    stop_reason=o.stop_reason,
                    logprobs=self._completion_logprobs(o, 0, req.logprobs, len(echo))))
        return CompletionResponse(model=self.name, choices=choices, usage=generation_usage(finals))

    async def completions_stream(self, req: CompletionRequest) -> AsyncIterator[CompletionStreamResponse]:
        self._require("completions")
        prompts, params = req.prompts(), self._sampling(req, req.max_tokens, req.logprobs)
        await self._admit(prompts, "prompt")
        rid, created, finals = random_id("cmpl"), now(), []
        sent: dict[int, tuple[int, int]] = {}  # choice index -> (characters, tokens) already sent
        async for i, out in merge([self.engine.generate(p, params) for p in prompts]):
            for o in out.outputs:
                index = i * req.n + o.index
                chars, tokens = sent.get(index, (0, 0))
                if len(o.text) <= chars and len(o.token_ids) <= tokens and o.finish_reason is None:
                    continue
                echo = self._echo(req, prompts[i]) if index not in sent else ""
                sent[index] = (len(o.text), len(o.token_ids))
                choice = CompletionResponseStreamChoice(
                    index=index, text=echo + o.text[chars:], finish_reason=o.finish_reason,
                    stop_reason=o.stop_reason,
                    logprobs=self._completion_logprobs(o, tokens, req.logprobs, len(echo) + chars))
                yield CompletionStreamResponse(id=rid, created=created, model=self.name, choices=[choice])
            if out.finished:
                finals.append(out)
        if req.include_usage:
            yield CompletionStreamResponse(id=rid, created=created, model=self.name, choices=[],
                                           usage=generation_usage(finals))

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        self._require("chat")
        params = self._sampling(req, req.output_limit(), req.top_logprobs if req.logprobs else None)
        (out,) = await final_outputs([self.engine.generate(self._chat_prompt(req), params)])
        choices = [ChatCompletionResponseChoice(
            index=o.index, message=ChatMessage(role="assistant", content=o.text), finish_reason=o.finish_reason,
            stop_reason=o.stop_reason, logprobs=self._chat_logprobs(o, 0, req)) for o in out.outputs]
        return ChatCompletionResponse(model=self.name, choices=choices, usage=generation_usage([out]))

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[ChatCompletionStreamResponse]:
        self._require("chat")
        params = self._sampling(req, req.output_limit(), req.top_logprobs if req.logprobs else None)
        rid, created, out = random_id("chatcmpl"), now(), None
        sent: dict[int, tuple[int, int]] = {}
        async for _, out in merge([self.engine.generate(self._chat_prompt(req), params)]):
            for o in out.outputs:
                if o.index not in sent:  # vLLM opens each choice with the role, content ""
                    sent[o.index] = (0, 0)
                    yield self._chat_chunk(rid, created, ChatCompletionResponseStreamChoice(
                        index=o.index, delta=DeltaMessage(role="assistant", content=""), finish_reason=None))
                chars, tokens = sent[o.index]
                if len(o.text) <= chars and len(o.token_ids) <= tokens and o.finish_reason is None:
                    continue
                sent[o.index] = (len(o.text), len(o.token_ids))
                yield self._chat_chunk(rid, created, ChatCompletionResponseStreamChoice(
                    index=o.index, delta=DeltaMessage(content=o.text[chars:]), finish_reason=o.finish_reason,
                    stop_reason=o.stop_reason, logprobs=self._chat_logprobs(o, tokens, req)))
        if req.include_usage and out is not None:
            yield ChatCompletionStreamResponse(id=rid, created=created, model=self.name, choices=[],
                                               usage=generation_usage([out]))

    def _chat_chunk(self, rid: str, created: int, choice: ChatCompletionResponseStreamChoice):
        return ChatCompletionStreamResponse(id=rid, created=created, model=self.name, choices=[choice])

    def _chat_prompt(self, req: ChatCompletionRequest | TokenizeRequest) -> str:
        return self.engine.apply_chat_template([m.template_dict() for m in req.messages], req.add_generation_prompt,
                                               req.continue_final_message, req.chat_template_kwargs)

    def _sampling(self, req, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(**req.sampling_kwargs(), max_tokens=max_tokens, logprobs=logprobs)

    def _echo(self, req: CompletionRequest, prompt: str | list[int]) -> str:
        if not req.echo:
            return ""
        return prompt if isinstance(prompt, str) else self.engine.detokenize(prompt)

    # ---- logprobs in OpenAI's two shapes ---------------------------------------------------------
    def _top(self, o: CompletionOutput, k: int, num: int) -> tuple[str, float, list[tuple[str, float]]]:
        """Token k of a choice: its text, its logprob and the `num` most likely alternatives."""
        token_id, entry = o.token_ids[k], o.logprobs[k]
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
        top = [(self._token_text(t, lp), lp.logprob) for t, lp in ranked[:num]]
        return self._token_text(token_id, entry[token_id]), entry[token_id].logprob, top

    def _token_text(self, token_id: int, lp: Logprob) -> str:
        return lp.decoded_token if lp.decoded_token is not None else self.engine.detokenize([token_id])

    def _completion_logprobs(self, o: CompletionOutput, start: int, num: int | None,
                             offset: int) -> CompletionLogProbs | None:
        if num is None or o.logprobs is None:
            return None
        lp = CompletionLogProbs()
        for k in range(start, len(o.token_ids)):
            text, logprob, top = self._top(o, k, num)
            lp.text_offset.append(offset)
            lp.tokens.append(text)
            lp.token_logprobs.append(logprob)
            lp.top_logprobs.append({text: logprob, **dict(top)})
            offset += len(text)
        return lp

    def _chat_logprobs(self, o: CompletionOutput, start: int, req: ChatCompletionRequest):
        if not req.logprobs or o.logprobs is None:
            return None
        content = []
        for k in range(start, len(o.token_ids)):
            text, logprob, top = self._top(o, k, req.top_logprobs or 0)
            content.append(ChatCompletionLogProbsContent(
                token=text, logprob=logprob, bytes=list(text.encode()),
                top_logprobs=[ChatCompletionLogProb(token=t, logprob=v, bytes=list(t.encode())) for t, v in top]))
        return ChatCompletionLogProbs(content=content)

    # ---- tokenizer ------------------------------------------------------------------------------
    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        if req.messages is not None:
            prompt = self._chat_prompt(req)
            add_special = bool(req.add_special_tokens)  # the chat template already wrote them
        else:
            prompt, add_special = req.prompt, req.add_special_tokens is not False
        ids = await self.engine.tokenize_async(prompt, add_special_tokens=add_special)  # on the engine's thread
        strs = self.engine.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len, tokens=ids, token_strs=strs)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        vocab = len(self.engine.tokenizer)
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(f"tokens must be in [0, {vocab}), got {bad[:5]}", 400, "tokens")
        return DetokenizeResponse(prompt=self.engine.detokenize(req.tokens))


def pooling_params(req: ScoreRequest | RerankRequest | ClassificationRequest) -> PoolingParams:
    return PoolingParams(activation=req.activation is not False, truncate_prompt_tokens=req.truncate_prompt_tokens)


def pooling_usage(outs) -> UsageInfo:
    n = sum(len(o.prompt_token_ids) for o in outs)
    return UsageInfo(prompt_tokens=n, total_tokens=n)


def generation_usage(finals: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(out.prompt_token_ids) for out in finals)
    completion = sum(len(o.token_ids) for out in finals for o in out.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    """base64 is little-endian float32 bytes, what the openai client decodes."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


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
