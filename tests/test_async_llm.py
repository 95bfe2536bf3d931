"""AsyncLLM, the server's engine: its loop steps and hands each step's outputs to the callers' event
loops (one wake-up per loop per step). Streams carry every delta in order and end as the offline API
ends, callers on two event loops each get their own, a stream closed early leaves nothing in the
engine, and a paced or lagging reader gets the steps it did not read merged into one output (the
OutputCollector); with and without async scheduling, the loop on a thread or in a process of its own.
In a process of its own, errors keep their type across the pipe and a dead engine fails what waits."""
import asyncio
import gc
import math
import os
import signal
import statistics
import threading
import time
import weakref

import pytest

from conftest import assert_pool_free, sentence
from engine import LLM, AsyncLLM, EngineConfig, LLMEngine, SamplingParams
from engine.heap import YOUNG_GC_THRESHOLD
from engine.output_collector import OutputCollector
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.params import RequestOutputKind

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [sentence(900 + i, 4 + 5 * i) for i in range(6)]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, output_kind=RequestOutputKind.DELTA)


# engine_process spelled out: its default is on where CUDA is.
HOSTS = {"sync": dict(async_scheduling=False, engine_process=False),
         "async-scheduling": dict(async_scheduling=True, engine_process=False),
         "engine-process": dict(async_scheduling=True, engine_process=True)}


@pytest.fixture(scope="module", params=list(HOSTS))
def engine(request, tiny_model):
    llm = AsyncLLM(EngineConfig(tiny_model("llama"), dtype="float32", block_size=8, **HOSTS[request.param]))
    yield llm
    llm.shutdown()


def assert_nothing_left(llm: AsyncLLM) -> None:
    if llm.config.engine_process:  # the pool is in the other process: its numbers
        stats = asyncio.run(llm._call("stats_snapshot"))
        assert stats["num_running"] == stats["num_waiting"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]
        assert not llm._waiters
    else:
        assert_pool_free(llm)


async def stream(llm: AsyncLLM, prompt: str) -> tuple[list[int], str, str]:
    ids, text, reason = [], "", None
    async for out in llm.generate(prompt, PARAMS):
        ids += out.outputs[0].token_ids
        text += out.outputs[0].text
        reason = out.outputs[0].finish_reason
    return ids, text, reason


def test_concurrent_streams_carry_every_delta(engine, tiny_model):
    want = LLM(tiny_model("llama"), dtype="float32", block_size=8).generate(PROMPTS, PARAMS)

    async def run():
        return await asyncio.gather(*[stream(engine, p) for p in PROMPTS])
    got = asyncio.run(run())
    assert got == [(w.outputs[0].token_ids, w.outputs[0].text, "length") for w in want]


def test_callers_on_two_event_loops_each_get_their_own(engine):
    results: dict[int, list] = {}

    def caller(k: int) -> None:
        async def run():
            return await asyncio.gather(*[stream(engine, p) for p in PROMPTS[k::2]])
        results[k] = asyncio.run(run())
    threads = [threading.Thread(target=caller, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    alone = asyncio.run(stream(engine, PROMPTS[0]))
    assert len(results[0]) == 3 and len(results[1]) == 3 and results[0][0] == alone
    assert all(len(ids) == 12 for ids, _, _ in results[0] + results[1])


def test_a_stream_closed_early_leaves_nothing(engine):
    async def run():
        gen = engine.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True,
                                                         output_kind=RequestOutputKind.DELTA))
        async for _ in gen:
            break
        await gen.aclose()  # sends the abort to the engine's loop, ahead of the calls below
        # With async scheduling a step launched before the abort is still in flight: the loop's next
        # step takes its results (and drops the aborted request's token).
        for _ in range(1000):
            if not await engine._call("has_unfinished"):
                break
        return await engine._call("has_unfinished"), engine._waiters.copy()
    unfinished, waiters = asyncio.run(run())
    assert not unfinished and not waiters
    assert_nothing_left(engine)


