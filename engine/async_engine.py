"""The engine for servers: the engine's loop runs steps while asyncio callers await results.

The loop runs on a thread of this process or in a process of its own (engine.engine_loop); either way
callers hand it commands and it reports events, which are handed to each caller's event loop. Requests
are registered here before they are sent, so their first outputs always find them. The tokenizer is
this process's own (it takes its own lock, engine.tokenizer.Tokenizer), so servers may tokenize and
apply chat templates on their event loop. Calls become engine requests here too (engine.input_processor,
off the event loop): a large embedding or rerank call is tokenized while the engine steps, and reaches
it as token ids."""
import asyncio
import itertools
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from engine.config import EngineConfig
from engine.detokenizer import text_by_caller
from engine.engine_loop import EngineFactory, EngineProcess, EngineThread
from engine.heap import freeze_heap
from engine.input_processor import InputProcessor, PoolingJob
from engine.llm_engine import LLMEngine
from engine.loader import load_config
from engine.output_collector import OutputCollector
from engine.outputs import PoolingJobOutput, PoolingRequestOutput, RequestOutput
from engine.params import PoolingParams, SamplingParams
from engine.stream_text import StreamText
from engine.tokenizer import apply_chat_template, load_tokenizer


@dataclass(slots=True)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future | None = None  # pooling jobs
    stream: OutputCollector | None = None  # generations
    text: StreamText | None = None  # a stream whose text this process makes (the engine left it to the caller)

    def send(self, fn: Callable, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)


