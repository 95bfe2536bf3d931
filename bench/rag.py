"""RAG through the OpenAI API on Serve, on SciFact: ingestion, retrieval quality and search latency.

    python bench/rag.py                 # 1,000-document subset (every relevant doc + random others)
    python bench/rag.py --full          # all 5,183 documents (embedding alone takes several minutes here)

1. `/v1/embeddings` alone embeds the documents (batches of 64, 2 in flight): the baseline docs/s.
   It embeds one input per document, truncated at the embedder's max length. Ingestion embeds
   every token of every document, in overlapping chunks, so the fair measure of its overhead is
   a second baseline: `/v1/embeddings` on the very chunks ingestion embeds (cut here with the
   same tokenizer and rag.chunking), same batching.
2. Every document is uploaded through `/v1/files` (one file per document) and attached with one
   file batch; ingestion docs/s counts from the batch's creation to its completion.
3. The test queries go through `/v1/vector_stores/{id}/search` with ranker `none`: NDCG@10, with
   a document's score its best chunk's (ids are the filenames).
4. A subset of queries is searched again with the configured reranker (SmolLM2 yes/no), and
   with `none`, on the same queries: does reranking help?
5. Search latency p50/p99 at concurrency 1 and 16.
Prints one table; asserts nothing.
"""
import argparse
import asyncio
import os
import sys
import tempfile
import time

import httpx
import numpy as np
import ray
from ray import serve
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SCIFACT, load_scifact, print_machine, table  # noqa: E402
from embed import ndcg10, pick_docs  # noqa: E402

from deployments.builder import AppArgs, ModelArgs, build_app  # noqa: E402
from engine.loader import resolve_model  # noqa: E402
from rag.chunking import chunk_text, chunking_strategy  # noqa: E402

