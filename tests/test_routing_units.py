"""Units of the cluster-side pieces that need no Ray cluster: the prefix router's choice, the
cluster-wide stats registry, the per-request caps, the fair slicing of pooling requests and the
pacing of streamed chunks."""
import asyncio
from types import SimpleNamespace

import pytest

from cluster.prefix_router import CHARS_PER_BLOCK, PrefixAwareRouter, prefix_hashes, request_text
from cluster.replica_stats import RETIRED, DeploymentStats
from deployments.errors import APIError
from deployments.metrics import render_prometheus
from deployments.limits import Admission, ServingLimits, in_slices
from deployments.protocol import ChatCompletionRequest, CompletionRequest, RerankRequest
from deployments.serving_generation import GenerationServing
from engine import AsyncLLM, EngineConfig

SYSTEM = "You answer questions about the servecluster project, briefly and exactly. " * 4


def replica(name: str, kv: float = 0.1):
    return SimpleNamespace(replica_id=name, routing_stats={"kv_cache_usage": kv})


def router(queues: dict[str, int] | None = None, **kwargs) -> PrefixAwareRouter:
    r = PrefixAwareRouter.__new__(PrefixAwareRouter)  # no Serve machinery: only the policy
    r._replica_queue_len_cache = SimpleNamespace(get=lambda rid: (queues or {}).get(rid))
    r._replicas = {name: replica(name) for name in "abc"}  # curr_replicas
    r._deployment_id = SimpleNamespace(name="unit-test")
    r.initialize_state(**kwargs)
    return r


def pending(body) -> SimpleNamespace:
    return SimpleNamespace(args=[body])


def chat(user: str) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])


def test_router_picks_the_replica_holding_the_prefix():
    a, b, c = replica("a"), replica("b"), replica("c")
    r = router()
    assert r.rank_by_prefix([a, b, c], pending(chat("first"))) is None  # nothing known: Serve's default
    r.on_request_routed(pending(chat("first")), "b", None)
    ranked = r.rank_by_prefix([a, b, c], pending(chat("the next turn")))
    assert [x.replica_id for x in ranked[0]] == ["b"] and {x.replica_id for x in ranked[1]} == {"a", "c"}


def test_router_follows_the_longest_prefix_and_rerank_queries():
    a, b = replica("a"), replica("b")
    r = router()
    r.on_request_routed(pending(chat("x")), "a", None)
    longer = ChatCompletionRequest(messages=[{"role": "system", "content": SYSTEM},
                                             {"role": "user", "content": "long question " * 20}])
    r.on_request_routed(pending(longer), "b", None)
    follow_up = ChatCompletionRequest(messages=[*longer.messages, {"role": "assistant", "content": "ok"},
                                                {"role": "user", "content": "more"}])
    assert [x.replica_id for x in r.rank_by_prefix([a, b], pending(follow_up))[0]] == ["b"]
    query = "which documents talk about paged attention and prefix caching in engines? " * 2
    r.on_request_routed(pending(RerankRequest(query=query, documents=["d1"])), "a", None)
    assert [x.replica_id for x in r.rank_by_prefix([a, b], pending(RerankRequest(query=query, documents=["d2"])))[0]] \
        == ["a"]


def test_router_falls_back_when_imbalanced_or_cache_full():
    a, b = replica("a"), replica("b")
    r = router(queues={"a": 12, "b": 0}, imbalanced_threshold=8)
    r.on_request_routed(pending(chat("first")), "a", None)
    assert r.rank_by_prefix([a, b], pending(chat("next"))) is None  # a is 12 deep, b idle: shortest queue wins
    full = router(kv_usage_limit=0.9)
    full.on_request_routed(pending(chat("first")), "a", None)
    assert full.rank_by_prefix([replica("a", kv=0.97), b], pending(chat("next"))) is None


def test_request_text_and_hashes():
    assert request_text([chat("q")]).startswith("system\x00" + SYSTEM)
    assert len(prefix_hashes("x" * (CHARS_PER_BLOCK * 3 + 5))) == 3
    assert prefix_hashes("short") == []
    h1, h2 = prefix_hashes("a" * 64 + "b" * 64), prefix_hashes("c" * 64 + "b" * 64)
    assert h1[1] != h2[1]  # chained: a block's hash covers everything before it


def snapshot(replica_id: str, prompt_tokens: int) -> dict:
    return {"model_name": "m", "replica": replica_id, "num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0,
            "prompt_tokens_total": prompt_tokens, "generation_tokens_total": 1,
            "request_success_total": {"stop": 1},
            "ttft_seconds": {"buckets": [0.1, 1.0], "counts": [1, 0, 0], "sum": 0.05, "count": 1}}


