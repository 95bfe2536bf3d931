"""Every attention, pooling and decode-graph path against a reference on CPU: the one-call
variable-length prefill (FlexAttention, as CUDA runs it, here eager) and the per-sequence SDPA
against plain per-sequence attention; paged decode (block gather, the CPU's compiled C kernel, and the
Triton kernel where Triton is installed, in its interpreter) against dense attention over each context; segment
pooling against a loop; and whole engines on those paths against Hugging Face."""
import os

import pytest
import torch
import torch.nn.functional as F

from engine import LLM
from engine.attention import Attention, dequantized_kv, quantize_kv
from engine import cpu_paged_decode, cpu_span_attention
from engine.attention_backends import AttentionBackend, GatherDecode, PerSequencePrefill
from engine.cpu_paged_decode import CPUPagedDecode
from engine.cpu_span_attention import CPUSpanPrefill
from engine.context import Context, PrefillSpan
from engine.cuda_graphs import capture_sizes
from engine.flex_prefill import FlexPrefill
from engine.varlen_prefill import (GQA_MODES, VarlenPrefill, checked_attend, efficient_attend, flash_attend,
                                   flash_candidates, reference_attend, varlen_kernel)
from engine.pooling import pool_segments

from conftest import assert_pool_free, require_amx_kernel, require_c_kernels, sentence
from test_decoders import PROMPTS, SHARED, greedy, ref, run_staggered  # noqa: F401  (ref is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCK = 4


def layer(heads: int, kv_heads: int, dim: int, num_blocks: int = 64) -> Attention:
    attn = Attention(heads, kv_heads, dim, dim ** -0.5)
    attn.k_cache = torch.randn(num_blocks * BLOCK, kv_heads, dim)
    attn.v_cache = torch.randn(num_blocks * BLOCK, kv_heads, dim)
    attn.block_size = BLOCK
    return attn


def pool_of(attn: Attention) -> tuple:
    """The layer's pool as the prefill kernels take it (engine.attention.Pool)."""
    return attn.k_cache, attn.v_cache, attn.k_scale, attn.v_scale


def reference(attn: Attention, q, k, v, causal: bool) -> torch.Tensor:
    """q [n, heads, dim] against k/v [context, kv_heads, dim], queries at the context's end."""
    n, c = q.shape[0], k.shape[0]
    mask = torch.arange(c)[None] <= torch.arange(n)[:, None] + (c - n) if causal else None
    rep = attn.num_heads // attn.num_kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                          attn_mask=mask, scale=attn.scale).transpose(0, 1)


def step(attn: Attention, chunks: list[tuple[int, int]], causal: bool, seed: int):
    """Prefill spans of (cached context, chunk length): the chunk's K/V are written to fresh slots,
    the context's are already in the pool. Returns q, k, v, the context and per-span references."""
    g = torch.Generator().manual_seed(seed)
    t = sum(n for _, n in chunks)
    q = torch.randn(t, attn.num_heads, attn.head_dim, generator=g)
    k = torch.randn(t, attn.num_kv_heads, attn.head_dim, generator=g)
    v = torch.randn(t, attn.num_kv_heads, attn.head_dim, generator=g)
    perm = torch.randperm(attn.k_cache.shape[0], generator=g)  # scattered slots, as blocks are
    ctx, start, used, refs = Context(causal=causal), 0, 0, []
    slot_mapping = []
    for c, n in chunks:
        slots = perm[used:used + c + n]
        used += c + n
        slot_mapping.append(slots[c:])
        attn.k_cache[slots[c:]], attn.v_cache[slots[c:]] = k[start:start + n], v[start:start + n]
        span = PrefillSpan(start, start + n, c + n, slots if c else None)
        ctx.prefills.append(span)
        refs.append(reference(attn, q[start:start + n], attn.k_cache[slots], attn.v_cache[slots], causal))
        start += n
    ctx.num_prefill_tokens = t
    ctx.slot_mapping = torch.cat(slot_mapping)
    return q, k, v, ctx, torch.cat(refs)


CASES = {"encoder": (12, 12, 8, [(0, 5), (0, 131), (0, 1), (0, 40)], False),
         "decoder, fresh, GQA": (8, 2, 16, [(0, 7), (0, 150), (0, 3)], True),
         "decoder, cached and chunked context": (4, 2, 8, [(9, 3), (0, 20), (130, 140), (1, 1), (5, 0 + 12)], True)}