EMBED, GEN, RERANK = "sentence-transformers/all-MiniLM-L6-v2", "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-reranker"
def app(data_dir: str, max_len: int) -> AppArgs:
    def model(name, task, served=None, cpus=0.6, **kw):
        return ModelArgs(model=name, task=task, served_model_name=served, max_model_len=kw.pop("max_len", 2048),
                         num_threads=2, kv_cache_memory_bytes=128 << 20,
                         deployment_config={"ray_actor_options": {"num_cpus": cpus},
                                            "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                                            "max_ongoing_requests": 64})
    return AppArgs(models=[model(EMBED, "embed", max_len=max_len), model(GEN, "generate", cpus=0.3),
                           model(GEN, "score", RERANK, cpus=0.6)],
                   max_request_body_bytes=64 << 20, max_queued_requests=4096,
                   ingress_deployment_config={"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 1024},
                   rag={"embed_model": EMBED, "generate_model": GEN, "rerank_model": RERANK, "data_dir": data_dir,
                        "ingest_workers": 2, "embed_batch_size": 64,
                        "deployment_config": {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 256}})


async def gather_limited(n: int, coros) -> list:
    sem = asyncio.Semaphore(n)

    async def one(c):
        async with sem:
            return await c
    return await asyncio.gather(*(one(c) for c in coros))


async def timed_calls(http: httpx.AsyncClient, payloads: list[tuple[str, dict]], concurrency: int) -> list[float]:
    async def one(url, body):
        t = time.perf_counter()
        r = await http.post(url, json=body)
        r.raise_for_status()
        return time.perf_counter() - t
    return await gather_limited(concurrency, [one(u, b) for u, b in payloads])


def chunking(args) -> dict:
    """The request's chunking_strategy: auto, or static at the embedder's limit with --overlap."""
    if args.overlap is None:
        return {"type": "auto"}
    return {"type": "static", "static": {"max_chunk_size_tokens": args.max_len - 2, "chunk_overlap_tokens": args.overlap}}


async def embed_all(http: httpx.AsyncClient, texts: list[str]) -> float:
    """Seconds for /v1/embeddings over texts, batches of 64, 2 in flight."""
    batches = [texts[i:i + 64] for i in range(0, len(texts), 64)]
    t = time.perf_counter()
    for r in await gather_limited(2, [http.post("/v1/embeddings", json={"model": EMBED, "input": b,
                                                                        "truncate_prompt_tokens": -1})
                                      for b in batches]):
        r.raise_for_status()
    return time.perf_counter() - t


async def run(args, base: str, corpus: dict, queries: dict, qrels: dict) -> None:
    dids = pick_docs(corpus, qrels, None if args.full else args.docs, args.seed)
    in_subset = set(dids)
    qids = sorted((q for q in qrels if all(d in in_subset for d in qrels[q])), key=int)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(EMBED))
    strategy = chunking_strategy(chunking(args), args.max_len - tokenizer.num_special_tokens_to_add(pair=False))
    chunks = [c for d in dids for c in chunk_text(corpus[d], tokenizer, strategy)]
    async with httpx.AsyncClient(base_url=base, timeout=3600) as http:
        # 1. the embedding deployment alone: whole documents (truncated), then ingestion's chunks
        embed_s = await embed_all(http, [corpus[d] for d in dids])
        chunks_s = await embed_all(http, chunks)
        # 2. upload + one file batch
        t = time.perf_counter()
        uploads = await gather_limited(8, [http.post("/v1/files", files={"file": (f"{d}.txt", corpus[d].encode())},
                                                     data={"purpose": "assistants"}) for d in dids])
        upload_s = time.perf_counter() - t
        file_ids = [u.json()["id"] for u in uploads]
        vs = (await http.post("/v1/vector_stores", json={"name": "scifact"})).json()["id"]
        t = time.perf_counter()
        batch = (await http.post(f"/v1/vector_stores/{vs}/file_batches",
                                 json={"file_ids": file_ids, "chunking_strategy": chunking(args)})).json()
        last = -1
        while batch["status"] == "in_progress":
            await asyncio.sleep(1)
            batch = (await http.get(f"/v1/vector_stores/{vs}/file_batches/{batch['id']}")).json()
            done = batch["file_counts"]["completed"]
            if done // 500 != last // 500:
                print(f"  ingested {done}/{len(dids)} files", file=sys.stderr)
            last = done
        ingest_s = time.perf_counter() - t
        assert batch["file_counts"]["completed"] == len(dids), batch
        store = (await http.get(f"/v1/vector_stores/{vs}")).json()

        # 3. retrieval quality, ranker none
        async def search(q, ranker, k=20):
            r = await http.post(f"/v1/vector_stores/{vs}/search", json={
                "query": queries[q], "max_num_results": k, "ranking_options": {"ranker": ranker}})
            r.raise_for_status()
            return [h["filename"].removesuffix(".txt") for h in r.json()["data"]]
        ranked = await gather_limited(4, [search(q, "none") for q in qids])
        ndcg_none = float(np.mean([ndcg10(r, q, qrels[q]) for r, q in zip(ranked, qids)]))
        # 4. the reranker on a subset of queries
        sub = qids[:args.rerank_queries]
        t = time.perf_counter()
        reranked = await gather_limited(2, [search(q, RERANK, 10) for q in sub])
        rerank_s = time.perf_counter() - t
        sub_none = float(np.mean([ndcg10(r, q, qrels[q]) for r, q in zip(ranked, sub)])) if sub else None
        sub_rerank = float(np.mean([ndcg10(r, q, qrels[q]) for r, q in zip(reranked, sub)])) if sub else None
        # 5. latency
        lat = {}
        for c in (1, 16):
            payloads = [(f"/v1/vector_stores/{vs}/search", {"query": queries[qids[i % len(qids)]], "max_num_results": 10,
                                                            "ranking_options": {"ranker": "none"}})
                        for i in range(args.latency_requests)]
            t = time.perf_counter()
            times = await timed_calls(http, payloads, c)
            lat[c] = (np.percentile(times, 50) * 1e3, np.percentile(times, 99) * 1e3, len(times) / (time.perf_counter() - t))

    n = len(dids)
    print(f"\ncorpus: {n} documents ({store['file_counts']['completed']} files completed, "
          f"{store['usage_bytes'] / 1e6:.1f} MB in the store), {len(qids)} test queries, embedder max_model_len {args.max_len} "
          f"({strategy.type} chunking: {strategy.max_chunk_size_tokens} tokens, overlap {strategy.chunk_overlap_tokens}: "
          f"{len(chunks)} chunks)\n")
    rows = [
        ["/v1/embeddings alone (docs truncated at the max length)", f"{n / embed_s:.1f} docs/s", "1.00x", "-"],
        [f"/v1/embeddings alone on ingestion's {len(chunks)} chunks", f"{n / chunks_s:.1f} docs/s",
         f"{embed_s / chunks_s:.2f}x", "-"],
        ["upload via /v1/files (8 in flight)", f"{n / upload_s:.1f} files/s", "-", "-"],
        ["ingestion via one file batch (parse, chunk, embed, store)", f"{n / ingest_s:.1f} docs/s",
         f"{embed_s / ingest_s:.2f}x ({chunks_s / ingest_s:.2f}x of same chunks)", "-"],
        [f"/search ranker none, {len(qids)} queries", "-", "-", f"NDCG@10 {ndcg_none:.4f}"],
    ] + ([
        [f"/search ranker none, first {len(sub)} queries", "-", "-", f"NDCG@10 {sub_none:.4f}"],
        [f"/search ranker {RERANK} (top {20} reranked), same {len(sub)} queries", f"{len(sub) / rerank_s:.2f} queries/s",
         "-", f"NDCG@10 {sub_rerank:.4f}"],
    ] if sub else []) + [[f"/search latency, concurrency {c}", f"{lat[c][2]:.1f} req/s", "-", f"p50 {lat[c][0]:.0f} ms, p99 {lat[c][1]:.0f} ms"]
         for c in (1, 16)]
    print(table(["what", "throughput", "vs embeddings alone", "quality / latency"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--max-len", type=int, default=256, help="the embedder's max_model_len (sentence-transformers: 256)")
    ap.add_argument("--overlap", type=int, default=None,
                    help="static chunks at the max length with this overlap (default: auto chunking)")
    ap.add_argument("--rerank-queries", type=int, default=30)
    ap.add_argument("--latency-requests", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=SCIFACT, help="the SciFact folder (corpus.jsonl, queries.jsonl, qrels/)")
    args = ap.parse_args()
    data = load_scifact(args.data)  # before starting anything: a wrong path fails at once
    print_machine("bench/rag.py: OpenAI Files + Vector Stores on Serve, SciFact")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = 18000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    with tempfile.TemporaryDirectory() as data_dir:
        serve.run(build_app(app(data_dir, args.max_len)), name="default", route_prefix="/", blocking=False)
        try:
            asyncio.run(run(args, f"http://127.0.0.1:{port}", *data))
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
