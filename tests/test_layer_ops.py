"""A decoder layer's fused elementwise kernels (engine.triton_layer_ops) against the op-by-op PyTorch ones they
replace: on CUDA, and on CPU in Triton's interpreter (conftest sets TRITON_INTERPRET=1 there), in float32
(the interpreter has no bfloat16 arithmetic of its own); and whole engines on them against the same engines
op by op."""
import os

import pytest
import torch
import transformers as T

from engine import LLM, PoolingParams, SamplingParams
from engine.attention import CacheWrite
from engine.kernels import select_layer_ops
from engine.layer_ops import CPUFusedLayerOps, FusedLayerOps, LayerOps, fused_ops_check_out
from engine.models.decoder import DecoderSpec, RMSNorm

from test_decoders import PROMPTS

pytestmark = pytest.mark.usefixtures("one_thread")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def needs_triton():
    pytest.importorskip("triton")
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU: run with TRITON_INTERPRET=1 to check the kernels in Triton's interpreter")


def norm(dim: int, gemma: bool, seed: int) -> RMSNorm:
    n = RMSNorm(dim, 1e-6, gemma).to(DEVICE)
    with torch.no_grad():
        n.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(seed)) * 0.3 + (0 if gemma else 1))
    return n


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("hidden", [48, 64, 576])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_add_rms_norm_matches_op_by_op(hidden, gemma, with_residual):
    x, residual = randn(7, hidden, seed=1), randn(7, hidden, seed=2) if with_residual else None
    n = norm(hidden, gemma, seed=hidden)
    want, want_stream = LayerOps().add_rms_norm(x, residual, n)
    got, got_stream = FusedLayerOps().add_rms_norm(x, residual, n)
    torch.testing.assert_close(got_stream, want_stream, atol=0, rtol=0)  # the same sum, rounded once
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# (query heads, kv heads, head dim): MHA, GQA, heads and half dims that are not powers of two
@pytest.mark.parametrize("heads", [(4, 4, 16), (8, 2, 32), (6, 2, 12), (9, 3, 64)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_rotary_matches_op_by_op(heads, qk_norm):
    h, kv, dim = heads
    t = 11
    qkv = randn(t, h + 2 * kv, dim, seed=3)
    freqs = torch.outer(torch.arange(t, dtype=torch.float32) * 3, 1.0 / 10000 ** (torch.arange(dim // 2) * 2 / dim))
    cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)[:, None].to(DEVICE)
    sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)[:, None].to(DEVICE)
    norms = (norm(dim, False, seed=4), norm(dim, False, seed=5)) if qk_norm else ()
    want = LayerOps().attention_inputs(qkv, h, kv, (cos, sin), *norms)
    got = FusedLayerOps().attention_inputs(qkv, h, kv, (cos, sin), *norms)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [(4, 4, 16), (8, 2, 32), (6, 2, 12), (9, 3, 64)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_rotary_writes_keys_and_values_into_the_cache_as_op_by_op(heads, qk_norm):
    """Rotated keys and the values land in their scattered slots; every other slot keeps what it held."""
    h, kv, dim = heads
    t, num_slots = 11, 40
    qkv = randn(t, h + 2 * kv, dim, seed=6)
    tables = randn(t, 1, dim, seed=7), randn(t, 1, dim, seed=8)
    norms = (norm(dim, False, seed=4), norm(dim, False, seed=5)) if qk_norm else ()
    slots = torch.randperm(num_slots, generator=torch.Generator().manual_seed(9))[:t].to(DEVICE)
    pools = randn(2, num_slots, kv, dim, seed=10)
    caches = {}
    for ops in (LayerOps(), FusedLayerOps()):
        cache = CacheWrite(pools[0].clone(), pools[1].clone(), slots)
        caches[type(ops)] = ops.attention_inputs(qkv, h, kv, tables, *norms, cache=cache)[1], *cache[:2]
    (want_keys, want_k, want_v), (got_keys, got_k, got_v) = caches[LayerOps], caches[FusedLayerOps]
    torch.testing.assert_close(got_keys, want_keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_v, want_v, atol=0, rtol=0)
    assert torch.equal(got_k[slots], got_keys) and torch.equal(got_v[slots], qkv[:, h + kv:])
    untouched = torch.ones(num_slots, dtype=torch.bool, device=DEVICE).index_fill_(0, slots, False)
    assert torch.equal(got_k[untouched], pools[0][untouched]) and torch.equal(got_v[untouched], pools[1][untouched])


@pytest.mark.parametrize("heads", [(4, 4, 16), (8, 2, 32), (9, 3, 64)])
def test_fused_rotary_writes_a_float8_pool_as_op_by_op(heads):
    """kv_cache_dtype fp8: the kernel scales each kv head of each token by its absmax / 448 and rounds its
    values to float8 itself, storing what the op-by-op write stores: values and their scales bit for bit; keys
    as their rotation is rounded (a GPU fuses its multiply-adds: scales a few float32 ulps apart on an H200),
    codes at most one float8 step apart."""
    h, kv, dim = heads
    t, num_slots = 11, 40
    qkv = randn(t, h + 2 * kv, dim, seed=11) * torch.logspace(-3, 3, t, device=DEVICE)[:, None, None]
    qkv[1, h + kv:] = 0.0  # a token whose values are all zero
    tables = randn(t, 1, dim, seed=12), randn(t, 1, dim, seed=13)
    slots = torch.randperm(num_slots, generator=torch.Generator().manual_seed(14))[:t].to(DEVICE)
    written = []
    for ops in (LayerOps(), FusedLayerOps()):
        cache = CacheWrite(*(torch.zeros(num_slots, kv, dim, device=DEVICE, dtype=torch.float8_e4m3fn)
                             for _ in range(2)), slots, *(torch.zeros(num_slots, kv, device=DEVICE) for _ in range(2)))
        ops.attention_inputs(qkv, h, kv, tables, cache=cache)
        written.append((torch.stack(cache[:2]).view(torch.uint8), torch.stack(cache[3:])))
    (want_codes, want_scales), (got_codes, got_scales) = written
    assert torch.equal(got_codes[1], want_codes[1]) and torch.equal(got_scales[1], want_scales[1])
    torch.testing.assert_close(got_scales[0], want_scales[0], atol=0, rtol=1e-6)
    assert (got_codes[0].int() - want_codes[0].int()).abs().max() <= 1
    assert want_scales.amax() > 0


@pytest.mark.parametrize("width", [40, 1536, 2100])  # one program's block of columns, and more than one
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy sigmoid at -inf: 0
def test_fused_gated_activation_matches_op_by_op(width, gelu):
    gate_up = randn(5, 2 * width, seed=width) * 3
    want = LayerOps().gated_activation(gate_up, gelu)
    got = FusedLayerOps().gated_activation(gate_up, gelu)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_ops_on_no_rows():
    ops, n = FusedLayerOps(), norm(16, False, seed=0)
    empty = torch.empty(0, 16, device=DEVICE)
    assert ops.add_rms_norm(empty, empty, n)[0].shape == (0, 16)
    tables = (empty[:, None], empty[:, None])
    q, k, v = ops.attention_inputs(torch.empty(0, 4, 16, device=DEVICE), 2, 1, tables)
    assert q.shape == (0, 2, 16) and k.shape == v.shape == (0, 1, 16)
    assert ops.gated_activation(torch.empty(0, 32, device=DEVICE), False).shape == (0, 16)


def test_a_compiled_model_traces_the_op_by_op_path():
    """Inside torch.compile the fused ops hand over to PyTorch's, which the compiler fuses itself: one graph,
    no Triton launch traced."""
    ops, n = FusedLayerOps(), norm(64, False, seed=0)
    x, residual, gate_up = randn(5, 64, seed=1), randn(5, 64, seed=2), randn(5, 64, seed=3)
    qkv = randn(5, 4, 16, seed=4)
    tables = randn(5, 1, 16, seed=5), randn(5, 1, 16, seed=6)

    slots = torch.tensor([3, 0, 6, 1, 4], device=DEVICE)

    def layer(ops, x, residual, qkv, gate_up):
        cache = CacheWrite(torch.zeros(8, 1, 16, device=DEVICE), torch.zeros(8, 1, 16, device=DEVICE), slots)
        return (*ops.add_rms_norm(x, residual, n), *ops.attention_inputs(qkv, 2, 1, tables, n16, n16, cache=cache),
                cache.k_cache, cache.v_cache, ops.gated_activation(gate_up, False))
    n16 = norm(16, False, seed=7)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    for got, expected in zip(compiled(ops, x, residual, qkv, gate_up), layer(LayerOps(), x, residual, qkv, gate_up),
                             strict=True):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def decoder_spec(arch: str, tiny_model) -> DecoderSpec:
    return DecoderSpec.from_hf(T.AutoConfig.from_pretrained(tiny_model(arch)))


def test_the_triton_ops_are_chosen_for_cuda_half_precision_only(tiny_model):
    spec = decoder_spec("llama3-gqa", tiny_model)
    # The CPU's own fused ops are the C ones (tests/test_cpu_kernels.py), never Triton's.
    assert type(select_layer_ops(torch.device("cpu"), torch.bfloat16, spec)) in (LayerOps, CPUFusedLayerOps)
    if CUDA:
        assert type(select_layer_ops(torch.device("cuda"), torch.float32, spec)) is LayerOps
        assert type(select_layer_ops(torch.device("cuda"), torch.bfloat16, spec)) is FusedLayerOps


@pytest.mark.parametrize("arch", ["llama3-gqa", "qwen3", "gemma"])
def test_the_start_up_check_passes_the_fused_ops_and_refuses_wrong_ones(arch, tiny_model, monkeypatch):
    """What decides, on the device at start-up, whether a model's layers take the fused ops."""
    import engine.triton_layer_ops as kernels
    spec, dtype = decoder_spec(arch, tiny_model), torch.float32 if not CUDA else torch.bfloat16
    assert fused_ops_check_out(torch.device(DEVICE), dtype, spec)
    gated = kernels.gated_activation
    monkeypatch.setattr(kernels, "gated_activation", lambda gate_up, gelu: gated(gate_up, not gelu))
    assert not fused_ops_check_out(torch.device(DEVICE), dtype, spec)
    monkeypatch.setattr(kernels, "gated_activation", lambda gate_up, gelu: 1 / 0)  # a kernel that fails to build
    assert not fused_ops_check_out(torch.device(DEVICE), dtype, spec)


@pytest.mark.parametrize("arch", ["llama3-gqa", "qwen3", "gemma"])
def test_an_engine_on_the_fused_ops_matches_op_by_op(arch, tiny_model):
    """Chunked prefill after prefix-cache hits, then the last tokens' hidden states (float32)."""
    path = tiny_model(arch)
    llm = LLM(path, task="embed", dtype="float32", block_size=8, max_num_batched_tokens=24,
              long_prefill_token_threshold=13, device=DEVICE)
    params = PoolingParams(normalize=False)
    want = [o.outputs.embedding for o in llm.embed(PROMPTS, pooling_params=params)]
    llm.engine.runner.model.layer_ops = FusedLayerOps()
    got = [o.outputs.embedding for o in llm.embed(PROMPTS, pooling_params=params)]
    assert llm.engine.kv.prefix_cache_hits > 0
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama3-gqa", "qwen3"])
def test_an_engine_generating_on_the_fused_ops_matches_op_by_op(arch, tiny_model):
    """Decodes read the keys and values the fused rotary wrote into the pool, from prefill and every step."""
    llm = LLM(tiny_model(arch), dtype="float32", block_size=8, device=DEVICE)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], params)]
    llm.engine.runner.model.layer_ops = FusedLayerOps()
    llm.engine.kv.pool.cached.clear()  # nothing from the op-by-op run: every key and value written again
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], params)] == want


