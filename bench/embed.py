"""Embedding throughput and retrieval quality on SciFact: engine vs sentence-transformers, same run.

    python bench/embed.py               # a 1,000-doc subset (a few minutes)
    python bench/embed.py --full        # all 5,183 docs, comparable to the published NDCG@10 0.64508

The subset holds every document judged relevant for a SciFact test query plus random other documents,
so NDCG@10 is computed over all test queries, but on a smaller corpus than the published number's:
compare the engine with sentence-transformers, not with 0.64508."""
import argparse
import random

import numpy as np
import torch

from common import (Section, Timed, load_scifact, matmul_peaks, peak_lines, print_machine, quiet_transformers, ratio,
                    table)

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
PUBLISHED_NDCG10 = 0.64508


def pick_docs(corpus: dict, qrels: dict, n: int | None, seed: int) -> list[str]:
    ids = list(corpus)
    if n is None or n >= len(ids):
        return ids
    relevant = sorted({d for rel in qrels.values() for d in rel if d in corpus})
    rest = [d for d in ids if d not in set(relevant)]
    random.Random(seed).shuffle(rest)
    chosen = set(relevant[:n]) | set(rest[:max(0, n - len(relevant))])
    return [d for d in ids if d in chosen]  # corpus order


DISCOUNTS = 1.0 / np.log2(np.arange(2, 12))


def ndcg10(ranked: list[str], qid: str, rel: dict) -> float:
    """NDCG@10 of a ranked list of document ids, binary/graded gain as pytrec_eval; a document with the
    query's own id is skipped, as MTEB's BEIR evaluator does."""
    ranked = [d for d in dict.fromkeys(ranked) if d != qid][:10]
    dcg = sum(rel.get(d, 0) * DISCOUNTS[r] for r, d in enumerate(ranked))
    idcg = sum(g * DISCOUNTS[r] for r, g in enumerate(sorted(rel.values(), reverse=True)[:10]))
    return dcg / idcg if idcg else 0.0


def ndcg_at_10(q_emb: np.ndarray, qids: list[str], d_emb: np.ndarray, dids: list[str], qrels: dict) -> float:
    """Mean NDCG@10 of exact cosine search (embeddings normalized here)."""
    q = q_emb / np.linalg.norm(q_emb, axis=1, keepdims=True)
    d = d_emb / np.linalg.norm(d_emb, axis=1, keepdims=True)
    sims = q @ d.T
    tops = [np.argsort(-sims[i], kind="stable")[:11] for i in range(len(qids))]
    return float(np.mean([ndcg10([dids[j] for j in top], qid, qrels[qid]) for top, qid in zip(tops, qids)]))


