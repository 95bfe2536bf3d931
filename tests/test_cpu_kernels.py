"""The CPU's C kernels (engine.c_kernels): a decoder layer's and an encoder layer's fused bf16 ops
(engine.cpu_layer_ops) against the op-by-op PyTorch ones they replace, the start-up checks that decide, and
engines generating and embedding on them (their hidden states against Hugging Face's: test_decoders.py); the
build's fallback where no compiler runs. (The attention kernels are in test_attention_kernels.py.)"""
import concurrent.futures
import importlib
import itertools
import os
import platform
import shutil
import subprocess

import pytest
import torch
import transformers as T

from engine import LLM, SamplingParams, c_kernels, cpu_layer_ops
from engine.attention import CacheWrite, write_kv
from engine.kernels import select_encoder_layer_ops, select_layer_ops
from engine.layer_ops import CPUEncoderLayerOps, CPUFusedLayerOps, EncoderLayerOps, LayerOps, fused_ops_check_out
from engine.models.encoder import ACTIVATIONS, EncoderSpec
from engine.models.decoder import DecoderSpec, RMSNorm

from conftest import require_c_kernels
from test_decoders import PROMPTS
from test_encoders import MINILM, SENTENCES

pytestmark = pytest.mark.usefixtures("one_thread")
BF16 = torch.bfloat16
# Rounding once in float32 where PyTorch rounds each op to bf16: a step or two of bf16 apart (2^-8 relative each).
CLOSE = dict(atol=2e-2, rtol=2e-2)


@pytest.fixture(autouse=True)
def needs_the_library():
    require_c_kernels(cpu_layer_ops.library())


def norm(dim: int, gemma: bool, seed: int) -> RMSNorm:
    n = RMSNorm(dim, 1e-6, gemma)
    with torch.no_grad():
        n.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(seed)) * 0.3 + (0 if gemma else 1))
    return n.to(BF16)


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(BF16)


@pytest.mark.parametrize("hidden", [48, 576])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_op_by_op(hidden, gemma, with_residual):
    x, residual = randn(7, hidden, seed=1), randn(7, hidden, seed=2) if with_residual else None
    n = norm(hidden, gemma, seed=hidden)
    want, want_stream = LayerOps().add_rms_norm(x, residual, n)
    got, got_stream = CPUFusedLayerOps().add_rms_norm(x, residual, n)
    torch.testing.assert_close(got_stream, want_stream, atol=0, rtol=0)  # the same sum, rounded once
    torch.testing.assert_close(got, want, **CLOSE)


