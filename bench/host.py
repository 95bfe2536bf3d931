"""The engine's host cost per decode step: a whole `LLMEngine.step()` against the model forward inside it.

The tests' random 2-layer Llama with hidden size 64 makes the model's own work nearly nothing, so what is left
of a step is the host path: scheduling, KV-block bookkeeping, packing the step's inputs, sampling,
detokenizing and building outputs. On a GPU that path bounds a decode step from below however fast
the kernels are (issue 8's target is 4 ms at 256 running), so it is measured here, on any device.

Output kinds: FINAL_ONLY without stop strings is how the server runs a whole (non-streaming)
response (text decoded once at the end), DELTA how it runs a stream (text decoded every token).

A second table runs the same requests through AsyncLLM, as a server does: the engine thread steps and
hands each output to the caller's event loop, where one coroutine per request reads its stream. The
model forward is replaced by random hidden states there (varied tokens, so real text to detokenize),
so each step's wall time is host work only: the engine's, the hand-over between the threads and the
readers'. A last row per size reads the streams as the server does by default, paced to one read
per 50 ms (limits.stream_batching_interval_ms), the engine merging the steps between.

    python bench/host.py                 # 64 and 256 running, both output kinds, this machine's device
    python bench/host.py --running 1024"""
import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

import torch

from common import ROOT, print_machine, quiet_transformers, table

sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import build_decoder  # noqa: E402 (the tests' tiny models)


def measure(model_dir: str, running: int, kind, steps: int) -> tuple[float, float]:
    from engine import EngineConfig, LLMEngine, SamplingParams
    eng = LLMEngine(EngineConfig(model=model_dir, dtype="float32", max_num_seqs=running, block_size=16,
                                 max_num_batched_tokens=running * 130, num_blocks=running * 20, enforce_eager=True))
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True, output_kind=kind)
    for i in range(running):
        eng.add_generation(f"r{i}", [3 + (i * 7 + j) % (eng.vocab_size - 3) for j in range(128)], params)
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


def measure_async_llm(model_dir: str, running: int, kind, steps: int, interval_s: float = 0.0) -> float:
    """Median ms between consecutive engine steps while `running` streams are read through AsyncLLM, the model
    forward stubbed: the engine's host work, the hand-over and the readers' share of the GIL. interval_s paces
    the readers as a server's stream_batching_interval_ms does."""
    from engine import SamplingParams
    from engine.async_engine import AsyncLLM

    async def run() -> float:
        llm = AsyncLLM.from_args(model=model_dir, dtype="float32", max_num_seqs=running, block_size=16,
                                 max_num_batched_tokens=running * 130, num_blocks=running * 20, enforce_eager=True)
        hidden = llm.engine.runner.model.spec.hidden_size
        llm.engine.runner.model.forward = lambda ids, pos, types=None: torch.randn(ids.shape[0], hidden, device=ids.device)
        params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True, output_kind=kind)
        vocab = llm.engine.vocab_size
        stamps: list[float] = []
        step = llm.engine.step

        def stamped_step():
            outputs = step()
            stamps.append(time.perf_counter())
            return outputs
        llm.engine.step = stamped_step

        async def read(i: int) -> None:
            async for _ in llm.generate([3 + (i * 7 + j) % (vocab - 3) for j in range(128)], params,
                                        interval_s=interval_s):
                pass
        try:
            await asyncio.gather(*[read(i) for i in range(running)])  # warm-up
            stamps.clear()
            await asyncio.gather(*[read(i) for i in range(running)])
            # The median step: the prefill step and the requests' arrival and departure are outliers.
            return statistics.median(b - a for a, b in zip(stamps, stamps[1:])) * 1e3
        finally:
            llm.shutdown()
    return asyncio.run(run())


PACED_S = 0.05  # the server's default stream_batching_interval_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--running", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a tiny model gains nothing from a second thread, and its spin-waits add noise
    from engine.params import RequestOutputKind
    print_machine("Host cost of a decode step (tiny random Llama: the model's own work is ~0)", torch.float32, {
        "requests": "128-token prompts, greedy, ignore_eos, prefix caching on, block_size 16; median of "
                    f"{args.steps} decode steps; CUDA graphs off (the forward is timed in Python)"})
    rows, server_rows = [], []
    with quiet_transformers(), tempfile.TemporaryDirectory() as d:
        model_dir = build_decoder("llama", d, 0)
        for n in args.running:
            for kind in (RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA):
                step_ms, fwd_ms = measure(model_dir, n, kind, args.steps)
                rows.append([n, kind.name, step_ms, fwd_ms, step_ms - fwd_ms, (step_ms - fwd_ms) / n * 1e3])
                server_ms = measure_async_llm(model_dir, n, kind, args.steps)
                server_rows.append([n, kind.name, server_ms, step_ms - fwd_ms, server_ms - (step_ms - fwd_ms)])
            server_ms = measure_async_llm(model_dir, n, RequestOutputKind.DELTA, args.steps, PACED_S)
            server_rows.append([n, f"DELTA, read every {PACED_S * 1e3:g} ms", server_ms, step_ms - fwd_ms,
                                server_ms - (step_ms - fwd_ms)])
    print(table(["running", "output kind", "step ms", "model forward ms (baseline)", "host ms",
                 "host us per sequence"], rows))
    print("\nThrough AsyncLLM, the model forward stubbed (median ms between decode steps):\n")
    print(table(["running", "output kind", "AsyncLLM ms per step", "LLMEngine.step host ms (baseline)",
                 "hand-over and readers ms"], server_rows))


if __name__ == "__main__":
    main()
