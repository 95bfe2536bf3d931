"""Scale and failure on a local multi-node cluster (a head and 2 workers of ray.cluster_utils.Cluster,
cluster.local_cluster), the app built by deployments.builder, HTTP clients through the proxy.

1. Autoscaling timeline: a load ramp up, a plateau and a ramp down of closed-loop clients (chats on a
   tiny random decoder and embeddings on all-MiniLM-L6-v2); every few seconds the load, each
   deployment's target/running replicas (serve.status()), the window's p50/p99 latency and errors;
   then the time to scale up and down. The autoscaling delays are SHORT (BENCH_AUTOSCALING) so it
   runs in minutes; the shipped defaults (cluster.shapes) wait 120 s before scaling down.
2. Kill under load: N non-streaming chats in flight on a 2-replica Generator, ray.kill one replica:
   sent / succeeded / failed, time until a fresh request succeeds and until 2 replicas run again;
   with the ingress's retries and without (retry max_attempts 1).
3. Prefix-aware vs Serve's default router (PowerOfTwoChoices, via request_router_config) on 2
   replicas: multi-turn chats (SmolLM2-135M, streamed: TTFT = time to the first content chunk) and
   repeated rerank queries (a tiny random bge-reranker-v2-gemma); the engines' prefix-cache hit
   rate (vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total, in tokens, from /metrics).

Prints tables; asserts no time. Run: python bench/scale.py  (a few minutes on 2 cores)."""
import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time

import httpx
import ray
from ray import serve

from common import ROOT, pct, print_machine, table

sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import build_bge_gemma, build_decoder, sentence  # noqa: E402 (the tests' tiny models)

from cluster.local_cluster import deploy, local_cluster, metric_values, model, replica_nodes, wait_for  # noqa: E402
from deployments.builder import AppArgs, deployment_name  # noqa: E402

EMBED = "sentence-transformers/all-MiniLM-L6-v2"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_GEN, TINY_RERANK = "tiny-llama", "tiny-bge-reranker"
KILL_TOKENS = 48
INGRESS = {"ray_actor_options": {"num_cpus": 0.05}}
# Short delays for the bench only, so a whole up-and-down cycle fits in a couple of minutes.
BENCH_AUTOSCALING = {"upscale_delay_s": 2, "downscale_delay_s": 8, "metrics_interval_s": 1, "look_back_period_s": 3}
STATS_ROUTER = {"request_router_class": "cluster.replica_stats:StatsRouter"}  # Serve's default routing
PREFIX_ROUTER = {"request_router_class": "cluster.prefix_router:PrefixAwareRouter"}


def replica_counts(deployment: str) -> tuple[int, int]:
    """(target, running) from serve.status(): target counts every replica not stopping."""
    app = serve.status().applications.get("default")
    d = app.deployments.get(deployment) if app else None
    if d is None:
        return 0, 0
    states = {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}
    return sum(v for k, v in states.items() if k != "STOPPING"), states.get("RUNNING", 0)


def fresh_app(args: AppArgs, http: httpx.Client, ready) -> None:
    """Replace the app and wait until `ready(http)` answers."""
    serve.delete("default")
    deploy(args)
    wait_for(lambda: http.get("/v1/models").status_code == 200 and ready(http), timeout_s=300, what="the app")


def ok(r: httpx.Response) -> bool:
    return r.status_code == 200


# ---- 1. autoscaling --------------------------------------------------------------------------
LOAD = [("ramp up", 6, n) for n in (1, 2, 4, 8)] + [("plateau", 24, 12)] + \
       [("ramp down", 6, n) for n in (8, 4, 2, 1)]


