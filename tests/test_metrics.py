"""The engine's /metrics numbers: pooling requests count as running while the model works on
them (vllm:num_requests_running), as vLLM counts the batch it executes."""
import asyncio
import threading

import pytest

from engine import LLM, AsyncLLM, EngineConfig
from conftest import sentence

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [sentence(700 + i, 6) for i in range(6)]


def test_pooling_batch_counts_as_running_while_it_runs(tiny_model):
    llm = LLM(tiny_model("bert"), task="embed", max_num_batched_tokens=32)  # a few prompts per step
    seen = []
    llm.engine.on_batch_start = seen.append
    llm.embed(PROMPTS)
    assert len(seen) > 1 and all(s["num_running"] > 0 for s in seen)
    assert sum(s["num_running"] for s in seen) == len(PROMPTS)  # each prompt ran in exactly one step
    assert seen[0]["num_waiting"] == len(PROMPTS) - seen[0]["num_running"]
    assert llm.engine.stats_snapshot()["num_running"] == 0


def test_async_engine_reports_the_running_batch(tiny_model):
    engine = AsyncLLM(EngineConfig(tiny_model("bert"), task="embed"))
    release = threading.Event()
    execute = engine.engine.runner.execute

    def held_execute(sched):  # the model is "working" until the test has looked at /metrics
        release.wait(timeout=60)
        return execute(sched)
    engine.engine.runner.execute = held_execute

    async def scenario():
        job = asyncio.ensure_future(engine.embed(PROMPTS))
        for _ in range(6000):  # bounds a hang only
            if engine.stats()["num_running"] == len(PROMPTS):
                break
            await asyncio.sleep(0.01)
        during = engine.stats()
        release.set()
        return during, await job

    try:
        during, outs = asyncio.run(scenario())
    finally:
        release.set()
        engine.shutdown()
    assert during["num_running"] == len(PROMPTS) and during["num_waiting"] == 0
    assert len(outs) == len(PROMPTS)
    assert engine.stats()["num_running"] == 0


def test_prefix_cache_counters_count_queried_and_hit_tokens(tiny_model):
    """vllm:prefix_cache_queries/hits: tokens looked up at admission and tokens found cached."""
    from deployments.metrics import render_prometheus
    from engine import SamplingParams
    llm = LLM(tiny_model("llama"), block_size=4, dtype="float32")
    prompt = sentence(800, 30)
    params = SamplingParams(max_tokens=1, temperature=0)
    first = llm.generate(prompt, params)[0]
    n = len(first.prompt_token_ids)
    assert llm.engine.stats_snapshot()["prefix_cache_queries_total"] == n
    assert llm.engine.stats_snapshot()["prefix_cache_hits_total"] == 0
    second = llm.generate(prompt, params)[0]
    snap = llm.engine.stats_snapshot()
    assert snap["prefix_cache_queries_total"] == 2 * n
    assert snap["prefix_cache_hits_total"] == second.num_cached_tokens == (n - 1) // 4 * 4 > 0
    text = render_prometheus([{**snap, "model_name": "m", "replica": "r1"}])
    assert f'vllm:prefix_cache_hits_total{{model_name="m",replica="r1"}} {float(second.num_cached_tokens)}' in text
    assert f'vllm:prefix_cache_queries_total{{model_name="m",replica="r1"}} {float(2 * n)}' in text


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_inter_token_latency_counts_one_gap_per_generation_per_later_step(tiny_model, async_scheduling):
    """vllm:inter_token_latency_seconds: a generation's tokens after its first, one gap each step that gives it
    any (n > 1 choices share their generation's steps), including requests that arrive while others run."""
    from engine import SamplingParams
    llm = LLM(tiny_model("llama"), dtype="float32", async_scheduling=async_scheduling)
    eng = llm.engine
    lengths = {"a": 5, "b": 3, "c": 4}
    for i, (rid, n) in enumerate(lengths.items()):
        eng.add_generation(rid, PROMPTS[i], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                                           n=2 if rid == "c" else 1))
        eng.step()  # each request arrives one step after the one before
    while eng.has_unfinished():
        eng.step()
    stats = eng.stats_snapshot()
    itl = stats["inter_token_seconds"]
    assert itl["count"] == sum(n - 1 for n in lengths.values())
    assert itl["sum"] > 0
    assert stats["generation_tokens_total"] == 5 + 3 + 2 * 4
