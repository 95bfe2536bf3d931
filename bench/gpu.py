"""The engine on one GPU against the baselines of the same run, in one table (issue 8).

Needs only torch, transformers, sentence-transformers and this repository's engine (no Ray). Rows:
  - SciFact embedding with all-MiniLM-L6-v2, fp32 and bf16: docs/s and NDCG@10, engine LLM.embed vs
    sentence-transformers encode (batch 128) at the same dtype, and the share of the run the engine's host
    waited on the device (near 100%: device-bound; near 0: host-bound);
  - decode step ms and tok/s (a whole LLMEngine.step(), outputs final-only as LLM.generate takes them),
    async scheduling on (the CUDA default) and off, with 256 and 1,024 sequences running (128-token prompts) on a random
    1B-shape Llama (hidden 2048, 16 layers, 32/8 heads, vocab 49,152), bf16, vs Hugging Face's own
    decode step (DynamicCache) at the same batch; and 4 sequences at 4,000 tokens of context, where the paged
    kernel splits each context (its figure without splitting beside it);
  - 256 prompts x 128 tokens -> 128 tokens end to end, engine LLM.generate vs HF `generate`, one batch, and
    the share of the run the engine's host spent waiting for the device (which of the two bounds it), with
    --torch-compile also compiled;
  - the same requests as DELTA streams through AsyncLLM, read as the server reads them (every 50 ms) with the
    engine on a thread and in its own process, and read every step, vs LLM.generate's final-only outputs;
  - yes/no reranking, 4 queries x 100 documents of ~280 tokens a pair, on random SmolLM2-135M and
    Qwen3-Reranker-0.6B shapes, engine LLM.score vs HF, one left-padded batch per query, both from text
    (the same prompt template and tokenizer; on CUDA also the engine with enforce_eager, without the piecewise
    prefill graphs; with --torch-compile also the engine with torch_compile), and the host's waiting share as
    above;
  - greedy parity: engine vs HF `generate`, fp32, identical token sequences out of N.

With --quantization (e.g. fp8) or --kv-cache-dtype fp8 only the decode-step, long-context and rerank rows run, the engine's
decoders quantized that way and the baselines as they are (the same dtype's HF, so the ratio includes what
quantizing gives up: the quality column says how much for the rerank scores); their physical-limit column is
not computed.

Each row also gives the workload's physical limit on the card (a roofline: FLOPs at the dense matrix peak or
bytes at the memory bandwidth, step by step; the peaks of H100 and H200 are known, --card-peaks names another's)
and the engine's share of it.

    python bench/gpu.py --model /path/to/all-MiniLM-L6-v2 --data /path/to/scifact   # on one GPU, < 5 min
    python bench/gpu.py --small                                                       # CPU, tiny shapes

--model defaults to the bundled all-MiniLM-L6-v2; without --data (or SCIFACT_DIR) a synthetic corpus is
embedded instead and its NDCG@10 only compares the two systems. --small shrinks every shape and count
so the whole script runs on a CPU in a few minutes; its numbers only show that every row works."""
import argparse
from contextlib import contextmanager
import gc
import os
import random
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SCIFACT, load_scifact, ratio, table  # noqa: E402  (also puts the repo on sys.path)
from embed import bert_flops, ndcg_at_10  # noqa: E402

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "yes", "no"]
# Random-weight decoder shapes: (config class name, config fields).
SHAPES = {
    "llama-1b": ("LlamaConfig", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                     num_key_value_heads=8, intermediate_size=8192, vocab_size=49152)),
    "smollm2-135m": ("LlamaConfig", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                         tie_word_embeddings=True)),
    "qwen3-reranker-0.6b": ("Qwen3Config", dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                                                num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                                                vocab_size=151669, tie_word_embeddings=True)),
}
# How often the server hands a stream its tokens (deployments.limits: stream_batching_interval_ms's default).
SERVER_STREAM_INTERVAL_S = 0.05
SMALL_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=512)


class Sizes:
    def __init__(self, small: bool):
        self.running = (8, 32) if small else (256, 1024)
        self.prompt, self.output = (16, 8) if small else (128, 128)
        self.e2e = 16 if small else 256
        self.decode_steps = 5 if small else 20
        self.queries, self.docs, self.doc_words = (2, 8, 40) if small else (4, 100, 250)
        self.parity_prompts, self.parity_tokens = (4, 8) if small else (16, 32)
        self.embed_docs = 64 if small else None  # None: the whole corpus
        self.st_batch = 32 if small else 128


# ---- physical limits ---------------------------------------------------------------------------
# NVIDIA data sheets (SXM unless named): dense tensor-core bf16 TFLOP/s, fp32 TFLOP/s without tensor cores
# (torch keeps fp32 matmuls off tf32 by default) and memory TB/s. The first name found in the card's wins.
CARD_PEAKS = {"H200": (989, 67, 4.8), "H100 PCIe": (756, 51, 2.0), "H100 NVL": (835, 60, 3.9),
              "H100": (989, 67, 3.35)}