async def autoscaling_timeline(url: str, gen_dep: str, embed_dep: str, tick_s: float, idle_max_s: float):
    samples: list[tuple[float, float, bool]] = []  # (end time, latency, ok)
    level = {"clients": 0}
    t0 = time.monotonic()

    async def client(i: int, client_http: httpx.AsyncClient):
        k = 0
        while i < level["clients"]:
            k += 1
            start = time.monotonic()
            try:
                if k % 2:
                    r = await client_http.post("/v1/chat/completions", json={
                        "model": TINY_GEN, "max_tokens": 16,
                        "messages": [{"role": "user", "content": sentence(1000 * i + k, 12)}]})
                else:
                    r = await client_http.post("/v1/embeddings", json={
                        "model": EMBED, "input": [sentence(7 * k + j, 20) for j in range(8)]})
                good = r.status_code == 200
            except httpx.HTTPError:
                good = False
            samples.append((time.monotonic(), time.monotonic() - start, good))

    rows, events = [], {}

    def tick(phase: str):
        now = time.monotonic()
        window = [(lat, good) for end, lat, good in samples if end > now - tick_s]
        lat = [x for x, good in window if good]
        g, e = replica_counts(gen_dep), replica_counts(embed_dep)
        rows.append([f"{now - t0:.0f}", phase, level["clients"], f"{g[0]}/{g[1]}", f"{e[0]}/{e[1]}",
                     len(window), pct(lat, 50), pct(lat, 99), sum(1 for _, good in window if not good)])
        for name, (target, running) in (("gen", g), ("embed", e)):
            events.setdefault(f"{name} first scale-up decided", None)
            if target > 1 and events[f"{name} first scale-up decided"] is None:
                events[f"{name} first scale-up decided"] = now
            peak = events.get(f"{name} peak running", (0, None))
            if running > peak[0]:
                events[f"{name} peak running"] = (running, now)
            if level["clients"] == 0 and running == 1 and target == 1 and f"{name} back to 1" not in events:
                events[f"{name} back to 1"] = now

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as h:
        tasks: list[asyncio.Task] = []
        load_start = time.monotonic()
        for phase, seconds, clients in LOAD:
            level["clients"] = clients
            tasks += [asyncio.create_task(client(i, h)) for i in range(len(tasks), clients)]
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                await asyncio.sleep(min(tick_s, end - time.monotonic()))
                tick(phase)
            tasks = [t for t in tasks if not t.done()]
        level["clients"] = 0
        load_end = time.monotonic()
        await asyncio.gather(*tasks)
        while time.monotonic() - load_end < idle_max_s and not all(
                f"{n} back to 1" in events for n in ("gen", "embed")):
            await asyncio.sleep(tick_s)
            tick("idle")
    print("### 1. Autoscaling timeline\n")
    print(f"Load: closed-loop clients, each alternating a chat ({TINY_GEN}, 16 tokens) and an 8-input embedding "
          f"({EMBED}); autoscaling min 1, target_ongoing_requests 2, max 3 (Generator) / 2 (Embedder), "
          f"engine-pressure policy, bench delays {BENCH_AUTOSCALING}. Replicas: target/running "
          f"(target = serve.status() replicas not STOPPING). Latency of requests finished in the window.\n")
    print(table(["t (s)", "phase", "clients", "Generator", "Embedder", "requests", "p50 (s)", "p99 (s)", "errors"],
                rows))
    print()
    out = []
    for name, dep in (("Generator", "gen"), ("Embedder", "embed")):
        up = events.get(f"{dep} first scale-up decided")
        peak_n, peak_t = events.get(f"{dep} peak running", (1, None))
        down = events.get(f"{dep} back to 1")
        out.append([name, f"{up - load_start:.1f}" if up else "never", peak_n,
                    f"{peak_t - load_start:.1f}" if peak_t and peak_n > 1 else "-",
                    f"{down - load_end:.1f}" if down else f"not within {idle_max_s:.0f}"])
    print(table(["deployment", "first upscale decided (s after load start)", "peak running",
                 "peak reached (s after load start)", "back to 1 running (s after load ended)"], out))
    print()


# ---- 2. kill under load ------------------------------------------------------------------------
def kill_under_load(http: httpx.Client, url: str, gen_dep: str, n: int, max_tokens: int) -> list:
    # SmolLM2 at 1 CPU per replica takes several seconds for n/2 chats of max_tokens each: when the kill
    # lands 1 s in, the victim holds accepted, unfinished chats (the "finished before the kill" column).
    # A tiny model finished most chats first, so Serve's own re-routing of not-yet-accepted calls hid
    # whether the ingress's retries mattered.
    """One row: sent / ok / failed, status codes, seconds to a fresh 200 and to 2 running replicas."""
    async def run() -> list:
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=n + 8)) as h:
            async def chat(i: int):
                try:
                    return (await h.post("/v1/chat/completions", json={
                        "model": SMOL, "max_tokens": max_tokens, "ignore_eos": True,
                        "messages": [{"role": "user", "content": sentence(5000 + i, 12)}]})).status_code
                except httpx.HTTPError as e:
                    return type(e).__name__
            inflight = [asyncio.create_task(chat(i)) for i in range(n)]
            await asyncio.sleep(1.0)
            done_before = sum(t.done() for t in inflight)
            victim = sorted(replica_nodes(gen_dep))[0]
            killed = time.monotonic()
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            fresh_ok = None
            while fresh_ok is None and time.monotonic() - killed < 120:
                if await chat(10_000) == 200:
                    fresh_ok = time.monotonic() - killed
            statuses = await asyncio.gather(*inflight)
            restored = await asyncio.to_thread(
                lambda: wait_for(lambda: replica_counts(gen_dep)[1] == 2 and victim not in replica_nodes(gen_dep),
                                 180, "2 running replicas") and time.monotonic() - killed)
            return statuses, done_before, fresh_ok, restored
    statuses, done_before, fresh_ok, restored = asyncio.run(run())
    codes = {}
    for s in statuses:
        codes[str(s)] = codes.get(str(s), 0) + 1
    good = sum(1 for s in statuses if s == 200)
    return [n, done_before, good, n - good, ", ".join(f"{k}: {v}" for k, v in sorted(codes.items())),
            fresh_ok if fresh_ok is not None else "none in 120 s", restored]