CPU = torch.device("cpu")
PREFILLS = {"per_sequence": lambda device: PerSequencePrefill(),
            "flex": lambda device: FlexPrefill(device, compile=False),
            # The varlen backend's packing (offsets, cached-context keys, GQA) around the kernel's reference.
            "varlen": lambda device: VarlenPrefill(device, reference_attend)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kernel", PREFILLS)
def test_varlen_prefill_matches_per_sequence_attention(case, kernel):
    heads, kv_heads, dim, chunks, causal = CASES[case]
    attn = layer(heads, kv_heads, dim, num_blocks=256)
    q, k, v, ctx, want = step(attn, chunks, causal, seed=len(case))
    prefill = PREFILLS[kernel](CPU)
    ctx.prefill_meta = prefill.prepare(ctx)
    got = prefill(q, k, v, pool_of(attn), attn.scale, ctx)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_a_varlen_kernel_is_chosen_only_where_it_checks_out():
    assert varlen_kernel(CPU, torch.bfloat16, 64) is None
    assert varlen_kernel(CPU, torch.float32, 64) is None
    if torch.cuda.is_available():  # flash attention: fp16 / bf16 only
        fp32 = varlen_kernel(torch.device("cuda"), torch.float32, 64)
        assert fp32 is None or fp32.name.startswith("memory-efficient")


def fake_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size):
    """torch's varlen_attn as releases without enable_gqa define it, refusing fewer kv heads (as a cuDNN
    backend might), computed by the reference."""
    assert k.shape[1] == q.shape[1] and window_size in ((-1, 0), (-1, -1))
    return reference_attend(q, k, v, cu_q, cu_k, max_q, max_k, window_size == (-1, 0), scale)


def fake_varlen_attn_native_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size):
    """A release without enable_gqa whose kernel takes fewer kv heads as they are (flash attention's does)."""
    return reference_attend(q, k, v, cu_q, cu_k, max_q, max_k, window_size == (-1, 0), scale)


def fake_varlen_attn_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size, enable_gqa=False):
    assert enable_gqa == (k.shape[1] != q.shape[1])
    return reference_attend(q, k, v, cu_q, cu_k, max_q, max_k, window_size == (-1, 0), scale)


FAKE_VARLEN = {"copies": fake_varlen_attn, "native": fake_varlen_attn_native_gqa, "keyword": fake_varlen_attn_gqa}


@pytest.mark.parametrize("gqa", GQA_MODES)
@pytest.mark.parametrize("case", CASES)
def test_flash_varlen_call_passes_gqa_its_way(case, gqa):
    heads, kv_heads, dim, chunks, causal = CASES[case]
    attn = layer(heads, kv_heads, dim, num_blocks=256)
    q, k, v, ctx, want = step(attn, chunks, causal, seed=len(case))
    prefill = VarlenPrefill(CPU, flash_attend(FAKE_VARLEN[gqa], gqa))
    ctx.prefill_meta = prefill.prepare(ctx)
    torch.testing.assert_close(prefill(q, k, v, pool_of(attn), attn.scale, ctx), want, atol=2e-5, rtol=1e-4)


def test_flash_varlen_takes_the_first_gqa_way_that_checks_out():
    """The keyword where the release has it; else the kv heads as they are where the kernel takes them,
    without two copies a layer; else the copies; a kernel that answers wrongly is not used at all."""
    for gqa, fake in FAKE_VARLEN.items():
        assert checked_attend(flash_candidates(fake), CPU, torch.float32, 16).gqa == gqa

    def wrong(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size):
        return fake_varlen_attn_native_gqa(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size) + 1
    assert checked_attend(flash_candidates(wrong), CPU, torch.float32, 16) is None


def fake_efficient_attention_forward(q, k, v, bias, cu_q, cu_k, max_q, max_k, dropout_p, custom_mask_type,
                                     compute_log_sumexp, *, scale, round_to=None):
    """aten::_efficient_attention_forward as CUDA defines it, computed by the reference: one packed batch, as
    many kv heads as query heads, masks 0 (none) and 2 (causal from the bottom right). round_to: the
    precision its products would round the inputs to (a TF32 kernel: bfloat16's 8 bits, near enough)."""
    assert q.shape[0] == k.shape[0] == 1 and k.shape[2] == q.shape[2] and bias is None and dropout_p == 0.0
    assert custom_mask_type in (0, 2) and not compute_log_sumexp
    if round_to is not None:
        q, k, v = (t.to(round_to).float() for t in (q, k, v))
    out = reference_attend(q[0], k[0], v[0], cu_q, cu_k, max_q, max_k, custom_mask_type == 2, scale)
    return out[None], None, None, None, max_q, max_k


