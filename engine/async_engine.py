"""The engine for servers: a background thread runs steps while asyncio callers await results.

All engine state is touched only by that thread; callers hand it work through an inbox. The
tokenizer is the exception: it takes its own lock (engine.tokenizer.Tokenizer), so servers may
tokenize and apply chat templates on their event loop. PyTorch releases the GIL inside its
kernels, so the event loop stays responsive."""
import asyncio
import gc
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.output_collector import OutputCollector
from engine.outputs import PoolingJobOutput, PoolingRequestOutput, RequestOutput
from engine.params import PoolingParams, SamplingParams
from engine.tokenizer import apply_chat_template

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future | None = None  # pooling jobs
    stream: OutputCollector | None = None  # generations

    def send(self, fn: Callable, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)


class AsyncLLM:
    def __init__(self, config: EngineConfig):
        self.config = config
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiters: dict[str, _Waiter] = {}  # by request id: generations and pooling calls
        self._running = True
        self._heartbeat = time.monotonic()  # the engine thread's last sign of progress
        # The engine is built on the thread that runs it. On CPU, torch's OpenMP pool belongs to the
        # thread that first runs a parallel op; a model loaded on the caller's thread leaves a second
        # pool, and with more OpenMP threads than cores libgomp stops spinning between ops, so every op
        # of the engine thread sleeps and wakes: decode steps measured 2x slower (README).
        built: Future = Future()
        self._thread = threading.Thread(target=self._build_and_loop, args=(built,), name="engine", daemon=True)
        self._thread.start()
        built.result()  # raises what building the engine raised
        self.task = self.engine.task
        self.max_model_len = self.engine.max_model_len
        self.tokenizer = self.engine.tokenizer
        self.id2label = self.engine.id2label

    @classmethod
    def from_args(cls, **kwargs) -> "AsyncLLM":
        return cls(EngineConfig(**kwargs))

    # ---- the engine thread --------------------------------------------------------------------
    def _build_and_loop(self, built: Future) -> None:
        try:
            self.engine = LLMEngine(self.config)
            self._snapshot = self.engine.stats_snapshot()
            self.engine.on_batch_start = self._publish_stats
        except BaseException as e:
            built.set_exception(e)
            return
        # The model, tokenizer and engine live as long as the process: moved out of the collector's reach, a
        # full collection no longer walks them while requests run (vLLM freezes its heap after start-up too).
        gc.collect()
        gc.freeze()
        built.set_result(None)
        self._loop()

    def _loop(self) -> None:
        while self._running:
            block = not self.engine.has_unfinished()
            try:
                while True:
                    self._inbox.get(block=block)()
                    block = False
            except queue.Empty:
                pass
            self._heartbeat = time.monotonic()
            if not self.engine.has_unfinished():
                self._snapshot = self.engine.stats_snapshot()  # e.g. after an abort emptied the engine
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug must not leave callers waiting or blocks allocated
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            self._dispatch(outputs)
            self._snapshot = self.engine.stats_snapshot()

    def _dispatch(self, outputs: list[RequestOutput | PoolingJobOutput]) -> None:
        """Wakes each caller's event loop once per step, not once per output: a call into a loop from
        another thread writes to its self-pipe (~7 us here; 1.8 ms a step with 256 streams)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Waiter, RequestOutput | PoolingJobOutput]]] = {}
        for out in outputs:
            waiter = self._waiters.pop(out.request_id, None) if out.finished else self._waiters.get(out.request_id)
            if waiter is not None:
                by_loop.setdefault(waiter.loop, []).append((waiter, out))
        for loop, delivered in by_loop.items():
            loop.call_soon_threadsafe(_deliver, delivered)

    def _fail_all(self, error: Exception) -> None:
        waiters, self._waiters = self._waiters, {}
        for rid, waiter in waiters.items():
            self.engine.abort(rid)
            if waiter.stream is not None:
                waiter.send(waiter.stream.put, error)
            else:
                waiter.send(_reject, waiter.future, error)

    async def _call(self, fn: Callable):
        """Run fn on the engine thread and await its result (or its exception)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def run():
            try:
                result = fn()
            except Exception as e:
                loop.call_soon_threadsafe(_reject, future, e)
            else:
                loop.call_soon_threadsafe(_resolve, future, result)
        self._inbox.put(run)
        return await future

    # ---- the API ------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       interval_s: float = 0.0) -> AsyncIterator[RequestOutput]:
        """Yields outputs as params.output_kind asks: the new tokens (DELTA), everything so far
        (CUMULATIVE) or one output at the end (FINAL_ONLY). A reader slower than the engine's steps
        gets the steps since its last read as one output; interval_s > 0 paces it to one output per
        interval (the first and the last are not held back). Closing the iterator early aborts the
        request and frees its KV blocks."""
        rid = request_id or f"gen-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop, stream=OutputCollector(params.output_kind))
        finished, not_before = False, 0.0
        try:
            await self._call(lambda: self._start(rid, waiter, lambda: self.engine.add_generation(rid, prompt, params)))
            while not finished:
                out = await waiter.stream.get(not_before)
                finished = out.finished
                yield out
                not_before = loop.time() + interval_s
        finally:
            if not finished:
                self._inbox.put(lambda: self._abort(rid, waiter))

    async def embed(self, prompts: list[str | list[int]], params: PoolingParams | None = None) -> list[PoolingRequestOutput]:
        return await self._pool(lambda rid: self.engine.add_embed(rid, prompts, params))

    async def score(self, text_1: str | list[str], text_2: str | list[str],
                    params: PoolingParams | None = None) -> list[PoolingRequestOutput]:
        return await self._pool(lambda rid: self.engine.add_score(rid, text_1, text_2, params))

    async def classify(self, prompts: list[str | list[int]], params: PoolingParams | None = None) -> list[PoolingRequestOutput]:
        return await self._pool(lambda rid: self.engine.add_classify(rid, prompts, params))

    async def _pool(self, add: Callable[[str], None]) -> list[PoolingRequestOutput]:
        rid = f"pool-{uuid.uuid4().hex}"
        waiter = _Waiter(asyncio.get_running_loop())
        waiter.future = waiter.loop.create_future()
        await self._call(lambda: self._start(rid, waiter, lambda: add(rid)))
        try:
            return await waiter.future
        finally:
            if not waiter.future.done():  # cancelled: its requests leave the engine
                self._inbox.put(lambda: self._abort(rid, waiter))

    def _start(self, rid: str, waiter: _Waiter, add: Callable[[], None]) -> None:
        """On the engine thread: register the waiter, then add the call (a bad call registers nothing)."""
        if rid in self._waiters:
            raise ValueError(f"request_id {rid!r} is already running")
        add()
        self._waiters[rid] = waiter

    def _abort(self, rid: str, waiter: _Waiter) -> None:
        if self._waiters.get(rid) is waiter:
            del self._waiters[rid]
            self.engine.abort(rid)

    async def tokenize_async(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self._call(lambda: self.tokenize(text, add_special_tokens))

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> str:
        return apply_chat_template(self.tokenizer, messages, add_generation_prompt, continue_final_message,
                                   chat_template_kwargs)

    def _publish_stats(self, snapshot: dict) -> None:
        self._snapshot = snapshot

    def stats(self) -> dict:
        """The snapshot taken when the latest step started (its batch running) or ended: counters,
        running/waiting, KV usage, and histograms as {"buckets", "counts" (per bucket, last is
        +Inf), "sum", "count"}."""
        return self._snapshot

    def stalled_for(self) -> float:
        """Seconds the engine thread has had work without finishing a step (0 when idle); inf if
        the thread is gone. Health checks use it to tell a wedged loop from a busy one."""
        if not self._thread.is_alive():
            return float("inf")
        if not self._waiters:
            return 0.0
        return time.monotonic() - self._heartbeat

    def shutdown(self) -> None:
        self._running = False
        self._inbox.put(lambda: None)
        self._thread.join(timeout=10)


def _deliver(delivered: list[tuple[_Waiter, RequestOutput | PoolingJobOutput]]) -> None:
    for waiter, out in delivered:
        if waiter.stream is not None:
            waiter.stream.put(out)
        else:
            _resolve(waiter.future, out.outputs)


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
