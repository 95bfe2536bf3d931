"""kv_cache_dtype fp8: a float8 paged pool with one scale per (token, kv head). Every reader dequantizes its
blocks into the queries' dtype, so an engine on an fp8 pool computes exactly what one computes whose float pool
holds the same dequantized values, through every attention path (prefill with cached and chunked context,
decode, the CPU's C paged kernel, the Triton paged kernel in Triton's interpreter)."""
import os

import pytest
import torch
from conftest import assert_pool_free, sentence

from engine import LLM, EngineConfig, SamplingParams
from engine import attention, cpu_paged_decode, layer_ops
from engine.attention_backends import AttentionBackend, GatherDecode, PerSequencePrefill
from engine.cpu_paged_decode import CPUPagedDecode
from engine.varlen_prefill import VarlenPrefill, reference_attend

pytestmark = pytest.mark.usefixtures("one_thread")
FP8 = torch.float8_e4m3fn


def use_backend(llm: LLM, backend: AttentionBackend) -> None:
    llm.engine.runner.attention_backend = backend
    for attn in llm.engine.runner.model.attention_layers:
        attn.backend = backend


def backends() -> dict:
    """name -> backend(device)"""
    out = {"per-sequence + gather": lambda dev: AttentionBackend(PerSequencePrefill(), GatherDecode()),
           "varlen + gather": lambda dev: AttentionBackend(VarlenPrefill(dev, reference_attend), GatherDecode())}
    if cpu_paged_decode.library() is not None:
        out["per-sequence + C paged"] = lambda dev: AttentionBackend(PerSequencePrefill(), CPUPagedDecode())
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        from engine.triton_decode import TritonPagedDecode
        out["per-sequence + triton paged"] = lambda dev: AttentionBackend(PerSequencePrefill(), TritonPagedDecode())
    return out


def run(llm: LLM, backend) -> list:
    use_backend(llm, backend(llm.engine.runner.device))
    shared = "the shared instruction of every chat goes here and it is long enough to fill blocks "
    prompts = [sentence(950, 5), sentence(951, 40)] + [shared + sentence(900 + i, 4) for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=10, logprobs=1, ignore_eos=True)
    outs = llm.generate(prompts, params) + llm.generate(prompts[2:], params)  # then prefix-cache hits
    assert_pool_free(llm)
    return [(o.outputs[0].token_ids, [e[t].logprob for t, e in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)])
            for o in outs]


@pytest.mark.parametrize("backend", list(backends()))
def test_an_fp8_pool_computes_as_its_rounded_values_in_a_float_pool(backend, tiny_model, monkeypatch):
    model = tiny_model("qwen3")
    kw = dict(dtype="float32", block_size=8, max_num_batched_tokens=32, long_prefill_token_threshold=12)
    fp8 = LLM(model, kv_cache_dtype="fp8", **kw)
    assert fp8.engine.runner.kv_cache.dtype == FP8
    got = run(fp8, backends()[backend])
    # The reference: the same write into a float pool, of the values an fp8 pool dequantizes to.
    write = layer_ops.write_kv
    as_stored = lambda x: attention.dequantized_kv(*attention.quantize_kv(x), x.dtype)  # noqa: E731
    monkeypatch.setattr(layer_ops, "write_kv", lambda cache, k, v: write(cache, as_stored(k), as_stored(v)))
    want = run(LLM(model, **kw), backends()[backend])
    assert got == want


def test_an_fp8_pool_holds_more_tokens_in_the_same_memory(tiny_model):
    engines = {kv: LLM(tiny_model("llama"), dtype="float32", device="cpu", kv_cache_dtype=kv, block_size=16,
                       kv_cache_memory_bytes=1 << 20).engine for kv in ("auto", "fp8")}
    per_block = {kv: e.runner.kv_bytes_per_block(16) for kv, e in engines.items()}
    # A head's 16 values of a token: 64 bytes in float32, 16 and a 4-byte scale in float8.
    assert per_block["fp8"] * 64 == per_block["auto"] * 20
    for kv, e in engines.items():
        assert e.kv.pool.num_blocks == (1 << 20) // per_block[kv]


def test_kv_cache_dtype_is_checked(tiny_model):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3"):
        EngineConfig(model="m", kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="kv_cache_dtype applies to decoder models"):
        LLM(tiny_model("bert"), dtype="float32", kv_cache_dtype="fp8")


def test_compiled_steps_on_an_fp8_pool_run_one_graph_each(tiny_model):
    """torch_compile traces the pool's quantizing write: decodes of one and of two, and a long prompt, from the
    graphs compiled at start (a reshape in the write had specialised the decode graph on a batch of one), with
    eager's tokens."""
    model, kw = tiny_model("qwen3"), dict(dtype="float32", block_size=8, kv_cache_dtype="fp8")
    prompts = [sentence(960 + i, n) for i, n in enumerate((5, 30, 60))]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def tokens(llm):
        return [o.outputs[0].token_ids for o in llm.generate(prompts[:1], params) + llm.generate(prompts[1:], params)]
    eager = tokens(LLM(model, **kw))
    llm = LLM(model, torch_compile=True, **kw)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert tokens(llm) == eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