@pytest.mark.parametrize("case", CASES)
def test_memory_efficient_varlen_call_matches_per_sequence_attention(case):
    """Its packing: one batch of packed tokens, the causal mask aligned to each context's end, GQA as copies."""
    heads, kv_heads, dim, chunks, causal = CASES[case]
    attn = layer(heads, kv_heads, dim, num_blocks=256)
    q, k, v, ctx, want = step(attn, chunks, causal, seed=len(case))
    prefill = VarlenPrefill(CPU, efficient_attend(fake_efficient_attention_forward))
    ctx.prefill_meta = prefill.prepare(ctx)
    got = prefill(q, k, v, pool_of(attn), attn.scale, ctx)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_memory_efficient_varlen_is_the_float32_kernel_only_at_float32_accuracy():
    """After flash attention where that refuses; a kernel whose products round to fewer bits (TF32) is not
    float32 attention, but passes for bfloat16."""
    efficient = efficient_attend(fake_efficient_attention_forward)
    assert checked_attend(flash_candidates(fake_varlen_attn) + [efficient], CPU, torch.float32, 16).gqa == "copies"
    refused = flash_candidates(lambda *a, **kw: 1 / 0)
    assert checked_attend(refused + [efficient], CPU, torch.float32, 16) is efficient

    def tf32(*args, **kwargs):
        return fake_efficient_attention_forward(*args, **kwargs, round_to=torch.bfloat16)
    assert checked_attend([efficient_attend(tf32)], CPU, torch.float32, 16) is None
    assert checked_attend([efficient_attend(tf32)], CPU, torch.bfloat16, 16) is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen kernels need CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_cuda_varlen_prefill_matches_per_sequence_attention(case, dtype):
    """Flash attention in bf16, the memory-efficient kernel in float32."""
    heads, kv_heads, dim, chunks, causal = CASES[case]
    attend = varlen_kernel(torch.device("cuda"), dtype, dim)
    if attend is None:
        pytest.skip(f"this torch has no varlen attention call that matches SDPA in {dtype}")
    attn = layer(heads, kv_heads, dim, num_blocks=256)
    q, k, v, ctx, want = step(attn, chunks, causal, seed=len(case))
    attn.k_cache, attn.v_cache = attn.k_cache.cuda().to(dtype), attn.v_cache.cuda().to(dtype)
    for span in ctx.prefills:
        span.context_slots = None if span.context_slots is None else span.context_slots.cuda()
    ctx.slot_mapping = ctx.slot_mapping.cuda()
    prefill = VarlenPrefill(torch.device("cuda"), attend)
    ctx.prefill_meta = prefill.prepare(ctx)
    got = prefill(*(t.cuda().to(dtype) for t in (q, k, v)), pool_of(attn), attn.scale, ctx)
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.float().cpu(), want, **tol)


def test_flex_block_mask_skips_other_sequences_tiles():
    """Two long sequences: the first's query tiles never list the second's key tiles."""
    attn = layer(2, 2, 8, num_blocks=256)
    _, _, _, ctx, _ = step(attn, [(0, 384), (0, 384)], True, seed=1)
    meta = FlexPrefill(torch.device("cpu"), compile=False).prepare(ctx)
    counts = meta.block_mask.kv_num_blocks[0, 0].tolist()
    assert counts == [1, 2, 3, 1, 2, 3]  # causal: tile i of a sequence needs its tiles 0..i