def test_a_paced_stream_sends_the_first_output_then_the_rest_merged(engine):
    """An interval longer than the generation: the first output comes at once, the finishing one
    as soon as the request ends, with every token, text piece and logprob between."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2,
                            output_kind=RequestOutputKind.DELTA)

    async def read(interval_s: float) -> list[RequestOutput]:
        return [out async for out in engine.generate(PROMPTS[2], params, interval_s=interval_s)]

    async def run():
        return await read(0.0), await asyncio.wait_for(read(3600.0), 120)  # the bound only turns a hang into a failure
    every, paced = asyncio.run(run())
    assert len(paced) == 2 and not paced[0].finished and paced[1].finished
    steps = [o.outputs[0] for o in every]
    merged = [o.outputs[0] for o in paced]
    for field in ("token_ids", "logprobs"):
        assert sum((getattr(o, field) for o in merged), []) == sum((getattr(o, field) for o in steps), [])
    assert "".join(o.text for o in merged) == "".join(o.text for o in steps)
    assert merged[1].finish_reason == "length" and merged[1].cumulative_logprob == steps[-1].cumulative_logprob


def _delta(index: int, ids: list[int], finish: str | None = None, finished: bool = False) -> RequestOutput:
    lps = [{i: Logprob(-0.5)} for i in ids]
    return RequestOutput("r", None, [1], [CompletionOutput(index, "".join(map(str, ids)), list(ids), -float(ids[-1]),
                                                           lps, finish)], finished)


def test_a_lagging_reader_gets_one_output_with_every_delta():
    async def run():
        delta = OutputCollector(RequestOutputKind.DELTA)
        for out in (_delta(0, [1]), _delta(1, [2]), _delta(0, [3, 4], "stop"), _delta(1, [5], "length", True)):
            delta.put(out)
        cumulative = OutputCollector(RequestOutputKind.CUMULATIVE)
        cumulative.put(_delta(0, [1]))
        cumulative.put(_delta(0, [1, 2]))
        failed = OutputCollector(RequestOutputKind.DELTA)
        failed.put(RuntimeError("engine step failed"))
        failed.put(_delta(0, [1]))  # an error stays: nothing after it is read
        with pytest.raises(RuntimeError):
            await failed.get()
        return await delta.get(), await cumulative.get()
    delta, cumulative = asyncio.run(run())
    assert delta.finished and [(o.index, o.token_ids, o.text, o.finish_reason, o.cumulative_logprob, len(o.logprobs))
                               for o in delta.outputs] == [(0, [1, 3, 4], "134", "stop", -4.0, 3),
                                                           (1, [2, 5], "25", "length", -5.0, 2)]
    assert cumulative.outputs[0].token_ids == [1, 2]


def test_a_paced_read_waits_for_its_time_unless_the_request_ends():
    async def run():
        loop = asyncio.get_running_loop()
        collector = OutputCollector(RequestOutputKind.DELTA)
        collector.put(_delta(0, [1]))
        early = asyncio.ensure_future(collector.get(loop.time() + 3600))
        await asyncio.sleep(0.05)
        collector.put(_delta(0, [2]))  # merged; the paced reader is not woken for it
        waited = not early.done() and not collector._waiter.done()
        collector.put(_delta(0, [3], "stop", finished=True))  # ends the request: released at once
        return waited, await asyncio.wait_for(early, 120)
    waited, out = asyncio.run(run())
    assert waited and out.finished and out.outputs[0].token_ids == [1, 2, 3]


def test_paced_readers_are_woken_when_their_time_comes_on_uvloop():
    """Ray Serve runs replicas on uvloop, whose clock reads whole milliseconds and ticks between any two reads,
    and whose timers fire in the millisecond they are due, before a not_before a hair past it (time + interval
    often is, by float noise). The collector compared the clock again after each wake-up, and a tick between
    its two reads left a reader waiting with tokens pending and no timer until its request ended (streams
    stalled 0.7-3.0 s through Serve, 64 at once; here ~8 of 64 readers in a run). 64 paced readers fed every
    ~0.5 ms: none may wait much longer than the others (a pause of the whole loop delays them all)."""
    uvloop = pytest.importorskip("uvloop")  # installed with ray[serve]
    interval, steps = 0.002, 2000

    async def run() -> list[float]:
        loop = asyncio.get_running_loop()
        collectors = [OutputCollector(RequestOutputKind.DELTA) for _ in range(64)]

        async def produce() -> None:
            for step in range(steps):
                for c in collectors:
                    c.put(_delta(0, [step]))
                await asyncio.sleep(0.0005)
            for c in collectors:
                c.put(_delta(0, [-1], "length", finished=True))

        async def read(c: OutputCollector) -> float:
            longest, not_before, last = 0.0, 0.0, time.perf_counter()
            while True:
                out = await c.get(not_before)
                now = time.perf_counter()
                longest, last = max(longest, now - last), now
                if out.finished:
                    return longest
                not_before = math.nextafter(loop.time() + interval, math.inf)
        producer = asyncio.ensure_future(produce())
        longest = await asyncio.gather(*(read(c) for c in collectors))
        await producer
        return longest
    gc.disable()  # a full collection pauses every reader; this test is about single ones
    try:
        longest = uvloop.run(run())
    finally:
        gc.enable()
    assert max(longest) < statistics.median(longest) + 0.1


def test_engine_process_errors_cross_with_their_type_and_pooling_works(tiny_model):
    llm = AsyncLLM(EngineConfig(tiny_model("bert"), task="embed", engine_process=True))

    async def run():
        with pytest.raises(ValueError, match="maximum context length"):  # the input processor's 400
            await llm.embed(["word " * 1000], None)
        return await llm.embed(PROMPTS[:3])
    try:
        outs = asyncio.run(run())
        assert_nothing_left(llm)
    finally:
        llm.shutdown()
    want = LLM(tiny_model("bert"), task="embed").embed(PROMPTS[:3])
    for o, w in zip(outs, want, strict=True):
        assert o.outputs.embedding == pytest.approx(w.outputs.embedding, abs=1e-5)


def test_a_dead_engine_process_fails_what_waits_and_what_comes(tiny_model):
    llm = AsyncLLM(EngineConfig(tiny_model("llama"), dtype="float32", engine_process=True))
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def run():
        gen = llm.generate(PROMPTS[1], params)
        await anext(gen)
        os.kill(llm._host._process.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="engine process exited"):
            async for _ in gen:
                pass
        with pytest.raises(RuntimeError, match="not running"):
            await llm.embed(PROMPTS[:1])
    try:
        asyncio.run(asyncio.wait_for(run(), 120))  # the bound only turns a hang into a failure
        assert llm.stalled_for() == float("inf")
    finally:
        llm.shutdown()


FAILING_MAX_TOKENS = 13


def failing_engine(config: EngineConfig) -> LLMEngine:
    """An engine whose step raises while a request with FAILING_MAX_TOKENS is scheduled (module-level, so an
    engine process can build it)."""
    engine = LLMEngine(config)
    execute = engine.runner.execute

    def execute_or_fail(sched):
        if any(r.sampling_params is not None and r.sampling_params.max_tokens == FAILING_MAX_TOKENS
               for r in sched.requests):
            raise RuntimeError("injected step failure")
        return execute(sched)
    engine.runner.execute = execute_or_fail
    return engine


@pytest.mark.parametrize("engine_process", [False, True], ids=["thread", "engine-process"])
def test_a_failed_step_fails_its_callers_and_the_engine_serves_on(engine_process, tiny_model):
    llm = AsyncLLM(EngineConfig(tiny_model("llama"), dtype="float32", block_size=8, engine_process=engine_process),
                   failing_engine)
    doomed = SamplingParams(temperature=0.0, max_tokens=FAILING_MAX_TOKENS, output_kind=RequestOutputKind.DELTA)

    async def run():
        with pytest.raises(RuntimeError, match="injected step failure"):
            async for _ in llm.generate(PROMPTS[0], doomed):
                pass
        return await stream(llm, PROMPTS[1])
    try:
        ids, _, reason = asyncio.run(asyncio.wait_for(run(), 120))  # the bound only turns a hang into a failure
        assert len(ids) == PARAMS.max_tokens and reason == "length"
        assert_nothing_left(llm)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("interval_s", [0.0, 0.05], ids=["every-step", "paced"])
def test_engine_process_streams_have_the_engines_text_with_stop_tokens_and_choices(tiny_model, interval_s):
    """In a process of its own the engine leaves a stream's text to the caller's process: the same text,
    choice by choice, as the engine's own detokenizing, a stop token or EOS left out of it, whether the
    reader takes every step or a paced reader the steps of its interval merged (decoded at the read)."""
    offline = LLM(tiny_model("llama"), dtype="float32", block_size=8)
    first = offline.generate(PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    stop_token = first.outputs[0].token_ids[6]  # greedy reaches it: the stream ends on it
    cases = [SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_token], ignore_eos=True),
             SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=10)]
    want = [[(o.token_ids, o.text, o.finish_reason) for o in offline.generate(PROMPTS[3], p)[0].outputs]
            for p in cases]
    llm = AsyncLLM(EngineConfig(tiny_model("llama"), dtype="float32", block_size=8, engine_process=True))

    async def read(params: SamplingParams) -> list[tuple]:
        params.output_kind = RequestOutputKind.DELTA
        choices: dict[int, tuple] = {}
        async for out in llm.generate(PROMPTS[3], params, interval_s=interval_s):
            for o in out.outputs:
                ids, text, _ = choices.get(o.index, ([], "", None))
                choices[o.index] = (ids + o.token_ids, text + o.text, o.finish_reason)
        return [choices[i] for i in sorted(choices)]
    try:
        got = [asyncio.run(read(p)) for p in cases]
    finally:
        llm.shutdown()
    assert got == want
    assert want[0][0][2] == "stop" and want[0][0][0][-1] == stop_token


def slow_to_add_engine(config: EngineConfig) -> LLMEngine:
    """An engine whose add takes a while, so a caller can be cancelled with its add on the way."""
    engine = LLMEngine(config)
    add = engine.add_generation_requests

    def slow_add(*args):
        time.sleep(0.5)
        add(*args)
    engine.add_generation_requests = slow_add
    return engine


@pytest.mark.parametrize("engine_process", [False, True], ids=["thread", "engine-process"])
def test_a_caller_cancelled_while_its_add_is_on_the_way_leaves_nothing(engine_process, tiny_model):
    llm = AsyncLLM(EngineConfig(tiny_model("llama"), dtype="float32", block_size=8, engine_process=engine_process),
                   slow_to_add_engine)
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def run():
        first = asyncio.ensure_future(anext(llm.generate(PROMPTS[1], params)))
        await asyncio.sleep(0.1)  # the add is being applied where the engine runs
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await llm._call("has_unfinished")  # answered after the add and the abort that follows it
    try:
        assert not asyncio.run(asyncio.wait_for(run(), 120))
        assert_nothing_left(llm)
    finally:
        llm.shutdown()


def engine_without_input_processing(config: EngineConfig) -> LLMEngine:
    """An engine that cannot turn calls into requests itself (module-level, so an engine process can build it)."""
    engine = LLMEngine(config)
    engine.input_processor = None
    return engine


@pytest.mark.parametrize("engine_process", [False, True], ids=["thread", "engine-process"])
def test_calls_become_requests_where_the_caller_runs(engine_process, tiny_model):
    """Prompts and score pairs are encoded on the caller's side (a worker thread of its process), as vLLM's
    frontend does, so the engine's loop never stops stepping to tokenize a large call: the engine receives
    requests of token ids, and answers as the offline engine does."""
    kwargs = dict(dtype="float32", block_size=4, engine_process=engine_process)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    score = dict(task="score", score_tokens=("no", "yes"))

    async def run(llm: AsyncLLM, call):
        return [out async for out in llm.generate(PROMPTS[2], params)][-1] if call == "generate" else \
            await llm.score(PROMPTS[0], PROMPTS[1:4])
    got = {}
    for call, extra in (("generate", {}), ("score", score)):
        llm = AsyncLLM(EngineConfig(tiny_model("llama"), **kwargs, **extra), engine_without_input_processing)
        try:
            got[call] = asyncio.run(asyncio.wait_for(run(llm, call), 120))
            assert_nothing_left(llm)
        finally:
            llm.shutdown()
    offline = LLM(tiny_model("llama"), dtype="float32", block_size=4)
    want = offline.generate(PROMPTS[2], params)[0].outputs[0]
    assert (got["generate"].outputs[0].token_ids, got["generate"].outputs[0].text) == (want.token_ids, want.text)
    want_scores = [o.outputs.score for o in LLM(tiny_model("llama"), dtype="float32", block_size=4, **score)
                   .score(PROMPTS[0], PROMPTS[1:4])]
    assert [o.outputs.score for o in got["score"]] == pytest.approx(want_scores, abs=1e-6)


@pytest.mark.parametrize("engine_process", [False, True], ids=["thread", "engine-process"])
def test_the_callers_start_up_heap_is_frozen_and_a_shut_down_engine_is_freed(engine_process, tiny_model):
    """The server's process freezes what it built, as the engine's does: with the engine in a process of its own
    nothing froze it, and its full collections walked ~500k start-up objects (~250 ms each here) while every
    stream waited. Frozen objects are never collected, so nothing of an AsyncLLM may sit in a reference cycle:
    shut down and dropped, it goes at once."""
    llm = AsyncLLM(EngineConfig(tiny_model("llama"), dtype="float32", block_size=8, engine_process=engine_process))
    try:
        assert asyncio.run(stream(llm, PROMPTS[0]))[2] == "length"
        tracked = {id(o) for o in gc.get_objects()}
        assert id(llm.tokenizer) not in tracked and id(llm._inputs) not in tracked
        assert gc.get_threshold()[0] == YOUNG_GC_THRESHOLD
    finally:
        llm.shutdown()
    freed = weakref.ref(llm)
    del llm
    assert freed() is None
