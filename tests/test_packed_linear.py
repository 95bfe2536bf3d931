"""Linear layers on the CPU with oneDNN-packed weights (engine.packed_linear): each product is F.linear's, every
model family's outputs are the unpacked model's, heads read from packed layers stay right, and a CPU where
the packed product does not check out keeps nn.Linear."""
import pytest
import torch
import torch.nn.functional as F

from conftest import sentence
from engine import LLM, SamplingParams
from engine.packed_linear import PackedLinear, packing_checks_out

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not packing_checks_out(torch.float32), reason="oneDNN's packed product is not here")]
TEXTS = [sentence(i, 6 + 5 * i) for i in range(4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 3, 64])  # 0: a compiled last layer's output rows for a chunk ending nothing
@pytest.mark.parametrize("layout", ["rows", "strided", "3-d"])
def test_packed_product_is_f_linear(dtype, bias, rows, layout):
    if not packing_checks_out(dtype):
        pytest.skip(f"oneDNN's packed product does not check out in {dtype} here")
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 80, generator=gen).to(dtype)
    b = torch.randn(96, generator=gen).to(dtype) if bias else None
    x = torch.randn(rows, 160 if layout == "strided" else 80, generator=gen).to(dtype)
    x = x[:, ::2] if layout == "strided" else x.view(1, rows, 80) if layout == "3-d" else x
    layer = PackedLinear(weight, b)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(layer(x), F.linear(x, weight, b), atol=tol, rtol=tol)
    assert torch.equal(layer.weight, weight)  # unpacked for readers, bit for bit


def unpacked(path: str, monkeypatch, **kwargs) -> LLM:
    """The same engine with nn.Linear kept, as on a CPU where packing does not check out."""
    import engine.model_runner
    with monkeypatch.context() as m:
        m.setattr(engine.model_runner, "packs_linears", lambda device, dtype: False)
        return LLM(path, **kwargs)


def linears(llm: LLM) -> tuple[int, int]:
    mods = list(llm.engine.runner.model.modules())
    return sum(isinstance(m, PackedLinear) for m in mods), sum(isinstance(m, torch.nn.Linear) for m in mods)


@pytest.mark.parametrize("family", ["bert", "deberta-v3", "jina-reranker-v2"])
def test_encoders_packed_match_unpacked(family, tiny_model, monkeypatch):
    path = tiny_model(family)
    task = "embed" if family == "bert" else "score"
    packed, plain = LLM(path, task=task, dtype="float32"), unpacked(path, monkeypatch, task=task, dtype="float32")
    assert linears(packed)[1] == 0 and linears(packed)[0] > 0 and linears(plain)[0] == 0
    if task == "embed":
        got, want = ([o.outputs.embedding for o in llm.embed(TEXTS)] for llm in (packed, plain))
    else:  # DeBERTa's relative positions go through its packed qkv layer
        got, want = ([o.outputs.score for o in llm.score(TEXTS[0], TEXTS[1:])] for llm in (packed, plain))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_generation_packed_matches_unpacked(family, dtype, tiny_model, monkeypatch):
    """A tied decoder's logits head (qwen2's) becomes a packed copy of the embedding table, the table stays for
    the lookup; an untied one's is packed as it is. Greedy tokens and logprobs are the unpacked engine's."""
    path = tiny_model(family)
    packed, plain = LLM(path, dtype=dtype), unpacked(path, monkeypatch, dtype=dtype)
    model = packed.engine.runner.model
    assert isinstance(model.lm_head, PackedLinear) and isinstance(model.embed_tokens, torch.nn.Embedding)
    assert torch.equal(model.lm_head.weight, model.embed_tokens.weight) == model.spec.tie_word_embeddings
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    got, want = (llm.generate(TEXTS, params) for llm in (packed, plain))
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    tol = 1e-4 if dtype == "float32" else 5e-2
    for g, w in zip(got, want):
        for gs, ws in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert gs.keys() == ws.keys()
            assert all(abs(gs[t].logprob - ws[t].logprob) < tol for t in gs)


@pytest.mark.parametrize("family", ["llama3-gqa", "qwen3"])
def test_yes_no_reranker_packed_scores_as_unpacked(family, tiny_model, monkeypatch):
    """A reranker scores with two rows of its output embeddings, read once at start-up: a tied model's (llama3-gqa)
    from the embedding table, no packed copy of it made; an untied one's (qwen3) from its packed head."""
    path = tiny_model(family)
    kwargs = dict(task="score", dtype="float32", score_tokens=("no", "yes"))
    packed, plain = LLM(path, **kwargs), unpacked(path, monkeypatch, **kwargs)
    model = packed.engine.runner.model
    assert isinstance(getattr(model, "lm_head", None), PackedLinear) != model.spec.tie_word_embeddings
    got, want = ([o.outputs.score for o in llm.score(TEXTS[0], TEXTS[1:])] for llm in (packed, plain))
    assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("family", ["bert", "qwen2"])
def test_packed_state_dict_is_the_unpacked_one(family, tiny_model, monkeypatch):
    """Every weight is still in state_dict(), under nn.Linear's keys (what a caller copying the engine's weights,
    such as bench/rerank.py's references, reads)."""
    path = tiny_model(family)
    kwargs = dict(task="embed" if family == "bert" else "generate", dtype="bfloat16")
    packed_model = LLM(path, **kwargs).engine.runner.model
    got = packed_model.state_dict()
    want = unpacked(path, monkeypatch, **kwargs).engine.runner.model.state_dict()
    assert want.keys() <= got.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    m = packed_model
    layer = m.layers[0].self_attn.qkv_proj if family == "qwen2" else m.encoder.layer[0].attention.self.qkv
    assert isinstance(layer, PackedLinear) and sum(layer.shard_sizes) == layer.out_features  # the fused parts


def test_quantized_layers_are_not_packed(tiny_model):
    llm = LLM(tiny_model("llama"), dtype="float32", quantization="int8")
    assert linears(llm)[0] == 0


def test_no_onednn_keeps_f_linear(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert not packing_checks_out.__wrapped__(torch.float32)