def paged_decode_case(heads, kv_heads, dim, lengths, seed, pool_dtype=None):
    """Decodes of the given context lengths over blocks scattered in the pool; with pool_dtype (float8) the
    pool holds that dtype and the references read its values."""
    g = torch.Generator().manual_seed(seed)
    attn = layer(heads, kv_heads, dim, num_blocks=128)
    if pool_dtype is not None:  # a float8 pool: its values and scales, and the floats they stand for
        (kq, attn.k_scale), (vq, attn.v_scale) = quantize_kv(attn.k_cache), quantize_kv(attn.v_cache)
        attn.k_cache, attn.v_cache = dequantized_kv(kq, attn.k_scale, torch.float32), \
            dequantized_kv(vq, attn.v_scale, torch.float32)
    blocks = torch.randperm(128, generator=g)
    width, used, table, refs = max(-(-n // BLOCK) for n in lengths), 0, [], []
    q = torch.randn(len(lengths), heads, dim, generator=g)
    for i, n in enumerate(lengths):
        own = blocks[used:used + -(-n // BLOCK)]
        used += len(own)
        table.append(own.tolist() + [0] * (width - len(own)))
        slots = (own[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:n]
        refs.append(reference(attn, q[i:i + 1], attn.k_cache[slots], attn.v_cache[slots], False))
    ctx = Context(decode_block_table=torch.tensor(table), decode_context_lens=torch.tensor(lengths, dtype=torch.int32))
    if pool_dtype is not None:
        attn.k_cache, attn.v_cache = kq, vq
    return attn, q, ctx, torch.cat(refs)


@pytest.mark.parametrize("pool_dtype", [None, torch.float8_e4m3fn])  # kv_cache_dtype auto, fp8
@pytest.mark.parametrize("shape", [(4, 4, 8), (8, 2, 16), (6, 2, 12)])
def test_gather_decode_matches_dense_attention(shape, pool_dtype):
    attn, q, ctx, want = paged_decode_case(*shape, lengths=[1, 4, 5, 37, 16, 70], seed=sum(shape),
                                           pool_dtype=pool_dtype)
    decode = GatherDecode()
    ctx.decode_meta = decode.prepare(ctx, BLOCK)
    torch.testing.assert_close(decode(attn, q, ctx), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pool_dtype", [None, torch.float8_e4m3fn])  # kv_cache_dtype auto, fp8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("shape", [(4, 4, 8), (8, 2, 16), (6, 2, 12), (16, 8, 64)])
def test_triton_paged_decode_matches_dense_attention(shape, dtype, split, pool_dtype):
    """On CUDA with Triton; on CPU in Triton's interpreter (conftest sets TRITON_INTERPRET=1 there)."""
    pytest.importorskip("triton")
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU: run with TRITON_INTERPRET=1 to check the kernel in Triton's interpreter")
    if not cuda and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter multiplies bfloat16 matrices wrongly (numpy has no bfloat16)")
    from engine.triton_decode import TritonPagedDecode
    attn, q, ctx, want = paged_decode_case(*shape, lengths=[1, 4, 5, 37, 16, 70, 300], seed=sum(shape),
                                           pool_dtype=pool_dtype)
    dev = "cuda" if cuda else "cpu"
    attn.k_cache, attn.v_cache = (c.to(dev, pool_dtype or dtype) for c in (attn.k_cache, attn.v_cache))
    if pool_dtype is not None:
        attn.k_scale, attn.v_scale = attn.k_scale.to(dev), attn.v_scale.to(dev)
    q = q.to(dev, dtype)
    ctx.decode_block_table, ctx.decode_context_lens = ctx.decode_block_table.to(dev), ctx.decode_context_lens.to(dev)
    # split: contexts cut into partitions of one tile (300 slots: 5), merged by the second kernel; partitions
    # past a shorter context are empty
    decode = TritonPagedDecode(min_programs=10 ** 6, partition=64) if split else TritonPagedDecode()
    got = decode(attn, q, ctx)
    # bfloat16: inputs, probabilities and output rounded to 8 bits against a float32 reference.
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float().cpu(), want, **tol)


def test_an_engine_decoding_with_split_contexts_matches_hf(tiny_model, ref):  # noqa: F811
    """Every decode step's contexts cut into partitions of 16 slots (as few sequences over long contexts are on a
    GPU; any partition size computes the same), merged: greedy tokens as Hugging Face's."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU: run with TRITON_INTERPRET=1 to check the kernel in Triton's interpreter")
    from engine.triton_decode import TritonPagedDecode
    arch = "llama3-gqa"
    cpu = dict(dtype="float32", block_size=8, max_model_len=64, device="cpu")  # CPU engines on a GPU machine too
    llm = LLM(tiny_model(arch), enforce_eager=True, **cpu)
    runner = llm.engine.runner
    runner.attention_backend = AttentionBackend(PerSequencePrefill(), TritonPagedDecode(10 ** 6, partition=16))
    for attn in runner.model.attention_layers:
        attn.backend = runner.attention_backend
    for out in llm.generate(PROMPTS[:3], greedy()):
        ref(arch).check(out)
    # As CUDA graphs replay it: static buffers whose block table is as wide as max_model_len (most partitions
    # past every context), padding rows attending to one slot of the scratch block.
    runner.capture_decode_graphs(4, capture=False)
    graphs, ran = runner.decode_graphs, []
    run = graphs.run
    graphs.run = lambda *a: ran.append(a[0].shape[0]) or run(*a)
    for out in llm.generate(PROMPTS[:3], greedy()):
        ref(arch).check(out)
    assert ran and set(ran) == {3}  # three decodes padded to four


def test_contexts_are_split_only_where_the_batch_leaves_the_device_idle():
    from engine.triton_decode import num_partitions
    assert num_partitions(programs=2048, max_context=4096, min_programs=264) == 1  # 256 sequences x 8 kv heads
    assert num_partitions(programs=8, max_context=32768, min_programs=264) == 33  # one long chat: fill the SMs
    assert num_partitions(programs=8, max_context=1024, min_programs=264) == 2  # no more than the table holds
    assert num_partitions(programs=8, max_context=100, min_programs=264) == 1


@pytest.mark.parametrize("method", ["cls", "mean", "last"])
def test_segment_pooling_matches_a_loop(method):
    hidden = torch.randn(50, 6)
    spans = [(0, 7), (7, 8), (12, 30), (30, 50)]  # rows 8..11: a chunk with more to come, not pooled
    got = pool_segments(hidden, torch.tensor([s for s, _ in spans]), torch.tensor([e for _, e in spans]), method)
    pick = {"cls": lambda h: h[0], "mean": lambda h: h.mean(0), "last": lambda h: h[-1]}[method]
    torch.testing.assert_close(got, torch.stack([pick(hidden[s:e]) for s, e in spans]))


def test_capture_sizes_follow_vllm():
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]


def use_prefill(llm: LLM, kernel: str) -> None:
    backend = AttentionBackend(PREFILLS[kernel](llm.engine.runner.device), GatherDecode())
    llm.engine.runner.attention_backend = backend
    for attn in llm.engine.runner.model.attention_layers:
        attn.backend = backend


@pytest.mark.parametrize("kernel", ["flex", "varlen"])
@pytest.mark.parametrize("arch", ["llama3-gqa", "qwen3"])
def test_one_call_prefill_engine_matches_hf_with_chunks_and_cache_hits(arch, kernel, tiny_model, ref):  # noqa: F811
    llm = LLM(tiny_model(arch), dtype="float32", block_size=8, max_num_batched_tokens=24,
              long_prefill_token_threshold=13)
    use_prefill(llm, kernel)
    for out in llm.generate(PROMPTS + SHARED, greedy()):
        ref(arch).check(out)
    for out in llm.generate(SHARED, greedy()):  # prefix-cache hits: chunks after cached context
        ref(arch).check(out)
        assert out.num_cached_tokens > 0


@pytest.mark.parametrize("kernel", ["flex", "varlen"])
def test_one_call_prefill_encoder_matches_per_sequence(kernel, tiny_model):
    texts = PROMPTS + [PROMPTS[3] + " " + PROMPTS[2]]
    llm = LLM(tiny_model("bert"), dtype="float32")
    want = [o.outputs.embedding for o in llm.embed(texts)]
    use_prefill(llm, kernel)
    got = [o.outputs.embedding for o in llm.embed(texts)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_padded_decode_graph_buffers_match_hf(async_scheduling, tiny_model, ref):  # noqa: F811
    """The static buffers CUDA graphs replay, run eagerly: decodes padded up to a captured size, padding
    rows parked in the scratch block, staggered arrivals so the batch size changes every few steps; with
    async scheduling, inputs that are the previous step's draws, still on the device."""
    arch = "llama3-gqa"
    llm = LLM(tiny_model(arch), dtype="float32", block_size=8, max_num_seqs=6, enforce_eager=True,
              async_scheduling=async_scheduling)
    llm.engine.runner.capture_decode_graphs(6, capture=False)
    graphs, ran = llm.engine.runner.decode_graphs, []
    run = graphs.run
    graphs.run = lambda *a: ran.append(a[0].shape[0]) or run(*a)
    outs = run_staggered(llm, PROMPTS + SHARED, [greedy(16 - 2 * i) for i in range(7)], every=3)
    for i, out in enumerate(outs):
        ref(arch).check(out, 16 - 2 * i)
    assert {1, 3, 5} <= set(ran)  # batch sizes between the captured ones (1, 2, 4, 6) were padded


@pytest.mark.parametrize("split", [False, True])
def test_compiled_model_in_the_decode_graph_buffers_with_the_paged_kernel_matches_hf(split, tiny_model,
                                                                                     ref):  # noqa: F811
    """torch_compile where CUDA graphs are captured: the graphs replay the compiled model, the paged Triton
    kernel an opaque op inside it (here the padded buffers run eagerly, the kernel in Triton's interpreter);
    split: contexts cut into partitions, decided inside the op from its concrete shapes (nothing traced
    specialises on the batch size)."""
    pytest.importorskip("triton")
    from engine.triton_decode import TritonPagedDecode
    arch = "llama3-gqa"
    llm = LLM(tiny_model(arch), dtype="float32", block_size=8, max_num_seqs=4, max_model_len=64, enforce_eager=True,
              torch_compile=True)
    runner = llm.engine.runner
    decode = TritonPagedDecode(10 ** 6, partition=16) if split else TritonPagedDecode()
    runner.attention_backend = AttentionBackend(PerSequencePrefill(), decode)
    for attn in runner.model.attention_layers:
        attn.backend = runner.attention_backend
    runner.capture_decode_graphs(4, capture=False)
    compiled, steps = runner.compiled, []
    runner.compiled = lambda *args: steps.append(args[0].shape[0]) or compiled(*args)
    for out in llm.generate(PROMPTS[:3], greedy()):
        ref(arch).check(out)
    prefill, decodes = steps[0], steps[1:]  # the three prompts' prefill: compiled too, not padded
    assert prefill > 4 and decodes and set(decodes) <= {1, 2, 4}  # every decode step: the compiled model on padded buffers


@pytest.mark.parametrize("pool_dtype", [None, torch.float8_e4m3fn])  # kv_cache_dtype auto, fp8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3, 40])
@pytest.mark.parametrize("shape", [(4, 4, 8), (6, 2, 12), (9, 3, 64), (16, 8, 128), (4, 1, 96), (16, 2, 64)])
def test_cpu_paged_decode_matches_dense_attention(shape, dtype, splits, pool_dtype):
    """The compiled C kernel with each context whole, in 3 stretches, and in more stretches than most contexts have
    blocks (empty ones merged in), head sizes on its unrolled (64, 128), AVX512-BF16 (multiples of 32, where the
    CPU has it) and generic paths (a float8 pool's widening: vectors of 16 and the loop after them), groups of 1
    to 8 query heads a kv head, against dense attention."""
    require_c_kernels(cpu_paged_decode.library())
    attn, q, ctx, want = paged_decode_case(*shape, lengths=[1, 4, 5, 37, 16, 70, 300], seed=sum(shape),
                                           pool_dtype=pool_dtype)
    attn.k_cache, attn.v_cache, q = attn.k_cache.to(pool_dtype or dtype), attn.v_cache.to(pool_dtype or dtype), \
        q.to(dtype)
    got = cpu_paged_decode.launch(q, attn.k_cache, attn.v_cache, ctx.decode_block_table, ctx.decode_context_lens,
                                  attn.scale, BLOCK, splits, 2, attn.k_scale, attn.v_scale)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), want, **tol)
    torch.testing.assert_close(CPUPagedDecode()(attn, q, ctx).float(), want, **tol)  # the engine's call


def test_cpu_engines_decode_in_place_where_the_kernel_builds(tiny_model, ref):  # noqa: F811
    """With a C compiler, CPU decoders decode through the kernel (greedy tokens as Hugging Face's), over a float8
    pool too; a reranker, which never decodes, keeps the block gather (without a compiler nothing is built:
    test_cpu_kernels.py)."""
    require_c_kernels(cpu_paged_decode.library())
    arch = "llama3-gqa"
    cpu = dict(dtype="float32", block_size=8, max_model_len=64, device="cpu")  # CPU engines on a GPU machine too
    llm = LLM(tiny_model(arch), enforce_eager=True, **cpu)
    assert isinstance(llm.engine.runner.attention_backend.decode, CPUPagedDecode)
    for out in llm.generate(PROMPTS[:3], greedy()):
        ref(arch).check(out)
    fp8 = LLM(tiny_model(arch), kv_cache_dtype="fp8", **cpu)
    assert isinstance(fp8.engine.runner.attention_backend.decode, CPUPagedDecode)
    scorer = LLM(tiny_model(arch), task="score", **cpu)
    assert isinstance(scorer.engine.runner.attention_backend.decode, GatherDecode)  # it never decodes


def span_case(heads: int, kv_heads: int, dim: int, lengths: list[int], seed: int):
    """q, k, v [tokens, heads, dim] bf16 as views of one projection's output (strided token rows, as the models
    split it), and the spans' starts."""
    g = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).bfloat16()
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], 1)
    return q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim), \
        torch.tensor([0] + lengths).cumsum(0)


