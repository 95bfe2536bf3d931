"""AsyncLLM, the server's engine: its thread steps and hands each step's outputs to the callers' event
loops (one wake-up per loop per step). Streams carry every delta in order and end as the offline API
ends, callers on two event loops each get their own, and a stream closed early leaves nothing in the
engine; with and without async scheduling."""
import asyncio
import threading

import pytest

from conftest import assert_pool_free, sentence
from engine import LLM, AsyncLLM, EngineConfig, SamplingParams
from engine.params import RequestOutputKind

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [sentence(900 + i, 4 + 5 * i) for i in range(6)]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, output_kind=RequestOutputKind.DELTA)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async-scheduling"])
def engine(request, tiny_model):
    llm = AsyncLLM(EngineConfig(tiny_model("llama"), dtype="float32", block_size=8, async_scheduling=request.param))
    yield llm
    llm.shutdown()


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
        await gen.aclose()  # puts the abort in the engine thread's inbox, ahead of the calls below
        # With async scheduling a step launched before the abort is still in flight: the thread's next
        # step takes its results (and drops the aborted request's token).
        for _ in range(1000):
            if not await engine._call(engine.engine.has_unfinished):
                break
        return await engine._call(lambda: (engine.engine.has_unfinished(), engine._waiters.copy()))
    unfinished, waiters = asyncio.run(run())
    assert not unfinished and not waiters
    assert_pool_free(engine)
