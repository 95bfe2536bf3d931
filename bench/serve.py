"""HTTP serving overhead: the same embeddings and rerank workloads through the Serve ingress
(loopback HTTP) and on the in-process async engine, side by side.

Open-loop Poisson arrivals at a fixed rate, a fixed request count, at most `--concurrency`
requests in flight; it stops by itself and talks only to 127.0.0.1. Prints requests/s and
p50/p99 latency per route and the HTTP/in-process throughput ratio.

    python bench/serve.py                  # defaults: 200 embedding requests, 40 rerank requests
    python bench/serve.py --requests 400 --concurrency 32
    python bench/serve.py --scifact        # the whole SciFact corpus through /v1/embeddings: NDCG@10
    python bench/serve.py --streams        # streamed completions: tokens/s by stream_batching_interval_ms

`--scifact` serves all-MiniLM-L6-v2 as serve_config.yaml does (max_model_len from its
sentence_bert_config.json, `auto_truncate` on, no truncate_prompt_tokens in any request), embeds
all 5,183 documents and the test queries over HTTP and scores retrieval against the published
NDCG@10 (0.64508).

`--streams` runs `--concurrency` streamed /v1/completions at once (128 tokens each, EOS ignored) for
each `limits.stream_batching_interval_ms` in `--intervals`, on the tests' 2-layer random Llama: its
steps are nearly free, as a GPU's are next to Ray's cost per streamed chunk, so what is measured is
the serving path (`--model` runs a real one, e.g. SmolLM2 with `--threads 2`; `--hosts thread process`
runs the engine on a thread of the replica and in a process of its own). Baseline: the same streams
read from the in-process AsyncLLM, its engine hosted the same way. Each row also gives the client's time
between a stream's consecutive chunks (p99 and the longest): a stalled stream shows there.
"""
import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time

import httpx
import numpy as np
import ray
from ray import serve

from common import ROOT, SCIFACT, load_scifact, pct, print_machine, ratio, table
from cluster.local_cluster import free_port

sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import build_decoder  # noqa: E402 (the tests' tiny models)
from deployments.builder import AppArgs, ModelArgs, build_app
from embed import PUBLISHED_NDCG10, ndcg_at_10
from engine import AsyncLLM, EngineConfig, PoolingParams, SamplingParams
from engine.params import RequestOutputKind

EMBED = "sentence-transformers/all-MiniLM-L6-v2"
RERANK = "HuggingFaceTB/SmolLM2-135M-Instruct"
NUM_CPUS = 1.8  # the replica's share; its torch threads = 2, as in-process


def engine_args(route: str) -> dict:
    if route == "embeddings":
        return {"model": EMBED, "task": "embed", "max_model_len": 256}
    return {"model": RERANK, "task": "score", "max_model_len": 1024, "kv_cache_memory_bytes": 256 << 20,
            "max_num_batched_tokens": 4096}


def workload(route: str, n: int, docs: list[str], queries: list[str], rng: random.Random) -> list[dict]:
    """Embeddings: 8 documents a request. Rerank: one query against 16 documents."""
    if route == "embeddings":
        return [{"model": EMBED, "input": rng.sample(docs, 8), "truncate_prompt_tokens": -1} for _ in range(n)]
    return [{"model": RERANK, "query": rng.choice(queries), "documents": rng.sample(docs, 16),
             "truncate_prompt_tokens": -1} for _ in range(n)]


async def drive(send, payloads: list[dict], rate: float, concurrency: int, seed: int) -> tuple[float, list[float]]:
    """Poisson arrivals at `rate`/s, at most `concurrency` in flight; returns (wall seconds, latencies)."""
    rng, gate, latencies = random.Random(seed), asyncio.Semaphore(concurrency), []

    async def one(p):
        async with gate:
            t = time.perf_counter()
            await send(p)
            latencies.append(time.perf_counter() - t)

    start, tasks = time.perf_counter(), []
    for p in payloads:
        tasks.append(asyncio.create_task(one(p)))
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    return time.perf_counter() - start, latencies


async def run_http(route: str, payloads, rate, concurrency, port: int) -> tuple[float, list[float]]:
    model = ModelArgs(**engine_args(route), num_threads=2,
                      deployment_config={"ray_actor_options": {"num_cpus": NUM_CPUS}, "num_replicas": 1,
                                         "max_ongoing_requests": 256})
    serve.run(build_app(AppArgs(models=[model], max_queued_requests=1024,
                                ingress_deployment_config={"ray_actor_options": {"num_cpus": 0.1}})),
              name="bench", route_prefix="/", blocking=False)
    path = "/v1/embeddings" if route == "embeddings" else "/v1/rerank"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits) as client:
        async def send(p):
            r = await client.post(path, json=p)
            r.raise_for_status()
        await send(payloads[0])  # warm-up
        result = await drive(send, payloads, rate, concurrency, seed=1)
    serve.delete("bench")
    return result