# ---- 3. prefix-aware vs default routing -------------------------------------------------------
SYSTEM = ("You are a careful assistant for a team that runs a model-serving cluster. Answer briefly, "
          "in plain words, and say when you are unsure. ") * 4


async def chats(url: str, conversations: int, turns: int, concurrency: int) -> list[float]:
    """Multi-turn chats, streamed; each turn resends the history. Returns TTFTs (s)."""
    ttfts = []
    sem = asyncio.Semaphore(concurrency)

    async def conversation(c: int, h: httpx.AsyncClient):
        messages = [{"role": "system", "content": SYSTEM + f"Conversation {c}."}]
        for t in range(turns):
            messages.append({"role": "user", "content": f"Question {t} of conversation {c}: "
                                                        f"how should replica {c + t} handle a burst of traffic?"})
            async with sem:
                start, first, text = time.monotonic(), None, ""
                async with h.stream("POST", "/v1/chat/completions", json={
                        "model": SMOL, "messages": messages, "max_tokens": 8, "stream": True}) as r:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                        if delta:
                            first = first or time.monotonic()
                            text += delta
                ttfts.append((first or time.monotonic()) - start)
            messages.append({"role": "assistant", "content": text})
    async with httpx.AsyncClient(base_url=url, timeout=300) as h:
        await asyncio.gather(*(conversation(c, h) for c in range(conversations)))
    return ttfts


async def reranks(url: str, queries: int, repeats: int, docs: int, concurrency: int) -> list[float]:
    """Each query reranked `repeats` times with fresh documents (a query's next batches). Returns latencies."""
    lat, sem = [], asyncio.Semaphore(concurrency)

    async def one(q: int, k: int, h: httpx.AsyncClient):
        async with sem:
            start = time.monotonic()
            r = await h.post("/v1/rerank", json={"model": TINY_RERANK, "query": sentence(q, 40),
                                                 "documents": [sentence(100 * q + 10 * k + d, 10) for d in range(docs)]})
            r.raise_for_status()
            lat.append(time.monotonic() - start)
    async with httpx.AsyncClient(base_url=url, timeout=300) as h:
        order = [(q, k) for k in range(repeats) for q in range(queries)]
        random.Random(0).shuffle(order)
        await asyncio.gather(*(one(q, k, h) for q, k in order))
    return lat


def hit_rate(http: httpx.Client, model_name: str) -> tuple[float, float]:
    """(hits, queries) summed over replicas, once the routers' 2 s stats have caught up."""
    def read():
        return (sum(metric_values(http, "vllm:prefix_cache_hits_total", model_name).values()),
                sum(metric_values(http, "vllm:prefix_cache_queries_total", model_name).values()))
    last = None
    for _ in range(20):
        time.sleep(2.5)
        now = read()
        if now == last and now[1] > 0:
            break
        last = now
    return now


