"""int8 quantization: weight-only (int8) and int8 weights + per-token int8 activations (w8a8). Each
layer against its own dequantized weights (and quantized activations), the CPU kernel choice, and the
engine end to end against Hugging Face running the same dequantized weights and activations."""
import pytest
import torch
import torch.nn.functional as F
import transformers as T
from conftest import assert_pool_free, sentence
from engine import LLM, EngineConfig, SamplingParams
from engine import quantization as Q

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quantize_int8_is_within_half_a_step_per_row():
    w = torch.randn(64, 96) * torch.linspace(0.01, 3.0, 64)[:, None]  # rows of very different ranges
    q, scale = Q.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64, 1)
    err = (w - Q.dequantize(q, scale, torch.float32)).abs().amax(dim=1, keepdim=True)
    assert torch.all(err <= scale / 2 + 1e-7)
    assert q.abs().amax(dim=1).eq(127).all()  # each row uses its whole range


@pytest.mark.parametrize("rows", [1, 3, Q.CPU_INT8_KERNEL_MAX_ROWS, Q.CPU_INT8_KERNEL_MAX_ROWS + 1, 200])
def test_int8_linear_matches_its_dequantized_weights_on_cpu(rows, monkeypatch):
    torch.manual_seed(rows)
    w, b, x = torch.randn(48, 80), torch.randn(48), torch.randn(rows, 80)
    layer = Q.Int8Linear(w, b)
    kernel_calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: kernel_calls.append(1) or real(*a))
    got = layer(x)
    want = F.linear(x, layer.weight, b)
    if rows <= Q.CPU_INT8_KERNEL_MAX_ROWS:  # the int8 kernel, bf16 activations: bf16 rounding only
        assert kernel_calls and torch.allclose(got, want, rtol=2e-2, atol=5e-2)
    else:  # dequantized fp32 matmul
        assert not kernel_calls and torch.allclose(got, want, atol=1e-5)
    assert got.dtype == x.dtype and got.shape == (rows, 48)


def test_portable_int8_matmul_matches_dequantized_weights():
    torch.manual_seed(0)
    w, x = torch.randn(32, 40), torch.randn(5, 40)
    layer = Q.Int8Linear(w, None)
    assert torch.allclose(Q._portable_matmul(x, layer), F.linear(x, layer.weight), atol=1e-5)


def w8a8_reference(x: torch.Tensor, layer: Q.Int8Linear) -> torch.Tensor:
    """Exact integer arithmetic in float64: per-token int8 activations times int8 weights, then both scales."""
    xq, xscale = Q.quantize_int8(x)
    return ((xq.double() @ layer.qweight.double().t()) * layer.scale.double() * xscale.double()).float()


@pytest.mark.parametrize("rows, in_features", [(1, 80), (3, 37), (200, 64)])
def test_w8a8_linear_is_exact_integer_arithmetic_on_both_paths(rows, in_features, monkeypatch):
    torch.manual_seed(rows)
    w, b = torch.randn(48, in_features), torch.randn(48)
    x = torch.randn(rows, in_features) * torch.logspace(-2, 2, rows)[:, None]  # tokens of very different ranges
    layer = Q.Int8Linear(w, b, "w8a8")
    kernel_calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda *a: kernel_calls.append(1) or real(*a))
    want = w8a8_reference(x, layer) + b
    got = layer(x)
    assert kernel_calls and got.dtype == x.dtype and got.shape == (rows, 48)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(Q._portable_w8a8_matmul(x, layer) + b, want, rtol=1e-5, atol=1e-5)
    # Within a step of its own scale of the unquantized product.
    assert torch.allclose(got, F.linear(x, w, b), rtol=0.1, atol=0.05 * x.abs().amax().item())


def test_w8a8_scales_each_token_alone():
    """A token's result does not depend on the other tokens of the step (an outlier token would
    otherwise cost every other token its precision), so a packed batch equals its rows one by one."""
    torch.manual_seed(1)
    layer = Q.Int8Linear(torch.randn(24, 32), None, "w8a8")
    x = torch.randn(6, 32)
    x[2] *= 1000
    together = layer(x)
    assert torch.equal(together, torch.cat([layer(x[i:i + 1]) for i in range(6)]))


