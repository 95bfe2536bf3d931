"""Attention on the CPU in bf16, at the shapes of the models the engine serves.

Prefill: a step's spans in one call of the AMX C kernel (engine/cpu_span_attention.py) against the portable
backend's SDPA call per span (PyTorch's CPU flash kernel), on the packed q, k, v views the models pass. Needs a
CPU with AMX-BF16 (and a C compiler) for the kernel.

Decode: a step's decodes read in place from the paged pool by the C kernel (engine/cpu_paged_decode.py) against
the portable backend (GatherDecode: the blocks copied out, one masked SDPA), contexts in blocks scattered through
a pool of 512 MiB; warm (the same call again: K/V in the caches) and cold (512 MiB read before each call, as a
decode step's products stream the weights through the caches between a layer's calls; this evicts the code and
the Python objects too, so a 16-token context then takes ~0.15 ms here). The limit: K/V bytes at the DRAM's
read rate. --kv-cache-dtype fp8: the pool in float8 with a scale per slot and kv head (both sides read it, the
gather dequantizing what it copies, the kernel widening each block as it reads it), and the bf16 pool's kernel
beside them.

Cached context: a step of 16 spans of 100 new tokens, each after 2,600 tokens of its own cached context in a paged
pool (blocks of 16, scattered; bf16, or float8 with --kv-cache-dtype fp8), as a prefix-cache hit or a long
prompt's later chunk: the C kernel reading every key in place through its slot (CPUSpanPrefill) against the
per-span SDPA, which gathers (and dequantizes) each span's context first.

    python bench/cpu_attention.py [--spans 32] [--repeats 20] [--kv-cache-dtype fp8]"""
import argparse
import random
import time

import torch

import common  # noqa: F401 (puts the repository on sys.path)
from engine import cpu_paged_decode, cpu_span_attention
from engine.attention import Attention, quantize_kv
from engine.attention_backends import GatherDecode, PerSequencePrefill
from engine.context import Context, PrefillSpan
from engine.cpu_span_attention import CPUSpanPrefill

SHAPES = [  # name, query heads, kv heads, head size, causal
    ("all-MiniLM-L6-v2 / bge-small (encoder)", 12, 12, 32, False),
    ("BERT-base / bge-base (encoder)", 12, 12, 64, False),
    ("SmolLM2-135M (decoder prefill)", 9, 3, 64, True),
    ("Qwen3-0.6B / Qwen3-Reranker (decoder prefill)", 16, 8, 128, True),
]


DECODES = [(1, 512), (1, 4096), (32, 512)]  # sequences, context tokens each
CACHED = (16, 2600, 100)  # spans, cached tokens each, new tokens each
POOL_BYTES, BLOCK = 512 << 20, 16


def median_seconds(fn, repeats: int, before=lambda: None) -> float:
    fn()
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def dram_read_rate(flush: torch.Tensor) -> float:
    """Bytes/s of one pass summing a buffer far larger than the caches."""
    return flush.numel() * flush.element_size() / median_seconds(lambda: flush.sum(), 5)