async def run_in_process(route: str, payloads, rate, concurrency) -> tuple[float, list[float]]:
    engine = AsyncLLM(EngineConfig(**engine_args(route), num_threads=2))
    params = PoolingParams(truncate_prompt_tokens=-1)

    async def send(p):
        if route == "embeddings":
            await engine.embed(p["input"], params)
        else:
            await engine.score(p["query"], p["documents"], params)
    await send(payloads[0])
    try:
        return await drive(send, payloads, rate, concurrency, seed=1)
    finally:
        engine.shutdown()


async def scifact_over_http(port: int, concurrency: int, batch: int) -> list[list]:
    """Every SciFact document and test query through /v1/embeddings; truncation is the model's
    auto_truncate, so a document over 256 tokens is cut as sentence-transformers cuts it."""
    corpus, queries, qrels = load_scifact(SCIFACT)
    model = ModelArgs(model=EMBED, task="embed", auto_truncate=True, num_threads=2,
                      deployment_config={"ray_actor_options": {"num_cpus": NUM_CPUS}, "num_replicas": 1,
                                         "max_ongoing_requests": 256})
    serve.run(build_app(AppArgs(models=[model], ingress_deployment_config={"ray_actor_options": {"num_cpus": 0.1}})),
              name="bench", route_prefix="/", blocking=False)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=3600) as client:
        async def embed(texts: list[str]) -> list[list[float]]:
            async with gate:
                r = await client.post("/v1/embeddings", json={"model": EMBED, "input": texts})
            r.raise_for_status()
            return [d["embedding"] for d in r.json()["data"]]

        async def embed_all(texts: list[str]) -> np.ndarray:
            parts = await asyncio.gather(*(embed(texts[i:i + batch]) for i in range(0, len(texts), batch)))
            return np.array([v for part in parts for v in part], dtype=np.float32)

        await embed(["warm-up"])
        dids, qids = list(corpus), [q for q in queries if q in qrels]
        start = time.perf_counter()
        d_emb = await embed_all([corpus[d] for d in dids])
        seconds = time.perf_counter() - start
        q_emb = await embed_all([queries[q] for q in qids])
    serve.delete("bench")
    ndcg = ndcg_at_10(q_emb, qids, d_emb, dids, qrels)
    return [["/v1/embeddings, auto_truncate (max_model_len 256)", len(dids), len(dids) / seconds,
             f"{ndcg:.5f}", f"{PUBLISHED_NDCG10:.5f}", f"{ndcg - PUBLISHED_NDCG10:+.5f}"]]


STREAM_TOKENS = 128