def test_counters_survive_a_replica_restart():
    stats = DeploymentStats()
    stats.update({"r1": snapshot("r1", 100), "r2": snapshot("r2", 50)})
    stats.update({"r2": snapshot("r2", 60), "r3": snapshot("r3", 5)})  # r1 died, r3 replaced it
    by_replica = {s["replica"]: s for s in stats.snapshots()}
    assert set(by_replica) == {"r2", "r3", RETIRED}
    assert by_replica[RETIRED]["prompt_tokens_total"] == 100
    assert sum(s["prompt_tokens_total"] for s in by_replica.values()) == 165  # never below the 150 before
    text = render_prometheus(stats.snapshots())
    assert 'vllm:prompt_tokens_total{model_name="m",replica="retired"} 100.0' in text
    assert 'vllm:time_to_first_token_seconds_count{model_name="m",replica="retired"} 1.0' in text


def test_input_and_token_caps():
    limits = ServingLimits(max_inputs_per_request=3, max_tokens_per_request=20)
    limits.check_inputs(3, "input")
    with pytest.raises(APIError, match="max_inputs_per_request=3") as e:
        limits.check_inputs(4, "input")
    assert e.value.status == 400 and e.value.param == "input"

    async def count(text: str) -> int:
        return len(text.split())
    asyncio.run(limits.check_tokens(["a b c", [1, 2, 3]], "input", count))  # few characters: not even counted
    asyncio.run(limits.check_tokens(["word " * 10, "w " * 9], "input", count))  # 19 tokens
    with pytest.raises(APIError, match="max_tokens_per_request=20"):
        asyncio.run(limits.check_tokens(["word " * 10, "w " * 9, [1, 2]], "input", count))


def test_pooling_slices_keep_order_and_bound_work_in_flight():
    in_flight, most = [0], [0]

    async def run(chunk):
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        await asyncio.sleep(0.001)
        in_flight[0] -= 1
        return [x * 2 for x in chunk]
    assert asyncio.run(in_slices(run, list(range(1000)), 64)) == [x * 2 for x in range(1000)]
    assert most[0] == 2


def test_cancelled_slices_stop_submitting():
    started = []

    async def run(chunk):
        started.append(chunk[0])
        await asyncio.sleep(10)
        return chunk

    async def main():
        task = asyncio.ensure_future(in_slices(run, list(range(1000)), 10))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(main())
    assert started == [0, 10]


@pytest.mark.usefixtures("one_thread")
def test_stream_chunks_are_paced_by_the_batching_interval(tiny_model):
    """A stream sends its first chunk at once and then at most one per stream_batching_interval_ms,
    each with every token since the last: with an interval longer than the generation, the first
    chunk and the finishing one (then the usage). A stream closed early leaves nothing running."""
    engine = AsyncLLM(EngineConfig(tiny_model("llama"), dtype="float32"))
    req = CompletionRequest(model="m", prompt="a b c", max_tokens=12, temperature=0, ignore_eos=True, stream=True,
                            stream_options={"include_usage": True})

    async def chunks(interval_ms: float) -> list:
        serving = GenerationServing(engine, "m", Admission(engine, ServingLimits(stream_batching_interval_ms=interval_ms)))
        return [c async for c in serving.completions_stream(req)]

    async def closed_early() -> bool:
        """A stream its caller closes after the first chunk (a client that left) aborts its request."""
        serving = GenerationServing(engine, "m", Admission(engine, ServingLimits()))
        stream = serving.completions_stream(req.model_copy(update={"max_tokens": 100}))
        await anext(stream)
        await stream.aclose()
        for _ in range(1000):  # a step in flight may still finish first
            if not await engine._call("has_unfinished"):
                break
        return await engine._call("has_unfinished")

    async def run():
        # the bound only turns a hang into a failure
        return await chunks(0), await asyncio.wait_for(chunks(3.6e6), 120), await closed_early()
    try:
        every, paced, left_running = asyncio.run(run())
    finally:
        engine.shutdown()
    assert not left_running
    assert len(paced) == 3 and paced[-1].usage.completion_tokens == 12 and len(every) > 3
    assert "".join(c.choices[0].text for c in paced[:2]) == "".join(c.choices[0].text for c in every[:-1])
    assert paced[1].choices[0].finish_reason == "length"