def decode(repeats: int, fp8: bool) -> None:
    """The decode table (module docstring)."""
    if cpu_paged_decode.library() is None:
        raise SystemExit("the paged decode kernel did not build here (no C compiler)")
    flush = torch.ones(256 << 20, dtype=torch.bfloat16)  # 512 MiB
    rate = dram_read_rate(flush)
    pool = "float8 e4m3 + float32 scales" if fp8 else "bf16"
    print(f"\nDecode from a paged pool (blocks of {BLOCK}, scattered in {POOL_BYTES >> 20} MiB), bf16 queries, {pool} "
          f"pool, warm / cold caches; DRAM read rate here {rate / 1e9:.1f} GB/s (a sum over 512 MiB)\n")
    print("| shape | sequences x context | GatherDecode (baseline) warm / cold | C paged kernel warm / cold "
          "| kernel / baseline warm / cold | limit (K/V bytes / DRAM rate) | max abs diff |"
          + (" C kernel on a bf16 pool warm / cold |" if fp8 else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if fp8 else ""))
    for name, heads, kv_heads, dim, causal in SHAPES:
        if not causal:
            continue
        attn = Attention(heads, kv_heads, dim, dim ** -0.5)
        slot_bytes = 2 * kv_heads * (dim + 4 if fp8 else dim * 2)
        slots = POOL_BYTES // slot_bytes // BLOCK * BLOCK
        attn.k_cache, attn.v_cache = (torch.randn(slots, kv_heads, dim).bfloat16() for _ in range(2))
        attn.block_size = BLOCK
        bf16_pool = attn.k_cache, attn.v_cache
        if fp8:
            (attn.k_cache, attn.k_scale), (attn.v_cache, attn.v_scale) = map(quantize_kv, bf16_pool)
        for batch, length in DECODES:
            width = -(-length // BLOCK)
            table = torch.randperm(slots // BLOCK)[:batch * width].view(batch, width)
            ctx = Context(decode_block_table=table, decode_context_lens=torch.full((batch,), length, dtype=torch.int32))
            gather = GatherDecode(torch.bfloat16)
            ctx.decode_meta = gather.prepare(ctx, BLOCK)
            q = torch.randn(batch, heads, dim).bfloat16()
            kernel = cpu_paged_decode.CPUPagedDecode()
            base, fast = ([median_seconds(lambda: fn(attn, q, ctx), repeats, before)
                           for before in (lambda: None, flush.sum)] for fn in (gather, kernel))
            diff = (gather(attn, q, ctx).float() - kernel(attn, q, ctx).float()).abs().max()
            kv_bytes = batch * length * slot_bytes
            row = (f"| {name.split(' (')[0]} | {batch} x {length} | {base[0] * 1e6:.0f} / {base[1] * 1e6:.0f} us | "
                   f"{fast[0] * 1e6:.0f} / {fast[1] * 1e6:.0f} us | {base[0] / fast[0]:.2f}x / "
                   f"{base[1] / fast[1]:.2f}x | {kv_bytes / rate * 1e6:.0f} us | {diff:.4f} |")
            if fp8:
                bf16 = Attention(heads, kv_heads, dim, dim ** -0.5)
                (bf16.k_cache, bf16.v_cache), bf16.block_size = bf16_pool, BLOCK
                plain = [median_seconds(lambda: kernel(bf16, q, ctx), repeats, before) for before in
                         (lambda: None, flush.sum)]
                row += f" {plain[0] * 1e6:.0f} / {plain[1] * 1e6:.0f} us |"
            print(row)


def cached_context(repeats: int, fp8: bool) -> None:
    """The cached-context table (module docstring)."""
    spans, cached, new = CACHED
    width = -(-(cached + new) // BLOCK)
    print(f"\n{spans} spans of {new} new tokens, each after {cached:,} cached tokens of its own in a paged pool "
          f"({'float8 + scales' if fp8 else 'bf16'}, blocks of {BLOCK} scattered), bf16 queries, causal, median of "
          f"{repeats}\n")
    print("| shape | SDPA per span, context gathered (baseline) | C span kernel, keys read in place | kernel / baseline "
          "| max abs diff |")
    print("|---|---|---|---|---|")
    for name, heads, kv_heads, dim, causal in SHAPES:
        if not causal:
            continue
        table = torch.randperm(spans * width + 8)[:spans * width].view(spans, width)
        slots = (table[:, :, None] * BLOCK + torch.arange(BLOCK)).flatten(1)[:, :cached + new]
        pool = [torch.randn((spans * width + 8) * BLOCK, kv_heads, dim).bfloat16() for _ in range(2)]
        own = slots[:, cached:].flatten()  # the step's own keys, written to the pool before attention
        k, v = pool[0][own], pool[1][own]
        scales = [None, None]
        if fp8:
            (pool[0], scales[0]), (pool[1], scales[1]) = quantize_kv(pool[0]), quantize_kv(pool[1])
        q = torch.randn(spans * new, heads, dim).bfloat16()
        ctx = Context(causal=True, num_prefill_tokens=spans * new, slot_mapping=own,
                      prefills=[PrefillSpan(i * new, (i + 1) * new, cached + new, slots[i]) for i in range(spans)])
        times, outs = [], []
        for backend in (PerSequencePrefill(), CPUSpanPrefill()):
            ctx.prefill_meta = backend.prepare(ctx)
            times.append(median_seconds(lambda: backend(q, k, v, (*pool, *scales), dim ** -0.5, ctx), repeats))
            outs.append(backend(q, k, v, (*pool, *scales), dim ** -0.5, ctx).float())
        print(f"| {name.split(' (')[0]} ({heads} / {kv_heads} x {dim}) | {times[0] * 1e3:.2f} ms | "
              f"{times[1] * 1e3:.2f} ms | {times[0] / times[1]:.2f}x | {(outs[0] - outs[1]).abs().max():.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spans", type=int, default=32, help="spans a step (default 32, lengths 120-256 tokens)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                    help="the pool of the cached-context and decode tables")
    args = ap.parse_args()
    if cpu_span_attention.library() is None:
        print("the AMX span kernel did not build here (no AMX-BF16, or no C compiler): no prefill table")
        return decode(args.repeats, args.kv_cache_dtype == "fp8")
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
    cached_context(args.repeats, args.kv_cache_dtype == "fp8")
    decode(args.repeats, args.kv_cache_dtype == "fp8")


if __name__ == "__main__":
    main()