async def http_streams(port: int, model: str, concurrency: int) -> tuple[float, int, list[float]]:
    """(tokens/s, SSE chunks, the seconds between a stream's consecutive chunks) of `concurrency` streams at
    once, after one warm-up stream."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gaps: list[float] = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits) as client:
        async def one(i: int) -> tuple[int, int]:
            chunks, tokens, last = 0, 0, None
            body = {"model": model, "prompt": f"Story {i}: once upon a time", "max_tokens": STREAM_TOKENS,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append(now - last)
                        last = now
                        chunk = json.loads(line[6:])
                        chunks += bool(chunk["choices"])
                        tokens = chunk["usage"]["completion_tokens"] if chunk.get("usage") else tokens
            return chunks, tokens
        await one(-1)
        gaps.clear()
        start = time.perf_counter()
        done = await asyncio.gather(*(one(i) for i in range(concurrency)))
        seconds = time.perf_counter() - start
    return sum(t for _, t in done) / seconds, sum(c for c, _ in done), gaps


async def in_process_streams(model: str, concurrency: int, threads: int, engine_process: bool) -> float:
    engine = AsyncLLM(EngineConfig(model=model, num_threads=threads, max_num_seqs=concurrency,
                                   engine_process=engine_process))
    params = SamplingParams(max_tokens=STREAM_TOKENS, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def one(i: int) -> int:
        return sum([len(o.outputs[0].token_ids) async for o in engine.generate(f"Story {i}: once upon a time", params)
                    if o.outputs])
    try:
        await one(-1)
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(concurrency))))
        return tokens / (time.perf_counter() - start)
    finally:
        engine.shutdown()


def streams(port: int, concurrency: int, intervals: list[float], model: str | None, threads: int,
            hosts: list[str]) -> list[list]:
    if model is None:
        with tempfile.TemporaryDirectory() as d:
            return streams(port, concurrency, intervals, build_decoder("llama", d, seed=0), threads, hosts)
    rows = []
    for host in hosts:
        engine_process = host == "process"
        local = asyncio.run(in_process_streams(model, concurrency, threads, engine_process))
        for interval in intervals:
            args = ModelArgs(model=model, task="generate", num_threads=threads, max_num_seqs=concurrency,
                             engine_kwargs={"engine_process": engine_process},
                             deployment_config={"ray_actor_options": {"num_cpus": NUM_CPUS}, "num_replicas": 1,
                                                "max_ongoing_requests": 256})
            serve.run(build_app(AppArgs(models=[args], limits={"stream_batching_interval_ms": interval},
                                        ingress_deployment_config={"ray_actor_options": {"num_cpus": 0.1}})),
                      name="bench", route_prefix="/", blocking=False)
            tok_s, chunks, gaps = asyncio.run(http_streams(port, model, concurrency))
            serve.delete("bench")
            rows.append([host, f"{interval:g}", tok_s, chunks / concurrency, concurrency * STREAM_TOKENS / chunks,
                         f"{pct(gaps, 99) * 1e3:.0f} / {max(gaps) * 1e3:.0f}", local, ratio(tok_s, local)])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="embedding requests (rerank gets a fifth)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rate", type=float, default=0, help="arrivals/s; 0: fast enough to keep the cap full")
    ap.add_argument("--scifact", action="store_true", help="NDCG@10 of the whole SciFact corpus over HTTP")
    ap.add_argument("--batch", type=int, default=32, help="--scifact: documents per request")
    ap.add_argument("--streams", action="store_true", help="streamed completions by stream batching interval")
    ap.add_argument("--intervals", type=float, nargs="+", default=[0, 50, 200],
                    help="--streams: limits.stream_batching_interval_ms values")
    ap.add_argument("--model", help="--streams: a generation model instead of the tests' 2-layer Llama")
    ap.add_argument("--threads", type=int, default=1, help="--streams: torch threads of the engine")
    ap.add_argument("--hosts", nargs="+", choices=("thread", "process"), default=["thread"],
                    help="--streams: the engine on a thread of the replica, or in a process of its own (engine_process)")
    args = ap.parse_args()
    if args.streams:
        print_machine(f"Streamed /v1/completions, {args.model or 'the tests 2-layer Llama (host-bound steps)'}", extra={
            "workload": f"{args.concurrency} streams at once x {STREAM_TOKENS} tokens, loopback HTTP through the "
                        f"ingress; baseline: the same streams on the in-process AsyncLLM ({args.threads} torch "
                        "threads in both)"})
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        rows = streams(port, args.concurrency, args.intervals, args.model, args.threads, args.hosts)
        serve.shutdown()
        ray.shutdown()
        print(table(["engine runs in", "stream_batching_interval_ms", "HTTP tok/s", "chunks a stream",
                     "tokens a chunk", "chunk gap p99 / max ms", "in-process tok/s", "HTTP / in-process"], rows))
        return
    if args.scifact:
        print_machine("SciFact through /v1/embeddings", extra={
            "workload": f"5,183 docs, {args.batch} per request, at most {args.concurrency} requests in flight"})
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        rows = asyncio.run(scifact_over_http(port, args.concurrency, args.batch))
        serve.shutdown()
        ray.shutdown()
        print(table(["system", "docs", "docs/s", "NDCG@10", "published", "delta"], rows))
        return

    corpus, queries, _ = load_scifact(SCIFACT)
    rng = random.Random(0)
    docs, qs = list(corpus.values()), list(queries.values())
    print_machine("HTTP serving vs in-process engine", extra={
        "workload": f"embeddings: {args.requests} requests x 8 SciFact docs; rerank: {max(1, args.requests // 5)} "
                    f"requests x (1 query, 16 docs), SmolLM2 yes/no; Poisson arrivals, at most "
                    f"{args.concurrency} in flight, loopback HTTP through the ingress"})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})  # one proxy for both routes
    rows = []
    for route, n in (("embeddings", args.requests), ("rerank", max(1, args.requests // 5))):
        payloads = workload(route, n, docs, qs, rng)
        rate = args.rate or 1000.0  # open loop far above capacity: the concurrency cap is what binds
        http_s, http_lat = asyncio.run(run_http(route, payloads, rate, args.concurrency, port))
        local_s, local_lat = asyncio.run(run_in_process(route, payloads, rate, args.concurrency))
        rows.append([route, n, n / http_s, pct(http_lat, 50) * 1e3, pct(http_lat, 99) * 1e3,
                     n / local_s, pct(local_lat, 50) * 1e3, pct(local_lat, 99) * 1e3, ratio(n / http_s, n / local_s)])
    serve.shutdown()
    ray.shutdown()
    print(table(["route", "requests", "HTTP req/s", "HTTP p50 ms", "HTTP p99 ms", "in-process req/s",
                 "in-process p50 ms", "in-process p99 ms", "HTTP / in-process"], rows))


if __name__ == "__main__":
    main()