def rotary_case(heads: tuple[int, int, int], qk_norm: bool, t: int = 11, num_slots: int = 40):
    """qkv [t, heads + 2 kv heads, dim], the rotary tables, Qwen3's head norms where qk_norm, t scattered slots."""
    h, kv, dim = heads
    qkv = randn(t, h + 2 * kv, dim, seed=6)
    freqs = torch.outer(torch.arange(t, dtype=torch.float32) * 3, 1.0 / 10000 ** (torch.arange(dim // 2) * 2 / dim))
    tables = (torch.cat((freqs.cos(), freqs.cos()), dim=-1)[:, None].to(BF16),
              torch.cat((-freqs.sin(), freqs.sin()), dim=-1)[:, None].to(BF16))
    norms = (norm(dim, False, seed=4), norm(dim, False, seed=5)) if qk_norm else ()
    return qkv, tables, norms, torch.randperm(num_slots, generator=torch.Generator().manual_seed(9))[:t]


@pytest.mark.parametrize("heads", [(4, 4, 16), (6, 2, 12), (9, 3, 64), (16, 8, 128)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_and_cache_write_match_op_by_op(heads, qk_norm):
    """Queries and keys rotated (after Qwen3's head norms); keys and values land in their scattered slots, every
    other slot keeping what it held."""
    h, kv, dim = heads
    num_slots = 40
    qkv, tables, norms, slots = rotary_case(heads, qk_norm, num_slots=num_slots)
    pools = randn(2, num_slots, kv, dim, seed=10)
    out = {}
    for ops in (LayerOps(), CPUFusedLayerOps()):
        cache = CacheWrite(pools[0].clone(), pools[1].clone(), slots)
        out[type(ops)] = *ops.attention_inputs(qkv, h, kv, tables, *norms, cache=cache), *cache[:2]
    (*want, want_k, want_v), (*got, got_k, got_v) = out[LayerOps], out[CPUFusedLayerOps]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **CLOSE)
    assert torch.equal(got_k[slots], got[1]) and torch.equal(got_v[slots], qkv[:, h + kv:])
    untouched = torch.ones(num_slots, dtype=torch.bool).index_fill_(0, slots, False)
    assert torch.equal(got_k[untouched], pools[0][untouched]) and torch.equal(got_v[untouched], pools[1][untouched])
    torch.testing.assert_close(got_k, want_k, **CLOSE)
    assert torch.equal(got_v, want_v)  # values are copied as they are


@pytest.mark.parametrize("heads", [(9, 3, 64), (6, 2, 12)])  # vectors of 16 / the loop after them
@pytest.mark.parametrize("qk_norm", [False, True])
def test_a_float8_pool_holds_the_fused_keys_as_pytorch_writes_them(heads, qk_norm):
    """kv_cache_dtype fp8: the fused rotary's keys and the values quantized into their slots as
    engine.attention.write_kv quantizes them (values and scales bit for bit), other slots untouched; a row with a
    NaN: a NaN scale."""
    h, kv, dim = heads
    qkv, tables, norms, slots = rotary_case(heads, qk_norm, t=40, num_slots=48)
    # The values' rows: 448 first (a scale of 1), then every finite float8, the midpoints between neighbours (ties
    # to even, subnormals and zero among them) and their negatives, through the same rounding as PyTorch's cast.
    every = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = torch.cat((every, (every[:-1] + every[1:]) / 2))
    grid = torch.cat((grid, -grid)).to(BF16)
    values = qkv[:, h + kv:].reshape(-1, dim)  # a copy
    rest = values[:, 1:].flatten()
    rest[:grid.numel()] = grid
    values[:, 0], values[:, 1:] = 448, rest.view(-1, dim - 1)
    values[-1, 3] = float("nan")
    qkv[:, h + kv:] = values.view(-1, kv, dim)

    def pool():
        return CacheWrite(*(torch.zeros(48, kv, dim, dtype=torch.float8_e4m3fn) for _ in range(2)), slots,
                          *(torch.full((48, kv), 0.5) for _ in range(2)))
    got, want = pool(), pool()
    q, k, v = CPUFusedLayerOps().attention_inputs(qkv, h, kv, tables, *norms, cache=got)
    write_kv(want, k, v)
    nan_row = slots[-1], kv - 1
    assert got.v_scale[nan_row].isnan() and got.v_cache[nan_row].float().isnan().all()
    for g, w in zip(got[:2], want[:2]):
        assert torch.equal(g.view(torch.uint8) & 0x7f, w.view(torch.uint8) & 0x7f)  # a NaN's sign aside
    assert torch.equal(got.k_scale, want.k_scale) and torch.equal(got.v_scale.nan_to_num(), want.v_scale.nan_to_num())
    for g, w in zip((q, k, v), LayerOps().attention_inputs(qkv, h, kv, tables, *norms), strict=True):
        torch.testing.assert_close(g, w, equal_nan=True, **CLOSE)


@pytest.mark.parametrize("width", [40, 1536])
@pytest.mark.parametrize("gelu", [False, True])
def test_gated_activation_matches_op_by_op(width, gelu):
    gate_up = randn(5, 2 * width, seed=width) * 3
    torch.testing.assert_close(CPUFusedLayerOps().gated_activation(gate_up, gelu),
                               LayerOps().gated_activation(gate_up, gelu), **CLOSE)


def test_no_rows():
    ops, n = CPUFusedLayerOps(), norm(16, False, seed=0)
    empty = torch.empty(0, 16, dtype=BF16)
    assert ops.add_rms_norm(empty, empty, n)[0].shape == (0, 16)
    q, k, v = ops.attention_inputs(torch.empty(0, 4, 16, dtype=BF16), 2, 1, (empty[:, None], empty[:, None]))
    assert q.shape == (0, 2, 16) and k.shape == v.shape == (0, 1, 16)
    assert ops.gated_activation(torch.empty(0, 32, dtype=BF16), False).shape == (0, 16)


def decoder_spec(arch: str, tiny_model) -> DecoderSpec:
    return DecoderSpec.from_hf(T.AutoConfig.from_pretrained(tiny_model(arch)))


@pytest.mark.parametrize("arch", ["llama3-gqa", "qwen3", "gemma"])
def test_the_start_up_check_passes_them_and_refuses_wrong_ones(arch, tiny_model, monkeypatch):
    """What decides: bf16 with a bf16 or float8 pool takes them where they check out; float32 does not."""
    cpu, spec = torch.device("cpu"), decoder_spec(arch, tiny_model)
    assert type(select_layer_ops(cpu, BF16, spec)) is CPUFusedLayerOps
    assert type(select_layer_ops(cpu, BF16, spec, torch.float8_e4m3fn)) is CPUFusedLayerOps
    assert type(select_layer_ops(cpu, torch.float32, spec)) is LayerOps
    gated = cpu_layer_ops.gated_activation
    monkeypatch.setattr(cpu_layer_ops, "gated_activation", lambda gate_up, gelu: gated(gate_up, not gelu))
    assert not fused_ops_check_out(cpu, BF16, spec, None, CPUFusedLayerOps())
    assert type(select_layer_ops(cpu, BF16, spec)) is LayerOps


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("arch", ["llama3-gqa", "qwen3"])
def test_an_engine_generating_on_them_matches_op_by_op_up_to_near_ties(arch, kv_cache_dtype, tiny_model):
    """bf16 decodes read the keys and values the fused rotary wrote into the pool (bf16, or float8 as PyTorch
    quantizes them), from prefill and every step: greedy tokens as the op-by-op engine's until a near tie (random
    tiny models have many), where the op-by-op choice is the fused run's runner-up within a few rounding steps of
    bf16 logits."""
    llm = LLM(tiny_model(arch), dtype="bfloat16", block_size=8, kv_cache_dtype=kv_cache_dtype)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    assert isinstance(llm.engine.runner.model.layer_ops, CPUFusedLayerOps)
    got = llm.generate(PROMPTS[:3], params)
    llm.engine.runner.model.layer_ops = LayerOps()
    llm.engine.kv.pool.cached.clear()  # nothing from the fused run: every key and value written again
    want = llm.generate(PROMPTS[:3], params)
    agreeing = 0
    for g, w in zip((o.outputs[0] for o in got), (o.outputs[0] for o in want), strict=True):
        if g.token_ids == w.token_ids:
            agreeing += 1
            continue
        i = next(i for i, (a, b) in enumerate(zip(g.token_ids, w.token_ids)) if a != b)
        top = g.logprobs[i]
        assert w.token_ids[i] in top and top[g.token_ids[i]].logprob - top[w.token_ids[i]].logprob < 0.05, (i, top)
    # A float8 pool turns a key's bf16 rounding step into up to a float8 step (1/16): near ties come sooner.
    assert agreeing >= (2 if kv_cache_dtype == "auto" else 1)


@pytest.mark.parametrize("hidden", [384, 1000])
@pytest.mark.parametrize("rows", [0, 1, 37])
def test_add_layer_norm_matches_op_by_op(hidden, rows):
    """LayerNorm(x + residual) with the sum rounded to bf16 first, as PyTorch's add stores it; rows of a wider
    tensor (strided) read in place; widths that are not a multiple of the vector's."""
    wide, residual = randn(rows, hidden + 8, seed=1), randn(rows, hidden, seed=2)
    x = wide[:, :hidden]
    ln = torch.nn.LayerNorm(hidden, eps=1e-12).to(BF16)
    with torch.no_grad():
        ln.weight.copy_(randn(hidden, seed=3))
        ln.bias.copy_(randn(hidden, seed=4))
    got = CPUEncoderLayerOps().add_layer_norm(x, residual, ln)
    want = ln(x + residual)
    assert got.shape == want.shape and got.dtype == BF16
    torch.testing.assert_close(got.float(), want.float(), **CLOSE)
    # The same sums and statistics in float32: most elements round to the same bf16 number.
    assert rows == 0 or (got == want).float().mean() > 0.99


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_an_activation_by_table_is_pytorchs_bit_for_bit_at_every_bf16_number(act):
    """Every bf16 bit pattern (NaNs, infinities, subnormals included), in a length no vector width divides, and
    written over its input."""
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(BF16)
    x = torch.cat([every, every[:13]])
    want = ACTIVATIONS[act](x)
    got = CPUEncoderLayerOps().activation(x, ACTIVATIONS[act])
    assert got.data_ptr() == x.data_ptr()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()].view(torch.int16), want[~want.isnan()].view(torch.int16))


def test_the_encoder_start_up_check_passes_them_and_refuses_wrong_ones(tiny_model, monkeypatch):
    """bf16 on the CPU takes them where they check out; float32 keeps PyTorch's; a kernel answering otherwise is
    refused."""
    cpu, spec = torch.device("cpu"), EncoderSpec.from_hf(T.AutoConfig.from_pretrained(tiny_model("bert")))
    assert type(select_encoder_layer_ops(cpu, BF16, spec)) is CPUEncoderLayerOps
    assert type(select_encoder_layer_ops(cpu, torch.float32, spec)) is EncoderLayerOps
    add_layer_norm = cpu_layer_ops.add_layer_norm
    monkeypatch.setattr(cpu_layer_ops, "add_layer_norm", lambda x, r, w, b, eps: add_layer_norm(x, r, w, b, 1.0))
    assert type(select_encoder_layer_ops(cpu, BF16, spec)) is EncoderLayerOps


def test_minilm_embeds_on_them_as_op_by_op():
    """all-MiniLM-L6-v2 in bf16: embeddings on the fused ops as the op-by-op engine's (cosine >= 0.9999)."""
    llm = LLM(MINILM, dtype="bfloat16")
    assert isinstance(llm.engine.runner.model.layer_ops, CPUEncoderLayerOps)
    got = torch.tensor([o.outputs.embedding for o in llm.embed(SENTENCES)])
    llm.engine.runner.model.layer_ops = EncoderLayerOps()
    want = torch.tensor([o.outputs.embedding for o in llm.embed(SENTENCES)])
    assert torch.nn.functional.cosine_similarity(got, want).min() >= 0.9999


def test_no_compiler_builds_nothing_and_an_unusable_cache_falls_back_to_the_temp_dir(tmp_path, monkeypatch):
    probe = ("probe", c_kernels.BF16 + "void f(void) {}\n", (("f", ()),))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert c_kernels.build.__wrapped__(*probe) is None
    monkeypatch.delenv("CC")
    assert c_kernels.build.__wrapped__(*probe)._name.startswith(str(tmp_path))
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))  # no directory can be made under it
    assert c_kernels.build.__wrapped__(*probe)._name.startswith(c_kernels._cache_dirs()[1])