@pytest.mark.parametrize("method", ["int8", "w8a8"])
def test_compiled_int8_layers_compute_the_same_numbers(method):
    """torch_compile compiles these layers inside the decode graph, and w8a8's alone for prefill-sized
    inputs: the activations' scales and int8 values, and the rescaled product, stay bit for bit eager's."""
    torch.manual_seed(2)
    layer = Q.Int8Linear(torch.randn(40, 64), torch.randn(40), method)
    inputs = [torch.randn(rows, 64) * torch.logspace(-2, 2, rows)[:, None]
              for rows in (1, 5, 3 * Q.CPU_INT8_KERNEL_MAX_ROWS)]
    eager = [layer(x) for x in inputs]
    in_a_graph = torch.compile(layer.forward, dynamic=True)
    assert all(torch.equal(in_a_graph(x), want) for x, want in zip(inputs[:2], eager))
    Q.compile_int8_layers(layer)
    with torch.inference_mode():
        assert all(torch.equal(layer(x), want) for x, want in zip(inputs, eager))


def test_quantization_is_checked():
    with pytest.raises(ValueError, match="quantization must be one of int8, w8a8"):
        EngineConfig(model="m", quantization="int4")


def test_quantization_of_an_encoder_is_refused(tiny_model):
    with pytest.raises(ValueError, match="quantization applies to decoder models"):
        LLM(tiny_model("bert"), dtype="float32", quantization="int8")


def dequantized_reference(model_dir: str, method: str):
    """Hugging Face on the engine's int8 weights, dequantized to fp32 (a tied head gets its own copy,
    as in the engine; the input embeddings stay exact); for w8a8 every such layer's input is quantized
    per token and dequantized too."""
    hf = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if isinstance(mod, torch.nn.Linear) and (".layers." in name or name == "lm_head"):
                mod.weight = torch.nn.Parameter(Q.dequantize(*Q.quantize_int8(mod.weight), torch.float32))
                if method == "w8a8":
                    mod.register_forward_pre_hook(lambda _, args: (Q.dequantize(*Q.quantize_int8(args[0]),
                                                                                torch.float32),))
    return hf


@pytest.mark.parametrize("arch, method", [("llama", "int8"), ("qwen3", "int8"), ("llama", "w8a8"), ("qwen3", "w8a8")])
def test_int8_generation_follows_hf_on_the_dequantized_weights(arch, method, tiny_model):
    model_dir = tiny_model(arch)
    llm = LLM(model_dir, dtype="float32", block_size=8, quantization=method)
    hf = dequantized_reference(model_dir, method)
    prompts = [sentence(500 + i, n) for i, n in enumerate((5, 30))]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, logprobs=1, ignore_eos=True))
    for out in outs:
        c = out.outputs[0]
        with torch.no_grad():
            logits = hf(torch.tensor([out.prompt_token_ids + c.token_ids])).logits[0]
        start = len(out.prompt_token_ids) - 1
        for k, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            row = logits[start + k]
            # int8: rows through the int8 x bf16 kernel carry bf16 activations (logprob errors seen up to
            # 0.09 here, logits of std ~1.6), so a token may differ from HF's only at a near-tie. w8a8 is
            # the same integer arithmetic as its reference: only float rounding differs (seen 2e-6).
            tol = 0.1 if method == "int8" else 1e-4
            assert row.max() - row[tok] < tol, f"step {k}: token {tok} is not HF's near-top"
            assert abs(entry[tok].logprob - row.log_softmax(-1)[tok].item()) < tol
    assert_pool_free(llm)


@pytest.mark.parametrize("method", Q.QUANTIZATION_METHODS)
def test_int8_yes_no_reranker_matches_hf_on_the_dequantized_weights(method, tiny_model):
    template = "question : {query} document : {document} answer :"
    model_dir = tiny_model("llama")
    llm = LLM(model_dir, task="score", dtype="float32", block_size=4, score_tokens=("no", "yes"),
              score_template=template, quantization=method)
    hf = dequantized_reference(model_dir, method)
    tok = llm.get_tokenizer()
    no, yes = (tok(t, add_special_tokens=False)["input_ids"][0] for t in ("no", "yes"))
    docs = [sentence(600 + i, 6 + 5 * i) for i in range(3)]
    for doc, out in zip(docs, llm.score("is the cat on the mat", docs)):
        with torch.no_grad():
            row = hf(torch.tensor([out.prompt_token_ids])).logits[0, -1]
        want = row[[no, yes]].softmax(-1)[1].item()
        assert abs(out.outputs.score - want) <= 1e-3
    down_proj = llm.engine.runner.model.layers[0].mlp.down_proj
    assert down_proj.qweight.dtype == torch.int8 and down_proj.matmul is Q.select_int8_matmul(torch.device("cpu"), method)
    assert_pool_free(llm)
