"""Where a GPU step's time goes, for the rows of bench/gpu.py that are furthest from their physical limit.

torch.profiler over three of its workloads, each after a warm-up: decode steps at 256 running on the random
1B-shape Llama (eager, every kernel launched by itself, and replayed from the CUDA graphs), the SmolLM2-shape
yes/no rerank of 4 x 100 pairs and the fp32 MiniLM embedding of 1,000 SciFact documents, each not compiled and
with torch_compile. For each: the wall time, the device's busy time (its kernels' time summed: the rest of the wall
time the device waited on the host) and the kernels that took most of it, grouped by name; for the rerank and
embedding rows also a second run's host phases (host_phases), which say where a host-bound row's time goes,
and a third run's Python functions (cProfile).

    python bench/gpu_profile.py --model .gpu/minilm --data .gpu/scifact    # on one GPU, ~2-3 min
    python bench/gpu_profile.py --small                                      # CPU smoke run (CPU ops)
    python bench/gpu_profile.py --skip decode embed                          # the rerank rows only"""
import collections
import cProfile
import io
import os
import pstats
import random
import sys
import tempfile
import time
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table  # noqa: E402
from gpu import (Sizes, arguments, decoding_engine, embedding_corpus, engine_llm, free, random_decoder,  # noqa: E402
                 random_ids, rerank_texts, sync)

TOP = 12
# Not compiled: eager, but on CUDA a decoder's prefill steps replay the piecewise graphs (engine.prefill_graphs).
MODES = {False: "not compiled", True: "torch_compile"}