@pytest.mark.parametrize("case", ["own keys", "causal", "causal after context"])
@pytest.mark.parametrize("shape", [(12, 12, 32), (9, 3, 64), (16, 8, 128), (4, 1, 32)])
def test_cpu_span_attention_matches_dense_attention(shape, case):
    """The AMX kernel over ragged spans (one token; a row block's 16 rows and one off either side; a key block's
    32 and one off either side; long ones), grouped query heads, strided views, and spans after cached context
    read from a pool (the chunk's own keys last): float64 dense attention within bf16's roundings, PyTorch's SDPA
    per span as close, and the backend's call equal to the kernel's."""
    require_amx_kernel(cpu_span_attention.library())
    heads, kv_heads, dim = shape
    lengths, context = [1, 15, 16, 17, 31, 33, 70, 200], [0, 3, 40, 0, 1, 64, 0, 9]
    q, k, v, starts = span_case(heads, kv_heads, dim, lengths, seed=sum(shape))
    causal = case != "own keys"
    spans = [PrefillSpan(a, b, b - a) for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())]
    keys, values, key_starts = k, v, starts
    if case == "causal after context":  # the pool holds each span's context then its own keys, in order
        g = torch.Generator().manual_seed(1)
        parts = [(torch.randn(c, kv_heads, dim, generator=g).bfloat16(), torch.randn(c, kv_heads, dim, generator=g)
                  .bfloat16()) for c in context]
        keys = torch.cat([t for (ck, _), s in zip(parts, spans) for t in (ck, k[s.start:s.end])])
        values = torch.cat([t for (_, cv), s in zip(parts, spans) for t in (cv, v[s.start:s.end])])
        key_starts = torch.tensor([0] + [s.end - s.start + c for s, c in zip(spans, context)]).cumsum(0)
        for s, a, b in zip(spans, key_starts[:-1].tolist(), key_starts[1:].tolist()):
            s.context_len, s.context_slots = b - a, torch.arange(a, b)
    got = cpu_span_attention.launch(q, keys, values, starts, key_starts, dim ** -0.5, causal, threads=2)
    ctx, pool = Context(causal=causal, prefills=spans), (keys, values, None, None)
    ctx.prefill_meta = PerSequencePrefill().prepare(ctx)
    sdpa = PerSequencePrefill()(q, k, v, pool, dim ** -0.5, ctx)
    for i in range(len(lengths)):
        (a, b), (ka, kb) = starts[i:i + 2].tolist(), key_starts[i:i + 2].tolist()
        want = cpu_span_attention.dense_attention(q[a:b], keys[ka:kb], values[ka:kb], causal)
        tolerance = 1e-2 + 2 ** -7 * want.abs()
        assert ((got[a:b].double() - want).abs() <= tolerance).all()
        assert ((sdpa[a:b].double() - want).abs() <= tolerance).all()
    ctx.prefill_meta = CPUSpanPrefill().prepare(ctx)  # where the spans' queries and keys begin: the kernel's call
    assert torch.equal(CPUSpanPrefill()(q, k, v, pool, dim ** -0.5, ctx), got)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("case", ["own keys", "causal", "causal after context"])