def routing_rows(http: httpx.Client, url: str, rerank_dir: str, router_name: str, router: dict, args) -> list:
    slots = {"num_cpus": 0.4, "resources": {"gen_slot": 1}}
    fresh_app(AppArgs(models=[
        model(SMOL, "generate", slots, 2, request_router_config=router),
        model(rerank_dir, "score", {"num_cpus": 0.2}, 2,
              max_model_len=256, engine_kwargs={"block_size": 4}, request_router_config=router)
        .model_copy(update={"served_model_name": TINY_RERANK})],
        ingress_deployment_config=INGRESS), http,
        lambda h: replica_counts(deployment_name("generate", SMOL))[1] == 2
        and replica_counts(deployment_name("score", TINY_RERANK))[1] == 2)
    ttft = asyncio.run(chats(url, args.conversations, args.turns, args.concurrency))
    chat_hits, chat_queries = hit_rate(http, SMOL)
    lat = asyncio.run(reranks(url, args.rerank_queries, args.rerank_repeats, 8, args.concurrency))
    rr_hits, rr_queries = hit_rate(http, TINY_RERANK)
    return [[router_name, f"chat ({args.conversations} x {args.turns} turns, streamed)", len(ttft),
             f"{chat_hits / chat_queries:.1%}" if chat_queries else "-", int(chat_queries), pct(ttft, 50), pct(ttft, 99)],
            [router_name, f"rerank ({args.rerank_queries} queries x {args.rerank_repeats}, 8 docs)", len(lat),
             f"{rr_hits / rr_queries:.1%}" if rr_queries else "-", int(rr_queries), pct(lat, 50), pct(lat, 99)]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="1,2,3")
    p.add_argument("--tick", type=float, default=4.0, help="seconds per timeline row")
    p.add_argument("--kill-requests", type=int, default=16)
    p.add_argument("--conversations", type=int, default=6)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--rerank-queries", type=int, default=6)
    p.add_argument("--rerank-repeats", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=3)
    args = p.parse_args()
    parts = set(args.parts.split(","))
    print_machine("bench/scale.py: autoscaling, kill under load, prefix-aware routing",
                  extra={"cluster": "ray.cluster_utils.Cluster: head 1 CPU + 2 workers x 2 logical CPUs "
                                    "(gen_slot 1 each), all on this machine's cores"})
    tmp = tempfile.mkdtemp(prefix="scalebench-")
    tiny_gen = build_decoder("llama", os.path.join(tmp, TINY_GEN), 1)
    tiny_rerank = build_bge_gemma("", os.path.join(tmp, "bge-reranker-v2-gemma"), 2)
    gen_dep, embed_dep = deployment_name("generate", TINY_GEN), deployment_name("embed", EMBED)
    with local_cluster(head={"num_cpus": 1}, workers=[{"num_cpus": 2, "resources": {"gen_slot": 1}}] * 2) as lc, \
            httpx.Client(base_url=lc.url, timeout=300) as http:
        if "1" in parts:
            fresh_app(AppArgs(models=[
                model(tiny_gen, "generate", {"num_cpus": 0.3}, max_model_len=256,
                      autoscaling_config={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2,
                                          **BENCH_AUTOSCALING}).model_copy(update={"served_model_name": TINY_GEN}),
                model(EMBED, "embed", {"num_cpus": 0.3}, max_model_len=256,
                      autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                          **BENCH_AUTOSCALING})],
                ingress_deployment_config=INGRESS), http,
                lambda h: replica_counts(gen_dep)[1] == 1 and replica_counts(embed_dep)[1] == 1)
            asyncio.run(autoscaling_timeline(lc.url, gen_dep, embed_dep, args.tick, idle_max_s=90))
        if "2" in parts:
            rows = []
            for label, retry in (("ingress retries (default)", {}), ("no retry (max_attempts 1)", {"max_attempts": 1})):
                smol_dep = deployment_name("generate", SMOL)
                fresh_app(AppArgs(models=[
                    model(SMOL, "generate", {"num_cpus": 0.4, "resources": {"gen_slot": 1}}, 2, max_model_len=512)],
                    retry=retry, ingress_deployment_config=INGRESS), http,
                    lambda h: replica_counts(smol_dep)[1] == 2)
                rows.append([label, *kill_under_load(http, lc.url, smol_dep, args.kill_requests, KILL_TOKENS)])
            print("### 2. Kill under load\n")
            print(f"{args.kill_requests} non-streaming chats ({SMOL}, {KILL_TOKENS} tokens each, ignore_eos) in flight "
                  "on 2 Generator replicas (one per worker); ray.kill of one replica 1 s after they were sent.\n")
            print(table(["ingress", "sent", "finished before the kill", "succeeded", "failed", "statuses", "fresh request 200 after (s)",
                         "2 replicas running again after (s)"], rows))
            print()
        if "3" in parts:
            rows = []
            for name, router in (("Serve default (PowerOfTwoChoices)", STATS_ROUTER),
                                 ("prefix-aware", PREFIX_ROUTER)):
                rows += routing_rows(http, lc.url, tiny_rerank, name, router, args)
            print("### 3. Prefix-aware vs default routing (2 replicas each)\n")
            print(f"Chats: {SMOL} (fp32, 1 thread per replica), a ~{len(SYSTEM) // 4}-token system prompt, each "
                  f"turn resends the history, {args.concurrency} at a time; latency = TTFT (first content chunk "
                  f"of the stream). Rerank: a tiny random bge-reranker-v2-gemma (block_size 4), 40-word queries; "
                  f"latency = whole request. Hit rate = prefix_cache_hits / prefix_cache_queries (tokens), both "
                  f"replicas.\n")
            print(table(["router", "workload", "requests", "prefix-cache hit rate", "queried tokens",
                         "p50 (s)", "p99 (s)"], rows))
            print()


if __name__ == "__main__":
    main()