class Limits:
    """The fastest a workload can run on the card: its FLOPs at the matrix peak or its bytes at the memory
    bandwidth, whichever takes longer, phase by phase (a roofline). Unknown (None) on a card not in CARD_PEAKS
    unless --card-peaks names its figures, and on a CPU."""

    def __init__(self, device: torch.device, peaks: tuple[float, float, float] | None):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        self.peaks = peaks or next((p for card, p in CARD_PEAKS.items() if card in name), None)

    def seconds(self, phases: list[tuple[float, float]], dtype: str) -> float | None:
        """phases: (FLOPs, bytes) of each step (a step cannot overlap the next: it needs its outputs)."""
        if self.peaks is None:
            return None
        bf16, fp32, tbs = self.peaks
        flops_per_s = (fp32 if dtype == "float32" else bf16) * 1e12
        return sum(max(flops / flops_per_s, nbytes / (tbs * 1e12)) for flops, nbytes in phases)

    def cell(self, phases: list[tuple[float, float]], dtype: str, work: float, unit: str, achieved: float) -> str:
        """The limit as the row's rate (work per second at the limit) and the engine's share of it."""
        secs = self.seconds(phases, dtype)
        if secs is None:
            return "-"
        return f"{work / secs:,.0f} {unit} (engine at {100 * achieved * secs / work:.0f}%)"


class DecoderCost:
    """FLOPs (2 per multiply-add) and bytes of a decoder's steps: the layers' matmuls, attention's QK^T and AV
    over each query's keys, the LM head for the rows that need logits; bytes are the weights read once a step
    and the KV cache read (decode) or written (prefill)."""

    def __init__(self, cfg, dtype: str):
        h, layers, heads = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or h // heads
        q, kv = heads * head_dim, cfg.num_key_value_heads * head_dim
        self.layer_params = layers * (h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size)
        self.head_params = cfg.vocab_size * h
        self.attention = 4 * layers * q  # FLOPs per (query, key) pair
        self.width = torch.finfo(getattr(torch, dtype)).bits // 8
        self.kv_bytes = 2 * layers * kv * self.width  # per token

    def weight_bytes(self) -> float:
        return (self.layer_params + self.head_params) * self.width

    def prefill(self, new: list[int], cached: list[int] | None = None, logits_rows: int = 0) -> tuple[float, float]:
        """One step computing new[i] tokens after cached[i] cached ones (causal)."""
        cached = cached or [0] * len(new)
        pairs = sum(n * c + n * (n + 1) / 2 for n, c in zip(new, cached))
        flops = 2 * self.layer_params * sum(new) + self.attention * pairs + 2 * self.head_params * logits_rows
        return flops, self.weight_bytes() + self.kv_bytes * sum(new)

    def decode(self, contexts: list[int]) -> tuple[float, float]:
        """One step, a token for each sequence whose context (its new token included) is contexts[i]."""
        n, keys = len(contexts), sum(contexts)
        return (2 * (self.layer_params + self.head_params) * n + self.attention * keys,
                self.weight_bytes() + self.kv_bytes * keys)

    def generation(self, n: int, prompt: int, output: int) -> list[tuple[float, float]]:
        """n prompts prefilled (one step at the limit), then output - 1 decode steps."""
        return [self.prefill([prompt] * n, logits_rows=n)] + [self.decode([prompt + j] * n) for j in range(1, output)]