def test_cpu_span_attention_cuts_few_spans_rows_into_parts(case, threads):
    """Where (span, kv head) tasks are fewer than four a thread, each takes a part per thread of its rows, parts
    of equal work (causal: later rows see more keys), some empty for short spans: float64 dense attention within
    bf16's roundings, as whole."""
    require_amx_kernel(cpu_span_attention.library())
    heads, kv_heads, dim = 9, 3, 64
    lengths, context = [300, 17], [0 if case != "causal after context" else 40, 5 if case != "own keys" else 0]
    q, k, v, starts = span_case(heads, kv_heads, dim, lengths, seed=threads)
    g = torch.Generator().manual_seed(2)
    ctx = [(torch.randn(c, kv_heads, dim, generator=g).bfloat16(), torch.randn(c, kv_heads, dim, generator=g)
            .bfloat16()) for c in context]
    keys = torch.cat([t for (ck, _), a, b in zip(ctx, starts[:-1], starts[1:]) for t in (ck, k[a:b])])
    values = torch.cat([t for (_, cv), a, b in zip(ctx, starts[:-1], starts[1:]) for t in (cv, v[a:b])])
    key_starts = torch.tensor([0] + [n + c for n, c in zip(lengths, context)]).cumsum(0)
    got = cpu_span_attention.launch(q, keys, values, starts, key_starts, dim ** -0.5, case != "own keys", threads)
    for i in range(len(lengths)):
        (a, b), (ka, kb) = starts[i:i + 2].tolist(), key_starts[i:i + 2].tolist()
        want = cpu_span_attention.dense_attention(q[a:b], keys[ka:kb], values[ka:kb], case != "own keys")
        assert ((got[a:b].double() - want).abs() <= 1e-2 + 2 ** -7 * want.abs()).all()