def failed_builds(tmp_path, compiler: str, marches: tuple[str, ...], opt: str = "-O1") -> list[tuple]:
    """Each C source compiled with compiler for each -march (the engine's flags but opt, undeclared functions
    errors): (source, march, code, the end of its errors) of those that failed."""
    sources = {name: importlib.import_module(f"engine.{name}")._SOURCE
               for name in ("cpu_layer_ops", "cpu_paged_decode", "cpu_span_attention", "cpu_amx_matmul", "cpu_int4")}
    flags = [f for f in c_kernels.FLAGS if f not in ("-march=native", "-O3", "-shared")]

    for name, source in sources.items():
        (tmp_path / f"{name}.c").write_text(source)

    def compile_for(job):
        name, march = job
        run = subprocess.run([compiler, opt, f"-march={march}", *flags, "-c",
                              "-Werror=implicit-function-declaration", str(tmp_path / f"{name}.c"), "-o",
                              str(tmp_path / f"{name}-{march}.o")], capture_output=True, text=True)
        return name, march, run.returncode, run.stderr[-400:]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return [result for result in pool.map(compile_for, itertools.product(sources, marches)) if result[2] != 0]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 CPU targets")
def test_every_source_compiles_for_other_x86_cpus(tmp_path):
    """Each C source compiles for CPUs other than this one (no AVX-512, AVX-512 without BF16 or AMX, AMX), every
    vector path behind its feature test: where one failed, that CPU would fall back to the slower PyTorch ops."""
    assert not failed_builds(tmp_path, os.environ.get("CC", "cc"),
                             ("x86-64", "x86-64-v3", "skylake-avx512", "sapphirerapids"))


ARM_CC = "aarch64-linux-gnu-gcc"


@pytest.mark.skipif(shutil.which(ARM_CC) is None, reason=f"no {ARM_CC} (Debian: apt install gcc-aarch64-linux-gnu)")
def test_every_source_compiles_for_arm_cpus(tmp_path):
    """ARM servers (Graviton, Ampere) build the portable paths, with and without bf16 instructions: gcc 12's
    aarch64 vectorizer crashed (an internal compiler error) on the float8 write's fmaxf reduction, which left
    such a CPU on the PyTorch ops. At -O3, as the engine builds (the crash needs the vectorizer)."""
    assert not failed_builds(tmp_path, ARM_CC, ("armv8-a", "armv8.2-a+bf16"), opt="-O3")