# ---- helpers ----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(device: torch.device, fn) -> tuple[float, object]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def word_tokenizer(vocab_size: int):
    """Word-level: "w<i>" is token i, so random token ids round-trip through text exactly."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers
    tokens = SPECIALS + [f"w{i}" for i in range(len(SPECIALS), vocab_size)]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                     unk_token="<unk>")


def random_decoder(shape: str, small: bool, device: torch.device, path: str):
    """A random-weight HF model of the shape, saved with its tokenizer; returns the fp32 model on device."""
    import transformers as T
    cls_name, fields = SHAPES[shape]
    fields = dict(fields, **SMALL_SHAPE) if small else fields
    if small and cls_name == "Qwen3Config":
        fields["head_dim"] = 32
    config = getattr(T, cls_name)(**fields, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, architectures=[cls_name.replace("Config", "ForCausalLM")])
    torch.manual_seed(0)
    with torch.device(device):
        model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(path)
    word_tokenizer(config.vocab_size).save_pretrained(path)
    return model


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(len(SPECIALS), vocab) for _ in range(n)]


# Which attention kernels the engines ran (the device's checks pick them at start-up), printed under the table.
KERNELS: set[str] = set()


def engine_llm(path: str, dtype: str, **kw):
    from engine import LLM
    llm = LLM(path, dtype=dtype, **kw)
    runner = llm.engine.runner
    layer_ops = getattr(runner.model, "layer_ops", None)
    KERNELS.add(f"{dtype} {llm.engine.task}: {runner.attention_backend.name}"
                + (f", layer ops {layer_ops.name}" if layer_ops is not None else "")
                + (f", prefill steps of up to {runner.prefill_graphs.max_tokens:,} tokens from piecewise CUDA graphs"
                   if runner.prefill_graphs is not None else ""))
    return llm


def add_request(eng, rid: str, ids: list[int], params) -> None:
    (getattr(eng, "add_generation", None) or eng.add_request)(rid, ids, params)


# ---- rows -------------------------------------------------------------------------------------
def embedding_corpus(data: str | None) -> tuple[dict, dict, dict, str]:
    """corpus, queries, qrels and the source's name: SciFact where data (or SCIFACT_DIR) has it, else a synthetic
    corpus whose query i is the opening words of document i."""
    data = data or SCIFACT
    if os.path.exists(os.path.join(data, "corpus.jsonl")):
        return *load_scifact(data), "SciFact"
    rng = random.Random(0)
    words = [f"word{i}" for i in range(3000)]
    corpus = {str(i): " ".join(rng.choice(words) for _ in range(rng.randint(40, 250))) for i in range(2000)}
    queries = {f"q{i}": " ".join(corpus[str(i)].split()[:12]) for i in range(0, 2000, 10)}
    qrels = {f"q{i}": {str(i): 1} for i in range(0, 2000, 10)}
    return corpus, queries, qrels, "synthetic corpus"


def embedding_rows(args, sizes: Sizes, device: torch.device, dtypes: list[str],
                   compile_modes: tuple[bool, ...] = (False,)) -> list[list]:
    from sentence_transformers import SentenceTransformer

    from engine.loader import resolve_model
    model_dir = resolve_model(args.model)
    corpus, queries, qrels, source = embedding_corpus(args.data)
    import transformers as T
    bert = T.AutoConfig.from_pretrained(model_dir)
    dids = list(corpus)[:sizes.embed_docs] if sizes.embed_docs else list(corpus)
    keep = set(dids)
    qids = [q for q in qrels if all(d in keep for d in qrels[q])]
    docs, qtexts = [corpus[d] for d in dids], [queries[q] for q in qids]
    rows = []
    for dtype in dtypes:
        torch_dtype = getattr(torch, dtype)
        st = SentenceTransformer(model_dir, device=str(device))
        st.max_seq_length = 256
        st.to(torch_dtype)
        st.encode(docs[:64], batch_size=sizes.st_batch)
        st_secs, s_docs = timed(device, lambda: st.encode(docs, batch_size=sizes.st_batch, convert_to_numpy=True))
        s_q = st.encode(qtexts, batch_size=sizes.st_batch, convert_to_numpy=True)
        del st
        free(device)
        nd_s = ndcg_at_10(s_q.astype(np.float32), qids, s_docs.astype(np.float32), dids, qrels)
        for compiled in compile_modes:
            llm = engine_llm(model_dir, dtype, task="embed", max_model_len=256, max_num_batched_tokens=32768,
                             device=str(device), torch_compile=compiled)
            llm.embed(docs[:64], truncate_prompt_tokens=-1)  # warm-up (and FlexAttention's compile, where used)
            with host_waits() as waited:
                secs, outs = timed(device, lambda: llm.embed(docs, truncate_prompt_tokens=-1))
            e_docs = np.stack([o.outputs.data for o in outs])
            flops = bert_flops([len(o.prompt_token_ids) for o in outs], bert)
            e_q = np.stack([o.outputs.data for o in llm.embed(qtexts, truncate_prompt_tokens=-1)])
            del llm
            free(device)
            nd_e = ndcg_at_10(e_q, qids, e_docs, dids, qrels)
            rows.append([f"embed {len(docs)} docs ({source}), MiniLM-L6, {dtype}" + (", torch_compile" if compiled else ""),
                         "docs/s", f"{len(docs) / secs:,.0f}", f"{len(docs) / st_secs:,.0f}", ratio(st_secs, secs),
                         f"NDCG@10 {nd_e:.5f} vs {nd_s:.5f}; host waited {100 * waited[0] / secs:.0f}%",
                         "sentence-transformers encode",
                         args.limits.cell([(flops, 0.0)], dtype, len(docs), "docs/s", len(docs) / secs)])
    return rows


def decode_rows(args, sizes: Sizes, device: torch.device, dtype: str, path: str, hf) -> list[list]:
    """Engine decode steps with N running, async scheduling on (the default on CUDA) and off, against HF's
    decode step at the same N; the engine quantized as args.engine_options say."""
    rows, vocab = [], hf.config.vocab_size
    hf_dtype = hf.to(getattr(torch, dtype))
    cost = DecoderCost(hf.config, dtype)
    context = sizes.prompt + 3 + sizes.decode_steps // 2  # the timed steps' middle (after two untimed ones)
    for n in sizes.running:
        rng = random.Random(n)
        prompts = [random_ids(rng, sizes.prompt, vocab) for _ in range(n)]
        hf_ms = hf_decode_step_ms(hf_dtype, prompts, sizes.decode_steps, device)
        free(device)
        modes = [(True, False), (False, False)] + ([(True, True)] if args.torch_compile else [])
        for async_scheduling, torch_compile in modes:
            step_ms = engine_decode_step_ms(sizes, device, dtype, path, prompts, async_scheduling, torch_compile,
                                            **args.engine_options)
            mode = ("async scheduling" if async_scheduling else "synchronous scheduling") + (
                ", torch_compile" if torch_compile else "")
            limit = "-" if args.engine_options else args.limits.cell([cost.decode([context] * n)], dtype, n, "tok/s",
                                                                   n / step_ms * 1e3)
            weights = weights_label(dtype, args.engine_options)
            label = f"decode step, {n} running, random {args.decoder_shape}, {weights}"
            rows.append([f"{label}, {mode}", "ms (tok/s)", f"{step_ms:.2f} ({n / step_ms * 1e3:,.0f})",
                         f"{hf_ms:.2f} ({n / hf_ms * 1e3:,.0f})",
                         ratio(hf_ms, step_ms), "", f"HF forward step, DynamicCache, {dtype}", limit])
    return rows


def long_context_rows(args, sizes: Sizes, device: torch.device, dtype: str, path: str, hf) -> list[list]:
    """A few sequences over long contexts, where one program per (sequence, kv head) would leave most of the GPU
    idle: the engine's decode step with contexts split into partitions (its default) and not split, against
    HF's decode step."""
    import copy
    import engine.triton_decode as triton_decode
    n, context = (2, 200) if args.small else (4, 4000)  # the random models hold 4,096 positions
    long = copy.copy(sizes)
    long.prompt = context
    rng = random.Random(context)
    prompts = [random_ids(rng, context, hf.config.vocab_size) for _ in range(n)]
    hf_ms = hf_decode_step_ms(hf.to(getattr(torch, dtype)), prompts, sizes.decode_steps, device)
    free(device)
    split_ms = engine_decode_step_ms(long, device, dtype, path, prompts, async_scheduling=True, **args.engine_options)
    default = triton_decode.TritonPagedDecode
    triton_decode.TritonPagedDecode = lambda *a, **kw: default()  # every engine built meanwhile: never split
    try:
        whole_ms = engine_decode_step_ms(long, device, dtype, path, prompts, async_scheduling=True,
                                         **args.engine_options)
    finally:
        triton_decode.TritonPagedDecode = default
    at = context + 3 + sizes.decode_steps // 2
    limit = "-" if args.engine_options else args.limits.cell([DecoderCost(hf.config, dtype).decode([at] * n)], dtype,
                                                             n, "tok/s", n / split_ms * 1e3)
    return [[f"decode step, {n} running at {context:,} tokens of context, random {args.decoder_shape}, "
             f"{weights_label(dtype, args.engine_options)}, contexts split (async scheduling)", "ms (tok/s)",
             f"{split_ms:.2f} ({n / split_ms * 1e3:,.0f})", f"{hf_ms:.2f} ({n / hf_ms * 1e3:,.0f})",
             ratio(hf_ms, split_ms), f"contexts not split: {whole_ms:.2f} ms", "HF forward step, DynamicCache", limit]]