@pytest.mark.parametrize("pool_dtype", [None, torch.float8_e4m3fn])  # kv_cache_dtype auto, fp8
def test_cpu_span_attention_reads_keys_in_place_through_slots(pool_dtype):
    """key_rows: each key read from its row of a pool (slots shuffled through it, rows of other sequences between;
    a float8 pool's widened as read): bit for bit the kernel's result on the same keys (dequantized) packed in
    order."""
    require_amx_kernel(cpu_span_attention.library())
    heads, kv_heads, dim = 9, 3, 64
    q, k, v, starts = span_case(heads, kv_heads, dim, [5, 40, 17], seed=3)
    g = torch.Generator().manual_seed(4)
    slots = torch.randperm(200, generator=g)[:k.shape[0]]
    k_pool, v_pool = (torch.randn(200, kv_heads, dim, generator=g).bfloat16() for _ in range(2))
    k_pool[slots], v_pool[slots] = k, v
    scales = ()
    if pool_dtype is not None:
        (k_pool, k_scale), (v_pool, v_scale) = quantize_kv(k_pool), quantize_kv(v_pool)
        scales = k_scale, v_scale
        k, v = (dequantized_kv(x, s, torch.bfloat16)[slots] for x, s in ((k_pool, k_scale), (v_pool, v_scale)))
    for causal in (False, True):
        want = cpu_span_attention.launch(q, k, v, starts, starts, dim ** -0.5, causal, 2)
        got = cpu_span_attention.launch(q, k_pool, v_pool, starts, starts, dim ** -0.5, causal, 2, slots, *scales)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="key_rows must name a row"):
        cpu_span_attention.launch(q, k_pool, v_pool, starts, starts, dim ** -0.5, True, 2, slots + 200, *scales)