class AsyncLLM:
    def __init__(self, config: EngineConfig, engine_factory: EngineFactory = LLMEngine):
        """engine_factory builds the engine from the config where the loop runs (in a process of its own it
        must be picklable: a module-level function)."""
        self.config = config
        self._waiters: dict[str, _Waiter] = {}  # by request id: generations and pooling calls
        self._lock = threading.Lock()  # _waiters: registered by callers, resolved where events arrive
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._call_ids = itertools.count()
        self._heartbeat = time.monotonic()  # the loop's last sign of progress
        self._snapshot: dict = {}
        self._ready: Future = Future()
        own_process = config.uses_engine_process(config.torch_device())
        self._host = (EngineProcess if own_process else EngineThread)(config, engine_factory, self._on_event)
        self._caller_detokenizes = own_process  # streams without stop strings: engine.stream_text
        info = self._ready.result()  # raises what building the engine raised
        self.task, self.max_model_len, self.id2label = info["task"], info["max_model_len"], info["id2label"]
        # This process's own tokenizer, even beside an engine thread: encoding here never waits for the
        # engine's lock (its steps detokenize), and the Rust tokenizer runs without the GIL.
        self.tokenizer = load_tokenizer(info["model_dir"], load_config(info["model_dir"]))
        self._inputs = InputProcessor(self.tokenizer, info["input_spec"])
        # The engine froze the heap of the process it runs in; with the engine in a process of its own, this
        # one (the server's) was not: its full collections walked ~500k start-up objects, ~250 ms each on
        # this project's CPU (one or more in 300 steps of 256 streams), every stream stalled meanwhile.
        freeze_heap()

    @classmethod
    def from_args(cls, **kwargs) -> "AsyncLLM":
        return cls(EngineConfig(**kwargs))

    @property
    def engine(self) -> LLMEngine:
        """The engine itself, where it runs on a thread of this process (tests and benchmarks look inside)."""
        return self._host.engine

    # ---- events, where the loop reports them --------------------------------------------------
    def _on_event(self, event: tuple) -> None:
        self._heartbeat = time.monotonic()
        kind = event[0]
        if kind == "step":
            self._dispatch(event[1])
            self._snapshot = event[2]
        elif kind == "stats":
            self._snapshot = event[1]
        elif kind == "reply":
            loop, future = self._calls.pop(event[1])
            loop.call_soon_threadsafe(_resolve if event[2] else _reject, future, event[3])
        elif kind == "ready":
            self._snapshot = event[1]["stats"]
            self._ready.set_result(event[1])
        elif not self._ready.done():  # failed while starting
            self._ready.set_exception(event[1])
        else:
            self._fail_all(event[1])

    def _dispatch(self, outputs: list[RequestOutput | PoolingJobOutput]) -> None:
        """Wakes each caller's event loop once per step, not once per output: a call into a loop from
        another thread writes to its self-pipe (~7 us here; 1.8 ms a step with 256 streams)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Waiter, RequestOutput | PoolingJobOutput]]] = {}
        with self._lock:
            for out in outputs:
                waiter = self._waiters.pop(out.request_id, None) if out.finished else self._waiters.get(out.request_id)
                if waiter is not None:
                    by_loop.setdefault(waiter.loop, []).append((waiter, out))
        for loop, delivered in by_loop.items():
            loop.call_soon_threadsafe(_deliver, delivered)

    def _fail_all(self, error: Exception) -> None:
        """A step failed (the loop has aborted every request) or the engine process is gone."""
        with self._lock:
            waiters, self._waiters = self._waiters, {}
        alive = self._host.alive()
        for rid, waiter in waiters.items():
            if waiter.stream is not None:
                waiter.send(waiter.stream.put, error)
            else:
                waiter.send(_reject, waiter.future, error)
            if alive:  # a request whose add was still on its way when the step failed: it must not run
                self._send_abort(rid)
        if not alive:  # nothing will answer the calls in flight either
            calls, self._calls = self._calls, {}
            for loop, future in calls.values():
                loop.call_soon_threadsafe(_reject, future, error)

    async def _call(self, method: str, *args):
        """LLMEngine.<method>(*args) where the engine runs; its result or its exception."""
        self._check_running()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        call_id = next(self._call_ids)
        self._calls[call_id] = (loop, future)
        try:
            self._host.send(("call", call_id, method, args))
        except RuntimeError:  # the engine process is gone
            self._calls.pop(call_id, None)
            raise
        return await future

    async def _start(self, rid: str, waiter: _Waiter, method: str, *args) -> None:
        """Registers the waiter, then adds the call where the engine runs (a refused or cancelled one leaves
        nothing behind)."""
        with self._lock:
            if rid in self._waiters:
                raise ValueError(f"request_id {rid!r} is already running")
            self._waiters[rid] = waiter
        try:
            await self._call(method, *args)
        except BaseException:  # refused, or the caller was cancelled while the add was on its way
            with self._lock:
                if self._waiters.get(rid) is waiter:
                    del self._waiters[rid]
            self._send_abort(rid)  # after the add where the engine runs: whatever it added leaves
            raise

    def _abort(self, rid: str, waiter: _Waiter) -> None:
        with self._lock:
            if self._waiters.get(rid) is not waiter:
                return
            del self._waiters[rid]
        self._send_abort(rid)

    def _send_abort(self, rid: str) -> None:
        try:
            self._host.send(("abort", rid))
        except RuntimeError:
            pass  # the engine is gone, and its requests with it

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
        if self._caller_detokenizes and text_by_caller(params):
            waiter.text = StreamText(self.tokenizer, params)
        finished, not_before = False, 0.0
        children = await self._requests(self._inputs.generation, rid, prompt, params)
        try:
            await self._start(rid, waiter, "add_generation_requests", rid, prompt, children)
            while not finished:
                out = await waiter.stream.get(not_before)
                if waiter.text is not None:  # the steps since the last read, merged: decoded in one call
                    waiter.text.fill(out)
                finished = out.finished
                yield out
                not_before = loop.time() + interval_s
        finally:
            if not finished:
                self._abort(rid, waiter)

    async def embed(self, prompts: list[str | list[int]], params: PoolingParams | None = None) -> list[PoolingRequestOutput]:
        return await self._pool(self._inputs.embed, prompts, params)

    async def score(self, text_1: str | list[str], text_2: str | list[str],
                    params: PoolingParams | None = None) -> list[PoolingRequestOutput]:
        return await self._pool(self._inputs.score, text_1, text_2, params)

    async def classify(self, prompts: list[str | list[int]], params: PoolingParams | None = None) -> list[PoolingRequestOutput]:
        return await self._pool(self._inputs.classify, prompts, params)

    async def _pool(self, make_job: Callable[..., PoolingJob], *args) -> list[PoolingRequestOutput]:
        rid = f"pool-{uuid.uuid4().hex}"
        job = await self._requests(make_job, rid, *args)
        waiter = _Waiter(asyncio.get_running_loop())
        waiter.future = waiter.loop.create_future()
        await self._start(rid, waiter, "add_pooling_job", job)
        try:
            return await waiter.future
        finally:
            if not waiter.future.done():  # cancelled: its requests leave the engine
                self._abort(rid, waiter)

    async def _requests(self, make: Callable, *args):
        """The engine requests of a call, made on a worker thread: encoding a long prompt or a large batch
        takes milliseconds to seconds, which the event loop must not wait through."""
        self._check_running()
        return await asyncio.get_running_loop().run_in_executor(None, make, *args)

    def _check_running(self) -> None:
        if not self._host.alive():
            raise RuntimeError("the engine is not running")

    async def tokenize_async(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Off the event loop: a long text takes milliseconds."""
        return await asyncio.get_running_loop().run_in_executor(None, self.tokenize, text, add_special_tokens)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> str:
        return apply_chat_template(self.tokenizer, messages, add_generation_prompt, continue_final_message,
                                   chat_template_kwargs)

    def stats(self) -> dict:
        """The snapshot taken when the latest step started (its batch running) or ended: counters,
        running/waiting, KV usage, and histograms as {"buckets", "counts" (per bucket, last is
        +Inf), "sum", "count"}."""
        return self._snapshot

    def stalled_for(self) -> float:
        """Seconds the engine's loop has had work without reporting a step (0 when idle); inf if it is
        gone. Health checks use it to tell a wedged loop from a busy one."""
        if not self._host.alive():
            return float("inf")
        if not self._waiters:
            return 0.0
        return time.monotonic() - self._heartbeat

    def shutdown(self) -> None:
        self._host.close()


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
