"""The engine's host cost per decode step: a whole `LLMEngine.step()` against the model forward inside it.

The tests' random 2-layer Llama with hidden size 64 makes the model's own work nearly nothing, so what is left
of a step is the host path: scheduling, KV-block bookkeeping, packing the step's inputs, sampling,
detokenizing and building outputs. On a GPU that path bounds a decode step from below however fast
the kernels are (issue 8's target is 4 ms at 256 running), so it is measured here, on any device.

Output kinds: FINAL_ONLY without stop strings is how the server runs a whole (non-streaming)
response (text decoded once at the end), DELTA how it runs a stream (text decoded every token).

A second table runs the same DELTA requests through AsyncLLM, as a server does: the engine's loop steps
and hands each output to the caller's event loop, where one coroutine per request reads its stream. The
model forward is replaced by random hidden states there (varied tokens, so real text to detokenize),
so each step's wall time is host work only: the engine's, the hand-over and the readers'. The engine
runs on a thread of the readers' process (sharing its GIL) or in a process of its own (engine_process);
the readers read every step, or as the server does by default, paced to one read per 50 ms
(limits.stream_batching_interval_ms), the engine merging the steps between. A paced reader gets a burst
per interval, so each configuration runs long enough for 20 intervals (sized from a short probe; the tiny
model's context is raised for it), both reader modes the same number of steps.

A third runs bench/gpu.py's end-to-end workload (LLM.generate, 256 x 128 -> 128) with the forward stubbed:
the most tokens per second the host lets any device reach on it.

    python bench/host.py                 # 64 and 256 running, both output kinds, this machine's device
    python bench/host.py --running 1024"""
import argparse
import asyncio
import bisect
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

from common import ROOT, print_machine, quiet_transformers, table

sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import build_decoder  # noqa: E402 (the tests' tiny models)


# The host's work is the same in any dtype. On CUDA bf16 takes the flash varlen prefill; fp32, where the
# memory-efficient varlen kernel does not check out, takes compiled FlexAttention, compiled again in every
# engine and engine process (on an H200 such an fp32 run printed no row in 90 s, inductor's compile workers busy).
DTYPE = "bfloat16" if torch.cuda.is_available() else "float32"


def prompt_ids(i: int, vocab: int) -> list[int]:
    """Request i's 128-token prompt: varied ids past the special tokens, no two requests alike."""
    return [3 + (i * 7 + j) % (vocab - 3) for j in range(128)]


def measure(model_dir: str, running: int, kind, steps: int) -> tuple[float, float]:
    from engine import EngineConfig, LLMEngine, SamplingParams
    eng = LLMEngine(EngineConfig(model=model_dir, dtype=DTYPE, max_num_seqs=running, block_size=16,
                                 max_num_batched_tokens=running * 130, num_blocks=running * 20, enforce_eager=True))
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True, output_kind=kind)
    for i in range(running):
        eng.add_generation(f"r{i}", prompt_ids(i, eng.vocab_size), params)
    eng.step()  # every prefill
    eng.step()
    forward_s: list[float] = []
    model, inner = eng.runner.model, eng.runner.model.forward

    def timed_forward(*args, **kwargs):
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        if out.is_cuda:
            torch.cuda.synchronize()
        forward_s.append(time.perf_counter() - t)
        return out
    model.forward = timed_forward
    step_s = []
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()
        step_s.append(time.perf_counter() - t)
    return statistics.median(step_s) * 1e3, statistics.median(forward_s) * 1e3


def stub_engine(config):
    """The engine with its model forward replaced by random hidden states (varied tokens, so real text to
    detokenize): a module-level function, so a spawned engine process can build it too."""
    from engine import LLMEngine
    engine = LLMEngine(config)
    stub_forward(engine)
    return engine


def stub_forward(engine) -> None:
    """Random hidden states in the model's dtype instead of its forward: a row for each of the step's output
    rows where the step names them (Context.output_rows), as the model returns them, else for every token."""
    from engine.context import get_context
    hidden, dtype = engine.runner.model.spec.hidden_size, engine.runner.dtype

    def forward(ids: torch.Tensor, pos: torch.Tensor, types=None) -> torch.Tensor:
        rows = get_context().output_rows
        return torch.randn(ids.shape[0] if rows is None else rows.shape[0], hidden, device=ids.device, dtype=dtype)
    engine.runner.model.forward = forward