def bert_flops(lengths: list[int], cfg) -> float:
    """Forward FLOPs (2 per multiply-add): the dense layers plus QK^T and AV."""
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    dense = 2 * (4 * h * h + 2 * h * inter)
    return float(sum(layers * (n * dense + 4 * n * n * h) for n in lengths))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1000, help="corpus subset size (default 1000)")
    ap.add_argument("--full", action="store_true", help="all 5,183 documents")
    ap.add_argument("--max-len", type=int, default=256, help="truncation, as sentence-transformers' max_seq_length")
    ap.add_argument("--st-batch-size", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--dtype", default="auto", help="engine dtype (default auto: float32 without avx512_bf16)")
    ap.add_argument("--peak-n", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=4, help="interleave engine / baseline over this many chunks")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from engine import LLM
    from sentence_transformers import SentenceTransformer

    corpus, queries, qrels = load_scifact()
    dids = pick_docs(corpus, qrels, None if args.full else args.docs, args.seed)
    docs = [corpus[d] for d in dids]
    in_subset = set(dids)
    qids = sorted((q for q in qrels if all(d in in_subset for d in qrels[q])), key=int)
    qtexts = [queries[q] for q in qids]

    llm = LLM(MODEL, task="embed", dtype=args.dtype, max_model_len=args.max_len,
              max_num_batched_tokens=args.max_num_batched_tokens)
    dtype = llm.engine.runner.dtype
    peaks = matmul_peaks(args.peak_n)
    peak = peaks[dtype][0] if dtype in peaks else float("nan")
    scope = ("full corpus" if len(dids) == len(corpus) else
             f"subset: every test-relevant doc + random others (seed {args.seed})")
    print_machine("Embedding: SciFact with all-MiniLM-L6-v2", dtype, {
        "corpus": f"{len(dids)} of {len(corpus)} docs ({scope}), \"title text\", truncated at {args.max_len} tokens",
        "queries": f"{len(qids)} of {len(qrels)} test queries (those whose relevant docs are all in the corpus used)",
        "matmul peak": peak_lines(peaks, args.peak_n),
        "engine": f"max_num_batched_tokens={args.max_num_batched_tokens}, truncate_prompt_tokens=-1",
        "baseline": f"sentence-transformers SentenceTransformer.encode(batch_size={args.st_batch_size}) in float32"
                    + ("" if dtype == torch.float32 else f" and in {str(dtype).removeprefix('torch.')} (the same dtype)")})

    st = SentenceTransformer(llm.engine.model_dir, device="cpu")
    st.max_seq_length = args.max_len
    # sentence-transformers at the engine's dtype too: issue 8 compares the two at the same dtype.
    baselines = {torch.float32: st}
    if dtype != torch.float32:
        baselines[dtype] = SentenceTransformer(llm.engine.model_dir, device="cpu").to(dtype)
        baselines[dtype].max_seq_length = args.max_len
    lengths = [len(x) for x in st.tokenizer(docs, truncation=True, max_length=args.max_len)["input_ids"]]
    flops = bert_flops(lengths, llm.engine.hf_config)

    with quiet_transformers():
        # Warm-up: first calls allocate and pick kernels.
        llm.embed(docs[:16], truncate_prompt_tokens=-1)
        for model in baselines.values():
            model.encode(docs[:16], batch_size=args.st_batch_size)

        # Interleaved chunks (engine, then each sentence-transformers, per chunk): on a shared machine all
        # systems see the same background load.
        eng_d, s_eng = [], Timed()
        st_d, s_st = {dt: [] for dt in baselines}, {dt: Timed() for dt in baselines}
        eng_tokens = 0
        bounds = np.linspace(0, len(docs), args.chunks + 1).astype(int)
        for a, b in zip(bounds, bounds[1:]):
            with Section() as s:
                outs = llm.embed(docs[a:b], truncate_prompt_tokens=-1)
            s_eng.add(s)
            eng_d += [o.outputs.data for o in outs]
            eng_tokens += sum(len(o.prompt_token_ids) for o in outs)
            for dt, model in baselines.items():
                with Section() as s:
                    st_d[dt].append(model.encode(docs[a:b], batch_size=args.st_batch_size, convert_to_numpy=True))
                s_st[dt].add(s)
        eng_d = np.stack(eng_d)
        st_d = {dt: np.concatenate(v).astype(np.float32) for dt, v in st_d.items()}

        eng_q = np.stack([o.outputs.data for o in llm.embed(qtexts, truncate_prompt_tokens=-1)])
        st_q = {dt: model.encode(qtexts, batch_size=args.st_batch_size, convert_to_numpy=True).astype(np.float32)
                for dt, model in baselines.items()}

    if eng_tokens != sum(lengths):
        print(f"note: engine saw {eng_tokens} tokens, sentence-transformers {sum(lengths)}\n")
    nd_eng = ndcg_at_10(eng_q, qids, eng_d, dids, qrels)
    nd_st = {dt: ndcg_at_10(st_q[dt], qids, st_d[dt], dids, qrels) for dt in baselines}
    same = dtype if dtype in baselines else torch.float32  # the baseline the ratio column divides by

    def name(dt: torch.dtype) -> str:
        return str(dt).removeprefix("torch.")

    headers = ["system", "dtype", "docs", "tokens", "seconds", "docs/s", "tokens/s", "model GFLOP/s",
               "% of mm peak", f"vs sentence-transformers {name(same)}", "NDCG@10", "other cores"]
    systems = [("engine LLM.embed", dtype, s_eng, nd_eng)]
    systems += [("sentence-transformers encode", dt, s_st[dt], nd_st[dt]) for dt in baselines]
    rows = []
    for label, dt, s, nd in systems:
        g = flops / s.seconds / 1e9
        pk = peaks.get(dt, (float("nan"),))[0]
        rows.append([label, name(dt), len(docs), sum(lengths), s.seconds, len(docs) / s.seconds,
                     sum(lengths) / s.seconds, g, 100 * g / pk, ratio(s_st[same].seconds, s.seconds), f"{nd:.5f}",
                     s.other_cores])
    if len(dids) == len(corpus):
        rows.append(["published (MTEB)", "-", len(corpus), "-", "-", "-", "-", "-", "-", "-", f"{PUBLISHED_NDCG10:.5f}", "-"])
    print(table(headers, rows))
    print(f"\nmodel FLOPs: {flops / 1e9:.1f} GFLOP for the corpus ({flops / sum(lengths) / 1e6:.1f} MFLOP/token "
          f"at these lengths); % of mm peak uses each row's dtype's peak.")
    ref = st_d[torch.float32]
    cos = (eng_d / np.linalg.norm(eng_d, axis=1, keepdims=True) *
           (ref / np.linalg.norm(ref, axis=1, keepdims=True))).sum(1)
    print(f"embedding parity engine vs sentence-transformers float32: cosine min {cos.min():.6f}, mean {cos.mean():.6f}; "
          f"NDCG@10 delta {nd_eng - nd_st[torch.float32]:+.5f}")
    if len(dids) != len(corpus):
        print(f"NDCG@10 is over a {len(dids)}-doc corpus, higher than on the full corpus: "
              f"not comparable to the published {PUBLISHED_NDCG10} (use --full).")


if __name__ == "__main__":
    main()
