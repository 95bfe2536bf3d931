"""Prefill attention on the CPU in bf16: a step's spans in one call of the AMX C kernel (engine/cpu_span_attention.py)
against the portable backend's SDPA call per span (PyTorch's CPU flash kernel), on the packed q, k, v views the
models pass, at the shapes of the models it serves. Needs a CPU with AMX-BF16 (and a C compiler) for the kernel.

    python bench/cpu_attention.py [--spans 32] [--repeats 20]"""
import argparse
import random
import time

import torch

import common  # noqa: F401 (puts the repository on sys.path)
from engine import cpu_span_attention
from engine.attention_backends import PerSequencePrefill
from engine.context import Context, PrefillSpan

SHAPES = [  # name, query heads, kv heads, head size, causal
    ("all-MiniLM-L6-v2 / bge-small (encoder)", 12, 12, 32, False),
    ("BERT-base / bge-base (encoder)", 12, 12, 64, False),
    ("SmolLM2-135M (decoder prefill)", 9, 3, 64, True),
    ("Qwen3-0.6B / Qwen3-Reranker (decoder prefill)", 16, 8, 128, True),
]


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spans", type=int, default=32, help="spans a step (default 32, lengths 120-256 tokens)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    if cpu_span_attention.library() is None:
        raise SystemExit("the AMX span kernel did not build here (no AMX-BF16, or no C compiler)")
    random.seed(0)
    lengths = [random.randint(120, 256) for _ in range(args.spans)]
    tokens = sum(lengths)
    starts = torch.tensor([0] + lengths).cumsum(0)
    spans = [PrefillSpan(a, b, b - a) for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())]
    print(f"{args.spans} spans of 120-256 tokens ({tokens:,} tokens), bf16, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}\n")
    print("| shape | heads / kv heads x size | causal | SDPA per span (baseline) | C span kernel | kernel / baseline "
          "| kernel GFLOP/s | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name, heads, kv_heads, dim, causal in SHAPES:
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).bfloat16()
        q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], 1)
        q, k, v = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
        ctx = Context(causal=causal, prefills=spans, num_prefill_tokens=tokens)
        ctx.prefill_meta = PerSequencePrefill().prepare(ctx)
        sdpa = PerSequencePrefill()
        baseline = median_seconds(lambda: sdpa(q, k, v, None, dim ** -0.5, ctx), args.repeats)
        threads = torch.get_num_threads()

        def span_kernel() -> torch.Tensor:
            return cpu_span_attention.launch(q, k, v, starts, starts, dim ** -0.5, causal, threads)
        kernel = median_seconds(span_kernel, args.repeats)
        diff = (sdpa(q, k, v, None, dim ** -0.5, ctx).float() - span_kernel().float()).abs().max()
        flops = sum(4 * n * (n + 1) / 2 if causal else 4 * n * n for n in lengths) * heads * dim
        print(f"| {name} | {heads} / {kv_heads} x {dim} | {'yes' if causal else 'no'} | {baseline * 1e3:.2f} ms | "
              f"{kernel * 1e3:.2f} ms | {baseline / kernel:.2f}x | {flops / kernel / 1e9:.0f} | {diff:.4f} |")


if __name__ == "__main__":
    main()