def profiled(device: torch.device, label: str, fn) -> None:
    """Runs fn once under the profiler and prints its wall time, device busy time and top kernels."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t
    kernels = {}
    for e in prof.key_averages():
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            calls, total = kernels.get(e.key, (0, 0.0))
            kernels[e.key] = (calls + e.count, total + us)
    busy = sum(us for _, us in kernels.values()) / 1e3
    what = "device kernels" if cuda else "CPU ops (self time)"
    print(f"\n### {label}: wall {wall * 1e3:.1f} ms, {what} {busy:.1f} ms ({100 * busy / (wall * 1e3):.0f}% of wall)\n")
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:TOP]
    print(table(["kernel" if cuda else "op", "calls", "ms", "% of busy"],
                [[name[:90], calls, f"{us / 1e3:.2f}", f"{100 * us / 1e3 / busy:.1f}"] for name, (calls, us) in top]))


@contextmanager
def host_phases(llm):
    """Seconds of an LLM pooling call's host phases, as a Counter: encoding its inputs (input processor),
    scheduling, preparing and launching each step (ModelRunner.execute: on a GPU the Python and launch overhead
    of the step's kernels, on a CPU their work too), waiting for each step's results (StepResult.get: the
    device's share where the host waits) and building outputs; the wall time's remainder is the rest of the
    engine's and LLM's Python."""
    from engine.model_runner import StepResult
    eng, spent = llm.engine, collections.Counter()

    def timed(fn, label):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - t
        return wrapper
    patched = [(eng.input_processor, name, "encode inputs") for name in ("embed", "score", "classify")] + [
        (eng.scheduler, "schedule", "schedule"), (eng.runner, "execute", "prepare and launch steps"),
        (eng.output_processor, "process_pooled", "build outputs")]
    for obj, name, label in patched:  # instance attributes shadow the methods until deleted
        setattr(obj, name, timed(getattr(obj, name), label))
    get = StepResult.get
    StepResult.get = timed(get, "wait for results")
    try:
        yield spent
    finally:
        StepResult.get = get
        for obj, name, _ in patched:
            delattr(obj, name)


def phases_table(device: torch.device, label: str, llm, fn) -> None:
    """One more (unprofiled) run of fn, its wall time split into host_phases."""
    sync(device)
    with host_phases(llm) as spent:
        t = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t
    spent["other host work"] = wall - sum(spent.values())
    print(f"\n{label}, host phases (wall {wall * 1e3:.1f} ms):\n")
    print(table(["phase", "ms", "% of wall"], [[k, f"{v * 1e3:.1f}", f"{100 * v / wall:.0f}"] for k, v in spent.items()]))


def python_profile(device: torch.device, label: str, fn) -> None:
    """One more run of fn under cProfile: the host's Python functions that took most of it, by own time and
    by time with what they call (cProfile slows Python calls, so shares, not milliseconds, are the point)."""
    sync(device)
    prof = cProfile.Profile()
    prof.enable()
    fn()
    sync(device)
    prof.disable()
    for key, title in (("tottime", "own time"), ("cumulative", "with callees")):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(TOP + 8)
        print(f"\n{label}, cProfile by {title}:\n")
        print("\n".join(line for line in out.getvalue().splitlines()[4:] if line.strip()))


def decode(sizes: Sizes, device: torch.device, dtype: str, path: str, vocab: int, n: int) -> None:
    rng = random.Random(n)
    prompts = [random_ids(rng, sizes.prompt, vocab) for _ in range(n)]
    for eager in (True, False):
        llm = decoding_engine(sizes, device, dtype, path, prompts, enforce_eager=eager)
        eng = llm.engine
        mode = "eager (enforce_eager)" if eager else "CUDA graphs" if device.type == "cuda" else "default"
        profiled(device, f"{sizes.decode_steps} decode steps, {n} running, {dtype}, {mode}",
                 lambda: [eng.step() for _ in range(sizes.decode_steps)])
        while eng.has_unfinished():
            eng.step()
        del llm, eng
        free(device)


def rerank(sizes: Sizes, device: torch.device, dtype: str, small: bool) -> None:
    with tempfile.TemporaryDirectory() as path:
        queries, documents = rerank_texts(sizes, random_decoder("smollm2-135m", small, device, path).config.vocab_size)
        free(device)
        flat_q = [q for q in queries for _ in range(sizes.docs)]
        for compiled in (False, True):
            llm = engine_llm(path, dtype, task="score", score_tokens=("no", "yes"), max_model_len=1024,
                             max_num_batched_tokens=16384, max_num_seqs=256, device=str(device), torch_compile=compiled)
            llm.score(flat_q, [d for ds in documents() for d in ds])
            docs = [d for ds in documents() for d in ds]
            label = f"yes/no rerank {len(docs)} pairs, SmolLM2-135M shape, {dtype}, {MODES[compiled]}"
            profiled(device, label, lambda: llm.score(flat_q, docs))
            docs = [d for ds in documents() for d in ds]  # fresh documents: no prefix-cache hits on them
            phases_table(device, label, llm, lambda: llm.score(flat_q, docs))
            docs = [d for ds in documents() for d in ds]
            python_profile(device, label, lambda: llm.score(flat_q, docs))
            del llm
            free(device)


def embed(args, sizes: Sizes, device: torch.device) -> None:
    from engine.loader import resolve_model
    corpus, _, _, source = embedding_corpus(args.data)
    docs = list(corpus.values())[:sizes.embed_docs or 1000]
    for compiled in (False, True):
        llm = engine_llm(resolve_model(args.model), "float32", task="embed", max_model_len=256,
                         max_num_batched_tokens=32768, device=str(device), torch_compile=compiled)
        llm.embed(docs[:64], truncate_prompt_tokens=-1)
        label = f"embed {len(docs)} docs ({source}), MiniLM-L6, float32, {MODES[compiled]}"
        profiled(device, label, lambda: llm.embed(docs, truncate_prompt_tokens=-1))
        phases_table(device, label, llm, lambda: llm.embed(docs, truncate_prompt_tokens=-1))
        python_profile(device, label, lambda: llm.embed(docs, truncate_prompt_tokens=-1))
        del llm
        free(device)


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--skip", nargs="*", default=[], choices=["decode", "rerank", "embed"])
    args = ap.parse_args()
    device = torch.device(args.device)
    sizes = Sizes(args.small)
    dtype = "float32" if device.type == "cpu" else "bfloat16"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"## bench/gpu_profile.py on {name}, torch {torch.__version__}")
    if "decode" not in args.skip:
        with tempfile.TemporaryDirectory() as path:
            vocab = random_decoder("llama-1b", args.small, device, path).config.vocab_size
            free(device)
            decode(sizes, device, dtype, path, vocab, sizes.running[0])
    if "rerank" not in args.skip:
        rerank(sizes, device, dtype, args.small)
    if "embed" not in args.skip:
        embed(args, sizes, device)


if __name__ == "__main__":
    main()