@pytest.mark.skipif(not CUDA, reason="the fused ops run in bfloat16 on CUDA only")
@pytest.mark.parametrize("arch", ["gemma", "llama3-gqa", "qwen3"])
def test_bfloat16_on_the_fused_ops_as_close_to_float32_as_hf_bfloat16(arch, tiny_model):
    """Rounding once where Hugging Face rounds op by op moves the hidden states no further from float32."""
    path = tiny_model(arch)
    hf = {dt: T.AutoModel.from_pretrained(path, dtype=dt).to(DEVICE).eval() for dt in (torch.bfloat16, torch.float32)}
    llm = LLM(path, task="embed", dtype="bfloat16", block_size=8, device=DEVICE)
    assert isinstance(llm.engine.runner.model.layer_ops, FusedLayerOps)
    for out in llm.embed(PROMPTS, pooling_params=PoolingParams(normalize=False)):
        ids = torch.tensor([out.prompt_token_ids], device=DEVICE)
        with torch.no_grad():
            h16, h32 = (hf[dt](ids).last_hidden_state[0, -1].float().cpu() for dt in (torch.bfloat16, torch.float32))
        got = torch.tensor(out.outputs.embedding)
        distance = [1 - torch.nn.functional.cosine_similarity(a, h32, dim=0).item() for a in (got, h16)]
        assert distance[0] <= 2 * distance[1] + 1e-5, distance