def measure_async_llm(model_dir: str, running: int, kind, steps: int, interval_s: float = 0.0,
                      engine_process: bool = False) -> float:
    """ms per decode step while `running` DELTA streams are read through AsyncLLM, the model forward stubbed: the
    engine's host work, the hand-over and the readers' share of the GIL. From the rate at which the readers
    receive tokens over the middle half of the run (the prefill, arrivals and departures are outliers).
    interval_s paces the readers as a server's stream_batching_interval_ms does; engine_process runs the
    engine in a process of its own."""
    from engine import EngineConfig, SamplingParams
    from engine.async_engine import AsyncLLM

    async def run() -> float:
        blocks = -(-(128 + steps + 8) // 16)  # a request's prompt and outputs
        llm = AsyncLLM(EngineConfig(model=model_dir, dtype=DTYPE, max_num_seqs=running, block_size=16,
                                    max_num_batched_tokens=running * 130, num_blocks=running * blocks + 8,
                                    max_model_len=blocks * 16, enforce_eager=True, num_threads=1,
                                    engine_process=engine_process), stub_engine)
        params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True, output_kind=kind)
        vocab = llm.tokenizer.vocab_size
        received: list[tuple[float, int]] = []

        async def read(i: int) -> None:
            async for out in llm.generate(prompt_ids(i, vocab), params, interval_s=interval_s):
                received.append((time.perf_counter(), len(out.outputs[0].token_ids)))
        try:
            await asyncio.gather(*[read(i) for i in range(running)])  # warm-up
            received.clear()
            await asyncio.gather(*[read(i) for i in range(running)])
        finally:
            llm.shutdown()
        received.sort()
        counts = list(itertools.accumulate(n for _, n in received))
        lo, hi = (bisect.bisect_left(counts, counts[-1] * q) for q in (0.25, 0.75))
        tokens_per_s = (counts[hi] - counts[lo]) / (received[hi][0] - received[lo][0])
        return running / tokens_per_s * 1e3
    return asyncio.run(run())


def measure_generate(model_dir: str, running: int, output: int) -> float:
    """Seconds of LLM.generate for `running` 128-token prompts x `output` tokens with the model forward
    stubbed: the host-bound ceiling of bench/gpu.py's end-to-end row (which runs 256 x 128 -> 128)."""
    from engine import LLM, SamplingParams
    llm = LLM(model_dir, dtype=DTYPE, max_num_seqs=running, block_size=16, num_blocks=running * 20,
              enforce_eager=True)
    stub_forward(llm.engine)
    vocab = llm.engine.vocab_size
    prompts = [{"prompt_token_ids": prompt_ids(i, vocab)} for i in range(running)]
    params = SamplingParams(temperature=0.0, max_tokens=output, ignore_eos=True)
    llm.generate(prompts, params)  # warm-up
    t = time.perf_counter()
    llm.generate(prompts, params)
    return time.perf_counter() - t


PACED_S = 0.05  # the server's default stream_batching_interval_ms
PACED_INTERVALS = 20  # a paced run lasts at least this many intervals
MAX_POSITIONS = 8192  # the tiny model's context, raised from the tests' 256 for those runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--running", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a tiny model gains nothing from a second thread, and its spin-waits add noise
    from engine.params import RequestOutputKind
    print_machine("Host cost of a decode step (tiny random Llama: the model's own work is ~0)", getattr(torch, DTYPE), {
        "requests": "128-token prompts, greedy, ignore_eos, prefix caching on, block_size 16; median of "
                    f"{args.steps} decode steps; CUDA graphs off (the forward is timed in Python)"})
    rows, server_rows, generate_rows = [], [], []
    with quiet_transformers(), tempfile.TemporaryDirectory() as d:
        model_dir = build_decoder("llama", d, 0)
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(model_dir, "config.json"), "w") as f:  # room for the paced runs' longer outputs
            json.dump(dict(config, max_position_embeddings=MAX_POSITIONS), f)
        secs = measure_generate(model_dir, 256, 128)
        generate_rows.append([256, 128, f"{secs * 1e3:,.0f}", f"{256 * 128 / secs:,.0f}"])
        for n in args.running:
            for kind in (RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA):
                step_ms, fwd_ms = measure(model_dir, n, kind, args.steps)
                rows.append([n, kind.name, step_ms, fwd_ms, step_ms - fwd_ms, (step_ms - fwd_ms) / n * 1e3])
            host_ms = step_ms - fwd_ms  # DELTA's
            for process in (False, True):
                # Paced readers receive a burst per interval, so a rate needs a run of many intervals; both
                # reader modes then run that many steps (longer contexts cost the host more).
                probe = measure_async_llm(model_dir, n, RequestOutputKind.DELTA, args.steps, 0.0, process)
                steps = max(args.steps, math.ceil(PACED_INTERVALS * PACED_S * 1e3 / probe))
                for interval_s in (0.0, PACED_S):
                    ms = measure_async_llm(model_dir, n, RequestOutputKind.DELTA, steps, interval_s, process)
                    server_rows.append([n, f"every {interval_s * 1e3:g} ms" if interval_s else "every step",
                                        "own process" if process else "thread", steps, ms, host_ms, ms / host_ms])
    print(table(["running", "output kind", "step ms", "model forward ms (baseline)", "host ms",
                 "host us per sequence"], rows))
    print("\nLLM.generate, 128-token prompts, FINAL_ONLY, the model forward stubbed: the host-bound ceiling of "
          "an end-to-end run (bench/gpu.py's end-to-end row runs 256 x 128 -> 128):\n")
    print(table(["running", "output tokens", "host ms", "host-bound out tok/s"], generate_rows))
    print("\nDELTA streams through AsyncLLM, the model forward stubbed (ms per step from the rate tokens reach "
          "the readers):\n")
    print(table(["running", "readers read", "engine runs in", "steps", "AsyncLLM ms per step",
                 "LLMEngine.step host ms, DELTA (baseline)", "AsyncLLM / baseline"], server_rows))

if __name__ == "__main__":
    main()