def weights_label(dtype: str, options: dict) -> str:
    """dtype and the engine options a row's engine ran with (quantization, kv_cache_dtype)."""
    return ", ".join([dtype, *(f"{name} {value}" for name, value in options.items())])


def decoding_engine(sizes: Sizes, device: torch.device, dtype: str, path: str, prompts: list[list[int]], **kw):
    """An engine (LLM) with every prompt prefilled and two decode steps taken, each request with
    sizes.decode_steps more to go and a few spare; kw: more engine options."""
    from engine import SamplingParams
    from engine.params import RequestOutputKind
    n, tokens_per_seq = len(prompts), sizes.prompt + sizes.decode_steps + 8
    llm = engine_llm(path, dtype, max_num_seqs=n, max_num_batched_tokens=max(8192, 2 * sizes.prompt),
                     num_blocks=n * -(-tokens_per_seq // 16) + 8, max_model_len=tokens_per_seq + 16,
                     device=str(device), **kw)
    eng = llm.engine
    # One output at the end, as LLM.generate and a non-streaming server request take them.
    params = SamplingParams(temperature=0.0, max_tokens=sizes.decode_steps + 6, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    for i, ids in enumerate(prompts):
        add_request(eng, f"d{i}", ids, params)
    sched = eng.scheduler
    while sched.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running):
        eng.step()  # the prefills, chunked by the token budget
    for _ in range(2):
        eng.step()
    return llm


def engine_decode_step_ms(sizes: Sizes, device: torch.device, dtype: str, path: str, prompts: list[list[int]],
                          async_scheduling: bool, torch_compile: bool = False,
                          **options) -> float:
    llm = decoding_engine(sizes, device, dtype, path, prompts, async_scheduling=async_scheduling,
                          torch_compile=torch_compile, **options)
    eng = llm.engine
    secs, _ = timed(device, lambda: [eng.step() for _ in range(sizes.decode_steps)])
    while eng.has_unfinished():
        eng.step()
    del llm, eng
    free(device)
    return 1e3 * secs / sizes.decode_steps


@torch.inference_mode()
def hf_decode_step_ms(hf, prompts: list[list[int]], steps: int, device: torch.device) -> float:
    from transformers import DynamicCache
    ids = torch.tensor(prompts, device=device)
    cache = DynamicCache()
    out = hf(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(2):
        nxt = hf(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)

    def run():
        x = nxt
        for _ in range(steps):
            x = hf(input_ids=x, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    secs, _ = timed(device, run)
    return 1e3 * secs / steps


@contextmanager
def host_waits():
    """Seconds the engine's host spends blocked on steps still running on the device (StepResult.get): near
    the whole run, the device bounds it; near zero, the host does."""
    from engine.model_runner import StepResult
    get, waited = StepResult.get, [0.0]

    def timed_get(self):
        if self.done is not None:
            t = time.perf_counter()
            self.done.synchronize()
            waited[0] += time.perf_counter() - t
        return get(self)
    StepResult.get = timed_get
    try:
        yield waited
    finally:
        StepResult.get = get


def e2e_engine_kwargs(sizes: Sizes, device: torch.device) -> dict:
    """The engine of the end-to-end rows: every request running at once, its KV blocks and no more."""
    tokens = sizes.prompt + sizes.output
    return dict(max_num_seqs=sizes.e2e, max_num_batched_tokens=8192, num_blocks=sizes.e2e * -(-tokens // 16) + 8,
                max_model_len=tokens + 16, device=str(device))


def end_to_end_rows(args, sizes: Sizes, device: torch.device, dtype: str, path: str, hf) -> list[list]:
    """The engine's LLM.generate eager and (with --torch-compile) compiled, against one HF generate run."""
    from engine import SamplingParams
    rng = random.Random(1)
    vocab = hf.config.vocab_size
    prompts = [random_ids(rng, sizes.prompt, vocab) for _ in range(sizes.e2e)]
    n_out = sizes.output
    runs = {}  # torch_compile -> (seconds, seconds the host waited on the device)
    for compiled in (False, True) if args.torch_compile else (False,):
        llm = engine_llm(path, dtype, **e2e_engine_kwargs(sizes, device), torch_compile=compiled)
        params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
        llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        with host_waits() as waited:
            secs, outs = timed(device, lambda: llm.generate(prompts, params))
        assert all(len(o.outputs[0].token_ids) == n_out for o in outs)
        runs[compiled] = secs, waited[0]
        del llm
        free(device)
    hf_model = hf.to(getattr(torch, dtype))
    ids = torch.tensor(prompts, device=device)

    def hf_generate():
        with torch.inference_mode():
            return hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_out,
                                     min_new_tokens=n_out, do_sample=False, pad_token_id=0)
    hf_generate()
    hf_secs, _ = timed(device, hf_generate)
    total = sizes.e2e * n_out
    return [[f"{sizes.e2e} x {sizes.prompt} -> {n_out} tokens, random {args.decoder_shape}, {dtype}"
             + (", torch_compile" if compiled else ""), "out tok/s",
             f"{total / secs:,.0f}", f"{total / hf_secs:,.0f}", ratio(hf_secs, secs),
             f"host waited on the device {100 * waited / secs:.0f}% of the run", "HF generate, one batch",
             generation_limit(args, sizes, dtype, hf.config, total / secs)] for compiled, (secs, waited) in runs.items()]


def generation_limit(args, sizes: Sizes, dtype: str, cfg, tokens_per_s: float) -> str:
    """The end-to-end workload's physical limit: every prompt prefilled at once, then one decode step per token."""
    phases = DecoderCost(cfg, dtype).generation(sizes.e2e, sizes.prompt, sizes.output)
    return args.limits.cell(phases, dtype, sizes.e2e * sizes.output, "tok/s", tokens_per_s)


def streams_rows(args, sizes: Sizes, device: torch.device, dtype: str, path: str, cfg) -> list[list]:
    """The end-to-end requests as DELTA streams through AsyncLLM, read as the server reads them (one output per
    limits.stream_batching_interval_ms, its default 50 ms, the steps between merged), the engine on a thread of
    the caller's process or in a process of its own (engine_process, the CUDA default), and in its own process
    read every step (a stream's worst case: every reader woken and every token handed over each step), against
    LLM.generate's final-only outputs of the same requests in the same run."""
    import asyncio

    from engine import EngineConfig, SamplingParams
    from engine.async_engine import AsyncLLM
    from engine.params import RequestOutputKind
    rng = random.Random(4)
    prompts = [random_ids(rng, sizes.prompt, cfg.vocab_size) for _ in range(sizes.e2e)]
    n_out, total = sizes.output, sizes.e2e * sizes.output
    kw = e2e_engine_kwargs(sizes, device)
    params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
    llm = engine_llm(path, dtype, **kw)
    llm.generate(prompts[:4], params)
    base_secs, _ = timed(device, lambda: llm.generate(prompts, params))
    del llm
    free(device)
    stream = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    rows = []
    for process, interval_s in ((False, SERVER_STREAM_INTERVAL_S), (True, SERVER_STREAM_INTERVAL_S), (True, 0.0)):
        async def run() -> tuple[float, float]:
            engine = AsyncLLM(EngineConfig(model=path, dtype=dtype, engine_process=process, **kw))

            async def read(ids: list[int]) -> tuple[int, float]:
                """(tokens, the longest wait between two of its outputs): a pause or a stalled stream shows there."""
                tokens, longest, last = 0, 0.0, None
                async for out in engine.generate(ids, stream, interval_s=interval_s):
                    now = time.perf_counter()
                    tokens += len(out.outputs[0].token_ids)
                    longest, last = max(longest, now - (last or now)), now
                return tokens, longest
            try:
                await asyncio.gather(*[read(p) for p in prompts[:4]])  # warm-up
                t = time.perf_counter()
                reads = await asyncio.gather(*[read(p) for p in prompts])
                secs = time.perf_counter() - t
            finally:
                engine.shutdown()
            assert sum(n for n, _ in reads) == total
            return secs, max(gap for _, gap in reads)
        secs, longest_gap = asyncio.run(run())
        free(device)
        read_as = f"read every {interval_s * 1e3:.0f} ms" if interval_s else "read every step"
        rows.append([f"{sizes.e2e} DELTA streams x {sizes.prompt} -> {n_out} tokens through AsyncLLM, engine "
                     + ("in its own process" if process else "on a thread")
                     + f", {read_as}, random {args.decoder_shape}, {dtype}",
                     "out tok/s", f"{total / secs:,.0f}", f"{total / base_secs:,.0f}", ratio(base_secs, secs),
                     f"longest wait between a stream's outputs {longest_gap * 1e3:.0f} ms",
                     "engine LLM.generate, final-only", generation_limit(args, sizes, dtype, cfg, total / secs)])
    return rows


def parity_row(sizes: Sizes, device: torch.device, path: str, hf) -> list:
    from engine import SamplingParams
    rng = random.Random(2)
    vocab = hf.config.vocab_size
    hf32 = hf.to(torch.float32)
    prompts = [random_ids(rng, rng.randint(sizes.prompt // 2, sizes.prompt), vocab) for _ in range(sizes.parity_prompts)]
    llm = engine_llm(path, "float32", device=str(device), max_model_len=sizes.prompt + sizes.parity_tokens + 16)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=sizes.parity_tokens, ignore_eos=True))
    del llm
    free(device)
    same = 0
    with torch.inference_mode():
        for p, o in zip(prompts, outs):
            x = torch.tensor([p], device=device)
            want = hf32.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=sizes.parity_tokens,
                                 min_new_tokens=sizes.parity_tokens, do_sample=False, pad_token_id=0)[0, len(p):]
            same += o.outputs[0].token_ids == want.tolist()
    return ["greedy parity vs HF generate, float32", "identical sequences",
            f"{same} / {len(prompts)}", "", "", f"{sizes.parity_tokens} tokens each", "HF generate", ""]


def rerank_texts(sizes: Sizes, vocab: int):
    """The rerank rows' queries (12 random words "w<id>"), and a maker of fresh documents, sizes.docs per query."""
    rng = random.Random(3)
    queries = [" ".join(f"w{i}" for i in random_ids(rng, 12, vocab)) for _ in range(sizes.queries)]

    def documents() -> list[list[str]]:
        return [[" ".join(f"w{i}" for i in random_ids(rng, rng.randint(sizes.doc_words // 2, sizes.doc_words), vocab))
                 for _ in range(sizes.docs)] for _ in queries]
    return queries, documents


# How a rerank row's engine runs its prefill steps: as configured (on CUDA replayed from the piecewise prefill
# graphs), without any CUDA graph (enforce_eager), or through one torch.compile graph.
RERANK_MODES = {"default": {}, "enforce_eager": {"enforce_eager": True}, "torch_compile": {"torch_compile": True}}


def rerank_rows(shape: str, sizes: Sizes, device: torch.device, dtype: str, small: bool,
                modes: tuple[str, ...], limits: Limits, options: dict) -> list[list]:
    with tempfile.TemporaryDirectory() as path:
        hf = random_decoder(shape, small, device, path).to(getattr(torch, dtype))
        queries, documents = rerank_texts(sizes, hf.config.vocab_size)
        # The engine warms up on as many other documents (full-size steps, nothing for the timed run to
        # find in the prefix cache), as HF warms up on the whole batch: a 4-pair warm-up left the first
        # full-size steps' start-up in the timed run (H200: 163.8 ms for 400 pairs warmed, ~540 ms cold).
        warm_up, docs = documents(), documents()
        flat_q = [q for q, ds in zip(queries, docs) for _ in ds]
        flat_d = [d for ds in docs for d in ds]
        runs = {}  # mode -> (seconds, scores, seconds the host waited on the device)
        for mode in modes:
            llm = engine_llm(path, dtype, task="score", score_tokens=("no", "yes"), max_model_len=1024,
                             max_num_batched_tokens=16384, max_num_seqs=256, device=str(device),
                             **RERANK_MODES[mode], **options)
            llm.score(flat_q, [d for ds in warm_up for d in ds])
            with host_waits() as waited:
                secs, outs = timed(device, lambda: llm.score(flat_q, flat_d))
            runs[mode] = secs, np.array([o.outputs.score for o in outs]), waited[0]
            prompt = llm.engine.input_processor.yes_no
            del llm
            free(device)
        def encode() -> list[list[list[int]]]:  # the engine's prompt, tokenized per query
            return [prompt.encode([(q, d) for d in ds], 1024, None) for q, ds in zip(queries, docs)]
        encoded = encode()
        tok_per_pair = np.mean([len(x) for xs in encoded for x in xs])
        # At the limit a query's shared head (instruction and query) is computed once, then its documents.
        cost, phases = DecoderCost(hf.config, dtype), []
        for prompts in encoded:
            head = len(os.path.commonprefix(prompts))
            phases += [cost.prefill([head]), cost.prefill([len(x) - head for x in prompts], [head] * len(prompts))]
        yes, no = SPECIALS.index("yes"), SPECIALS.index("no")

        @torch.inference_mode()
        def hf_scores():
            out = []
            for batch in encode():  # from text, as the engine's LLM.score: tokenized, one left-padded batch per query
                width = max(len(x) for x in batch)
                ids = torch.tensor([[0] * (width - len(x)) + x for x in batch], device=device)
                mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=device)
                logits = hf(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1].float()
                out.append(torch.sigmoid(logits[:, yes] - logits[:, no]))
            return torch.cat(out).cpu().numpy()
        hf_scores()
        hf_secs, want = timed(device, hf_scores)
        tokenize_secs, _ = timed(device, encode)
        del hf
        free(device)
    n = len(flat_q)
    return [[f"yes/no rerank {sizes.queries} x {sizes.docs} pairs (~{tok_per_pair:.0f} tok), random {shape}, "
             f"{weights_label(dtype, options)}"
             + ("" if mode == "default" else f", {mode}"),
             "pairs/s", f"{n / secs:,.1f}", f"{n / hf_secs:,.1f}", ratio(hf_secs, secs),
             f"max |score - HF| {np.abs(scores - want).max():.4f}; host waited {100 * waited / secs:.0f}%",
             f"HF from text ({tokenize_secs * 1e3:.0f} ms of it tokenizing), left-padded batch per query, {dtype}",
             "-" if options else limits.cell(phases, dtype, n, "pairs/s", n / secs)]
            for mode, (secs, scores, waited) in runs.items()]


# ---- main -------------------------------------------------------------------------------------
def arguments(doc: str) -> argparse.ArgumentParser:
    """The options this script shares with bench/gpu_profile.py."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MINILM, help="all-MiniLM-L6-v2: a local dir or its name")
    ap.add_argument("--data", default=None, help="SciFact dir (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    ap.add_argument("--small", action="store_true", help="tiny shapes and counts (CPU smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--dtype", default=None, help="decoder rows' dtype (default bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["embed", "decode", "long", "e2e", "streams", "rerank", "parity"])
    ap.add_argument("--card-peaks", type=lambda v: tuple(map(float, v.split(","))), default=None,
                    metavar="BF16,FP32,TBPS", help="the card's dense bf16 and fp32 TFLOP/s and memory TB/s, for the "
                    f"physical-limit column on a card not in {', '.join(CARD_PEAKS)} (e.g. A100 SXM: 312,19.5,2.0)")
    ap.add_argument("--quantization", default=None, help="run only the decode, long-context and rerank rows, the engine's decoders "
                    "quantized so (engine.quantization: int8, w8a8, fp8), the baselines unquantized")
    ap.add_argument("--kv-cache-dtype", default=None, help="as --quantization, for the engine's KV cache (fp8)")
    ap.add_argument("--running", type=int, nargs="+", default=None,
                    help="the decode rows' running counts (default 256 1024; --small 8 32)")
    ap.add_argument("--torch-compile", action="store_true",
                    help="also rows with torch_compile: embedding per dtype and rerank per shape (prefill steps "
                         "through the compiled model), decode per size and end to end (the CUDA graphs capture the "
                         "compiled model)")
    args = ap.parse_args()
    args.engine_options = {name: value for name, value in
                           (("quantization", args.quantization), ("kv_cache_dtype", args.kv_cache_dtype)) if value}
    if args.engine_options:
        args.skip = sorted(set(args.skip) | {"embed", "e2e", "streams", "parity"})
    args.decoder_shape = "llama-1b" if not args.small else "tiny llama"
    device = torch.device(args.device)
    args.limits = Limits(device, args.card_peaks)
    sizes = Sizes(args.small)
    sizes.running = tuple(args.running or sizes.running)
    cpu = device.type == "cpu"
    dtype = args.dtype or ("float32" if cpu else "bfloat16")
    from engine.config import bf16_is_fast
    embed_dtypes = ["float32"] + (["bfloat16"] if bf16_is_fast(device) else [])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"## bench/gpu.py on {name}, torch {torch.__version__}{' (--small: tiny shapes)' if args.small else ''}\n")
    t0 = time.perf_counter()
    rows = []

    def run_rows(label: str, fn) -> None:
        """A row that fails is reported as failed and the others still run: one GPU lease, one table."""
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 (reported in the table, traceback above it)
            traceback.print_exc()
            out = [[label, "FAILED", f"{type(e).__name__}: {str(e)[:80]}", "", "", "", "", ""]]
            free(device)
        rows.extend(out)
        for row in out:
            print(f"[{time.perf_counter() - t0:.0f} s] " + " | ".join(map(str, row)), flush=True)

    if "embed" not in args.skip:
        run_rows("embed", lambda: embedding_rows(args, sizes, device, embed_dtypes,
                                                 (False, True) if args.torch_compile else (False,)))
    if {"decode", "long", "e2e", "streams", "parity"} - set(args.skip):
        with tempfile.TemporaryDirectory() as path:
            hf = random_decoder("llama-1b", args.small, device, path)
            if "parity" not in args.skip:
                run_rows("parity", lambda: [parity_row(sizes, device, path, hf)])
            if "decode" not in args.skip:
                run_rows("decode", lambda: decode_rows(args, sizes, device, dtype, path, hf))
            if "long" not in args.skip:
                run_rows("long context", lambda: long_context_rows(args, sizes, device, dtype, path, hf))
            if "e2e" not in args.skip:
                run_rows("e2e", lambda: end_to_end_rows(args, sizes, device, dtype, path, hf))
            if "streams" not in args.skip:
                run_rows("streams", lambda: streams_rows(args, sizes, device, dtype, path, hf.config))
            del hf
            free(device)
    if "rerank" not in args.skip:
        for shape in ("smollm2-135m", "qwen3-reranker-0.6b"):
            modes = (("default",) + (("enforce_eager",) if device.type == "cuda" else ())
                     + (("torch_compile",) if args.torch_compile else ()))
            run_rows(f"rerank {shape}", lambda: rerank_rows(shape, sizes, device, dtype, args.small, modes,
                                                            args.limits, args.engine_options))
    print(table(["workload", "unit", "engine", "baseline", "engine / baseline", "quality", "baseline is",
                 "physical limit (roofline)"], rows))
    peaks = (f"{args.limits.peaks[0]:g} TFLOP/s bf16, {args.limits.peaks[1]:g} fp32, {args.limits.peaks[2]:g} TB/s"
             if args.limits.peaks else "unknown for this device (--card-peaks)")
    print(f"\nphysical limit: each step's FLOPs at the card's dense matrix peak or its bytes (weights, KV cache) at its "
          f"memory bandwidth, whichever is longer, summed over the workload's steps; peaks {peaks}.")
    print("attention kernels: " + "; ".join(sorted(KERNELS)))
    print(f"{time.perf_counter() - t0:.0f} s in all. bf16 embedding row: "
          f"{'run' if 'bfloat16' in embed_dtypes else 'skipped (bf16 is not fast on this device)'}.")


if __name__ == "__main__":
    main()