def test_cpu_bf16_encoders_attend_in_one_call_per_layer():
    """all-MiniLM-L6-v2 (32-wide heads) in bf16 takes the kernel; its embeddings are the per-span SDPA's to
    bf16's rounding (cosine >= 0.9999); float32 keeps the SDPA."""
    require_amx_kernel(cpu_span_attention.library())
    llm = LLM("sentence-transformers/all-MiniLM-L6-v2", dtype="bfloat16")
    backend = llm.engine.runner.attention_backend
    assert isinstance(backend.prefill, CPUSpanPrefill)
    docs = PROMPTS + [" ".join(PROMPTS * 2)]
    got = torch.tensor([o.outputs.embedding for o in llm.embed(docs)])
    backend.prefill = PerSequencePrefill()  # every layer's Attention holds this backend
    want = torch.tensor([o.outputs.embedding for o in llm.embed(docs)])
    assert F.cosine_similarity(got, want).min() >= 0.9999
    fp32 = LLM("sentence-transformers/all-MiniLM-L6-v2", dtype="float32")
    assert isinstance(fp32.engine.runner.attention_backend.prefill, PerSequencePrefill)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_cpu_bf16_decoders_prefill_through_the_kernel_with_chunks_and_cache_hits(kv_cache_dtype, tiny_model,
                                                                                  monkeypatch):
    """A bf16 decoder with 32-wide heads: several prompts' spans in one call, long prompts in chunks (each after
    its earlier chunks' keys in the pool, read in place: bf16 or float8) and prefix-cache hits through the kernel
    too (the per-span SDPA never runs); the last-token hidden states are the SDPA's (over the same dequantized
    context) to bf16's rounding, and generation ends with no block left."""
    require_amx_kernel(cpu_span_attention.library())
    path = tiny_model("qwen3-hd32")
    calls, sdpa_calls = [], []
    launch, per_span = cpu_span_attention.launch, PerSequencePrefill.__call__
    monkeypatch.setattr(cpu_span_attention, "launch",
                        lambda *a, **kw: calls.append(a[3].numel() - 1) or launch(*a, **kw))
    monkeypatch.setattr(PerSequencePrefill, "__call__", lambda self, *a: sdpa_calls.append(1) or per_span(self, *a))
    prompts = PROMPTS + [sentence(410, 40), SHARED[0], SHARED[1]]
    kw = dict(dtype="bfloat16", block_size=8, max_num_batched_tokens=16, kv_cache_dtype=kv_cache_dtype)
    llm = LLM(path, task="embed", **kw)
    got = torch.tensor([o.outputs.embedding for o in llm.embed(prompts)])
    assert calls and max(calls) > 1 and not sdpa_calls  # several spans a call; chunks and hits in the kernel
    llm.engine.runner.attention_backend.prefill = PerSequencePrefill()  # every layer's Attention holds it
    want = torch.tensor([o.outputs.embedding for o in llm.embed(prompts)])
    assert sdpa_calls and F.cosine_similarity(got, want).min() >= 0.999
    gen = LLM(path, **kw)
    outs = gen.generate([sentence(410, 40), SHARED[0], SHARED[1]], greedy(4))
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs) and outs[-1].num_cached_tokens > 0
    assert_pool_free(gen)
