"""Quantization: weight-only int8 (int8), weight-only 4-bit per group (int4), int8 weights + per-token int8
activations (w8a8), float8 weights + per-token float8 activations (fp8). Each layer against its own dequantized
weights (and quantized activations), the kernel choice, and the engine end to end against Hugging Face running the
same dequantized weights and activations."""
import os

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from conftest import assert_pool_free, require_amx_kernel, require_c_kernels, sentence
from engine import LLM, EngineConfig, SamplingParams, cpu_amx_matmul, cpu_int4
from engine import int4_linear as I4
from engine import quantization as Q

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quantize_int8_is_within_half_a_step_per_row():
    w = torch.randn(64, 96) * torch.linspace(0.01, 3.0, 64)[:, None]  # rows of very different ranges
    q, scale = Q.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64, 1)
    err = (w - Q.dequantize(q, scale, torch.float32)).abs().amax(dim=1, keepdim=True)
    assert torch.all(err <= scale / 2 + 1e-7)
    assert q.abs().amax(dim=1).eq(127).all()  # each row uses its whole range


def test_quantize_fp8_is_within_a_rounding_of_each_value():
    w = torch.randn(64, 96) * torch.linspace(0.01, 3.0, 64)[:, None]
    q, scale = Q.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    err = (w - Q.dequantize(q, scale, torch.float32)).abs()
    # e4m3: 3 stored significand bits, so half a step is 1/16 of a normal value; subnormals step by 2^-9.
    assert torch.all(err <= w.abs() / 16 + scale * 2.0 ** -10 + 1e-7)
    assert q.float().abs().amax(dim=1).eq(Q.FP8_MAX).all()  # each row uses its whole range
    huge = torch.tensor([[3e38, -3e38, 1.0]])  # a quotient past 448 would cast to NaN
    assert not Q.quantize_fp8(huge)[0].float().isnan().any()


def fp8_reference(x: torch.Tensor, layer: Q.QuantizedLinear) -> torch.Tensor:
    """Per-token float8 activations times float8 weights, both dequantized, in float64."""
    xq, xscale = Q.quantize_fp8(x)
    w = layer.qweight.double() * layer.scale.double()[:, None]
    return ((xq.double() * xscale.double()) @ w.t()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 200])
def test_fp8_linear_takes_scaled_mm_and_matches_its_quantized_numbers(rows, dtype, monkeypatch):
    if Q.scaled_mm_out_dtype(torch.device("cpu"), dtype) is None:  # seen on a GPU box's host CPU
        pytest.skip("this CPU's torch._scaled_mm is missing or differs from the float reference")
    torch.manual_seed(rows)
    w, b = torch.randn(48, 64).to(dtype), torch.randn(48).to(dtype)
    x = (torch.randn(rows, 64) * torch.logspace(-2, 2, rows)[:, None]).to(dtype)  # tokens of very different ranges
    layer = Q.QuantizedLinear(w, b, "fp8")
    assert layer.qweight.dtype == torch.float8_e4m3fn
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(k["out_dtype"]) or real(*a, **k))
    got, want = layer(x), fp8_reference(x, layer) + b
    assert calls == [dtype] and got.dtype == dtype and got.shape == (rows, 48)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # float32 accumulation in both; bf16 rounds the output
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * x.abs().amax().item())
    assert torch.allclose((Q._portable_fp8_matmul(x, layer) + b).float(), want.float(), rtol=tol,
                          atol=tol * x.abs().amax().item())
    # Within float8's rounding of the unquantized product: each factor of each product is off by at most 1/16
    # of itself (subnormals and bf16's own rounding add a little).
    exact, bound = F.linear(x.double(), w.double(), b.double()), x.double().abs() @ w.double().abs().t()
    assert torch.all((got.double() - exact).abs() <= bound / 8 + 1e-2 * exact.abs() + 1e-3)


def test_fp8_layers_scaled_mm_cannot_take_keep_the_portable_matmul(monkeypatch):
    """Inner or output sizes off 16 (cuBLASLt's fp8 alignment), or a device whose _scaled_mm is missing or
    differs: the same numbers through the portable float matmul."""
    torch.manual_seed(3)
    x = torch.randn(4, 40)
    odd = Q.QuantizedLinear(torch.randn(48, 40), None, "fp8")
    assert odd.matmul is Q._portable_fp8_matmul
    assert torch.allclose(odd(x), fp8_reference(x, odd), atol=1e-5)
    Q.scaled_mm_out_dtype.cache_clear()
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no fp8 here")))
    try:
        assert Q.QuantizedLinear(torch.randn(48, 64), None, "fp8").matmul is Q._portable_fp8_matmul
    finally:
        Q.scaled_mm_out_dtype.cache_clear()


def triton_device() -> str:
    """CUDA with Triton; on CPU Triton's interpreter (conftest sets TRITON_INTERPRET=1 there)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU: run with TRITON_INTERPRET=1 to check the kernel in Triton's interpreter")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("quantize, largest", [(Q.quantize_fp8, 448.0), (Q.quantize_int8, 127.0)])
def test_scales_are_correctly_rounded_quotients_on_every_device(quantize, largest, device):
    """absmax / largest rounded once, as the Triton kernels divide: not CUDA's multiplication by a scalar's
    reciprocal (on an H200 the kernel's scales differed from such a reference in the last bit)."""
    x = torch.rand(4000, 8, generator=torch.Generator().manual_seed(0)) * torch.logspace(-6, 6, 4000)[:, None]
    _, scale = quantize(x.to(device))
    want = (x.double().abs().amax(-1, keepdim=True) / largest).float()
    assert torch.equal(scale.cpu(), want)


@pytest.mark.parametrize("method", ["fp8", "w8a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 576, 4096 + 576])
def test_quantization_kernel_gives_the_pytorch_quantizers_numbers(n, dtype, method):
    """The Triton kernel fp8 and w8a8 layers quantize with on CUDA: quantize_fp8's / quantize_int8's scales and
    bits, rows of every range (subnormal results, ties, zeros, an all-zero row), narrower and wider than its
    block, strided."""
    from engine import triton_quant
    dev = triton_device()
    reference, kernel, qdtype = ((Q.quantize_fp8, triton_quant.quantize_fp8_rows, torch.float8_e4m3fn)
                                 if method == "fp8" else (Q.quantize_int8, triton_quant.quantize_int8_rows, torch.int8))
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(9, n + 8, generator=gen) * torch.logspace(-4, 4, 9)[:, None]
    x[0, :5] = torch.tensor([0.0, 1e-30, -1e-30, 3e-4, -2e-5])
    x[1] = 0.0
    x[2, :4] = torch.tensor([254.0, 1.0, -1.0, 3.0])  # scale 2: quotients 127, 0.5, -0.5, 1.5 (ties to even)
    x[2, 4:n] = 0.0
    x = x.to(dev, dtype)[:, :n]  # rows apart by more than their width, as a packed projection's views are
    (q, scale), (want_q, want_scale) = kernel(x), reference(x)
    assert q.dtype == qdtype and scale.shape == (9, 1)
    assert torch.equal(scale, want_scale)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    assert kernel(x[:0])[0].shape == (0, n)
    assert triton_quant.checks_out(torch.device(dev), qdtype)


@pytest.mark.parametrize("method", ["fp8", "w8a8"])
def test_layer_on_the_quantization_kernel_computes_the_same_numbers(method):
    from engine import triton_quant
    dev = triton_device()
    torch.manual_seed(4)
    layer = Q.QuantizedLinear(torch.randn(48, 64, device=dev), torch.randn(48, device=dev), method)
    x = torch.randn(5, 64, device=dev) * torch.logspace(-2, 2, 5, device=dev)[:, None]
    if method == "w8a8":  # the GPU's path: torch._int_mm padded past 16 rows
        layer.matmul = Q._gpu_w8a8_matmul
    layer.quantize_activations = Q.quantize_int8 if method == "w8a8" else Q.quantize_fp8
    want = layer(x)
    layer.quantize_activations = triton_quant.quantize_int8_rows if method == "w8a8" else triton_quant.quantize_fp8_rows
    assert torch.equal(layer(x), want)


def test_padded_int_mm_is_exact_for_any_row_count(monkeypatch):
    """CUDA's int8 GEMM takes more than 16 rows (torch checks it there; here a stand-in does): the padded call
    gives every row count the exact products."""
    real = torch._int_mm

    def cuda_int_mm(a, b):
        assert a.shape[0] > 16, "torch._int_mm on CUDA takes more than 16 rows"
        return real(a, b)
    monkeypatch.setattr(torch, "_int_mm", cuda_int_mm)
    torch.manual_seed(5)
    w = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
    for rows in (1, 16, 17, 40):
        x = torch.randint(-127, 128, (rows, 64), dtype=torch.int8)
        assert torch.equal(Q._padded_int_mm(x, w.t()), (x.double() @ w.t().double()).int())
    assert Q.int_mm_checks_out(torch.device("cpu"))


@pytest.mark.parametrize("rows", [1, 3, Q.CPU_INT8_KERNEL_MAX_ROWS, Q.CPU_INT8_KERNEL_MAX_ROWS + 1, 200])
def test_int8_linear_matches_its_dequantized_weights_on_cpu(rows, monkeypatch):
    torch.manual_seed(rows)
    w, b, x = torch.randn(48, 80), torch.randn(48), torch.randn(rows, 80)
    layer = Q.QuantizedLinear(w, b)
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


@pytest.mark.parametrize("out_features, in_features", [(40, 96), (100, 64), (32, 32)])
def test_the_amx_kernel_gives_the_float_product_of_int8_and_int4_weights(out_features, in_features):
    """Quantized weights x bf16 rows by AMX tiles (engine.cpu_amx_matmul): a partial block of channels, one tile of
    inputs or several, 1 to 33 rows (one tile of rows, one more), strided rows; one bf16 rounding from the exact
    product of int8 weights (times their scales) and of int4's dequantized bf16 weights."""
    require_amx_kernel(cpu_amx_matmul.library())
    assert cpu_amx_matmul.checks_out()
    gen = torch.Generator().manual_seed(out_features)
    q = torch.randint(-128, 128, (out_features, in_features), generator=gen, dtype=torch.int8)
    scale = torch.rand(out_features, generator=gen) / 64
    codes, groups = I4.quantize_int4(torch.randn(out_features, in_features, generator=gen))
    codes = I4.pack_codes(codes)
    int4_weights = I4.dequantize_int4(codes, groups, torch.bfloat16).double()
    for rows in (1, 5, 16, 17, 33):
        x = torch.randn(rows, in_features + 32, generator=gen).bfloat16()[:, 16:16 + in_features]
        want = (x.double() @ q.double().t()) * scale.double()
        torch.testing.assert_close(cpu_amx_matmul.int8_matmul(x, q, scale).double(), want, rtol=2 ** -8, atol=1e-6)
        want = x.double() @ int4_weights.t()
        torch.testing.assert_close(cpu_amx_matmul.int4_matmul(x, codes, groups).double(), want, rtol=2 ** -8,
                                   atol=1e-6)


def test_bf16_int8_layers_on_amx_take_torchs_kernel_then_the_amx_one_then_the_dequantized_product(monkeypatch):
    require_amx_kernel(cpu_amx_matmul.library())
    torch.manual_seed(0)
    w, b = torch.randn(48, 64).bfloat16(), torch.randn(48).bfloat16()
    layer = Q.QuantizedLinear(w, b)
    calls = []
    torch_kernel, amx_kernel = torch._weight_int8pack_mm, cpu_amx_matmul.int8_matmul
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append("torch") or torch_kernel(*a))
    monkeypatch.setattr(cpu_amx_matmul, "int8_matmul", lambda *a: calls.append("amx") or amx_kernel(*a))
    small, large = Q.CPU_AMX_INT8_ROWS
    for rows, path in ((1, "torch"), (small, "torch"), (small + 1, "amx"), (large, "amx"), (large + 1, None)):
        calls.clear()
        x = torch.randn(rows, 64).bfloat16()
        got = layer(x)
        assert calls == ([path] if path else []) and got.dtype == torch.bfloat16 and got.shape == (rows, 48)
        want = F.linear(x.float(), layer.weight.float(), b.float())  # got: the product rounded, then the bias added
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=1e-1)


def test_by_row_count_takes_the_kernel_of_the_first_limit_not_exceeded_eager_and_compiled():
    from engine.row_count_branch import by_row_count
    kernels = tuple((lambda rows, k=k: rows.sum(-1) * 0 + k) for k in range(3))

    def branch(rows: torch.Tensor) -> torch.Tensor:
        return by_row_count((4, 16), kernels, rows)
    compiled = torch.compile(branch, dynamic=True)
    for count, kernel in ((1, 0), (4, 0), (5, 1), (16, 1), (17, 2), (40, 2)):
        rows = torch.randn(count, 8)
        assert branch(rows).tolist() == [kernel] * count == compiled(rows).tolist()


def test_portable_int8_matmul_matches_dequantized_weights():
    torch.manual_seed(0)
    w, x = torch.randn(32, 40), torch.randn(5, 40)
    layer = Q.QuantizedLinear(w, None)
    assert torch.allclose(Q._portable_matmul(x, layer), F.linear(x, layer.weight), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_c_dequantizing_pass_gives_the_ops_weights(dtype):
    """engine.cpu_int4 (every prefill step of an int4 model on the CPU): bf16 bit for bit PyTorch's two roundings,
    float32 to an ulp; rows of several groups, scales given in bf16 as the kernel's are."""
    require_c_kernels(cpu_int4.library())
    assert cpu_int4.checks_out(I4.GROUP_SIZE)
    q, scales = I4.quantize_int4(torch.randn(48, 6 * I4.GROUP_SIZE, generator=torch.Generator().manual_seed(1)) * 3)
    codes, scales = I4.pack_codes(q), scales.to(torch.bfloat16)
    got = cpu_int4.dequantize(codes, scales, dtype)
    want = I4.dequantize_int4_by_ops(codes, scales, dtype)
    tol = 0.0 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(I4.dequantize_int4(codes, scales, dtype), got, atol=0, rtol=0)  # the path taken


def test_quantize_int4_is_within_half_a_step_per_group():
    w = torch.randn(16, 4 * I4.GROUP_SIZE) * torch.linspace(0.01, 3.0, 4 * I4.GROUP_SIZE)  # groups of different ranges
    w[3, :I4.GROUP_SIZE] = 0.5  # a constant group
    q, scales = I4.quantize_int4(w)
    assert q.dtype == torch.uint8 and q.max() <= 15 and scales.shape == (16, 4, 2)
    back = I4.dequantize_int4(I4.pack_codes(q), scales, torch.float32)
    groups = lambda t: t.view(16, 4, I4.GROUP_SIZE)  # noqa: E731
    assert torch.all(groups(w - back).abs() <= scales[..., :1] / 2 + 1e-6)
    varied = groups(w).amax(-1) > groups(w).amin(-1)
    # Each varied group spans its whole range: its minimum and maximum come back (to float rounding).
    assert groups(q).amin(-1)[varied].eq(0).all() and groups(q).amax(-1)[varied].eq(15).all()
    assert torch.equal(back[3, :I4.GROUP_SIZE], w[3, :I4.GROUP_SIZE])


def test_int4_gives_a_q4_1_grid_back():
    """Weights dequantized from a Q4_1 GGUF (d * q + m per block of 32, both ends used) quantize to their own
    codes and scales: the engine serves llama.cpp's own 4-bit weights."""
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (8, 2, I4.GROUP_SIZE))
    codes[..., 0], codes[..., 1] = 0, 15
    d, m = torch.rand(8, 2, 1) * 0.1 + 1e-3, torch.randn(8, 2, 1)
    w = (d * codes + m).view(8, -1)
    q, scales = I4.quantize_int4(w)
    assert torch.equal(q.view(8, 2, -1), codes.to(torch.uint8))
    assert torch.allclose(scales[..., :1], d, rtol=1e-5) and torch.allclose(scales[..., 1:], m + 8 * d, rtol=1e-5)


def test_int4_refuses_inputs_outside_its_groups():
    with pytest.raises(ValueError, match="int4 needs input sizes in multiples of 32, got a layer of 40"):
        I4.Int4Linear(torch.randn(16, 40), None)


@pytest.mark.parametrize("rows", [1, 3, I4.CPU_INT4_KERNEL_MAX_ROWS, I4.CPU_INT4_KERNEL_MAX_ROWS + 1, 200, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_matches_its_dequantized_weights_on_cpu(rows, dtype, monkeypatch):
    """Up to the row limit torch's int4 kernel (bf16 activations), above it one matmul on the dequantized
    weights (bf16 with AMX: the AMX kernel up to its limit, on the same weights); 40 outputs, padded to the kernel's
    multiple of 16 and cut back."""
    assert I4.cpu_kernel_checks_out()
    torch.manual_seed(rows)
    w, b, x = torch.randn(40, 96).to(dtype), torch.randn(40).to(dtype), torch.randn(rows, 96).to(dtype)
    layer = I4.Int4Linear(w, b)
    assert layer.on_kernel and not layer.emulated and layer.packed.shape[0] == 48
    kernel_calls = []
    real = torch.ops.aten._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", lambda *a: kernel_calls.append(1) or real(*a))
    got = layer(x)
    want = F.linear(x.float(), layer.weight.float(), b.float())
    assert got.dtype == dtype and got.shape == (rows, 40)
    limit = I4.CPU_INT4_AMX_ROWS[0] if layer.amx else I4.CPU_INT4_KERNEL_MAX_ROWS
    assert layer.amx == (dtype == torch.bfloat16 and cpu_amx_matmul.library() is not None)
    if rows <= limit or dtype == torch.bfloat16:  # bf16 activations or products
        assert bool(kernel_calls) == (rows <= limit)
        assert torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    else:
        assert not kernel_calls and torch.allclose(got, want, atol=1e-4)
    # Within a step of each group's scale of the unquantized product.
    assert torch.allclose(got.float(), F.linear(x.float(), w.float(), b.float()), rtol=0.1,
                          atol=0.1 * want.abs().max().item())


def test_int4_without_the_cpu_kernel_dequantizes_every_call(monkeypatch):
    monkeypatch.setattr(I4, "cpu_kernel_checks_out", lambda: False)
    torch.manual_seed(0)
    layer, x = I4.Int4Linear(torch.randn(24, 64), None), torch.randn(3, 64)
    assert layer.emulated and not hasattr(layer, "packed")
    assert torch.allclose(layer(x), F.linear(x, layer.weight), atol=1e-5)


def w8a8_reference(x: torch.Tensor, layer: Q.QuantizedLinear) -> torch.Tensor:
    """Exact integer arithmetic in float64: per-token int8 activations times int8 weights, then both scales."""
    xq, xscale = Q.quantize_int8(x)
    return ((xq.double() @ layer.qweight.double().t()) * layer.scale.double() * xscale.double()).float()


@pytest.mark.parametrize("rows, in_features", [(1, 80), (3, 37), (200, 64), (1, 128), (33, 192)])
def test_w8a8_linear_is_exact_integer_arithmetic_on_both_paths(rows, in_features, monkeypatch):
    torch.manual_seed(rows)
    w, b = torch.randn(48, in_features), torch.randn(48)
    x = torch.randn(rows, in_features) * torch.logspace(-2, 2, rows)[:, None]  # tokens of very different ranges
    layer = Q.QuantizedLinear(w, b, "w8a8")
    kernel_calls = []
    real, amx = torch._int_mm, cpu_amx_matmul.w8a8_matmul
    monkeypatch.setattr(torch, "_int_mm", lambda *a: kernel_calls.append("torch") or real(*a))
    monkeypatch.setattr(cpu_amx_matmul, "w8a8_matmul", lambda *a: kernel_calls.append("amx") or amx(*a))
    want = w8a8_reference(x, layer) + b
    got = layer(x)
    on_amx = in_features % 64 == 0 and cpu_amx_matmul.library() is not None  # AMX-INT8 tiles, else torch._int_mm
    assert kernel_calls == ["amx" if on_amx else "torch"] and got.dtype == x.dtype and got.shape == (rows, 48)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(Q._portable_w8a8_matmul(x, layer) + b, want, rtol=1e-5, atol=1e-5)
    if on_amx:  # the same numbers as torch._int_mm's path, bit for bit
        assert torch.equal(Q._cpu_amx_w8a8_matmul(x, layer), Q._cpu_w8a8_matmul(x, layer))
    # Within a step of its own scale of the unquantized product.
    assert torch.allclose(got, F.linear(x, w, b), rtol=0.1, atol=0.05 * x.abs().amax().item())


@pytest.mark.parametrize("method", ["w8a8", "fp8"])
def test_quantized_activations_scale_each_token_alone(method):
    """A token's result does not depend on the other tokens of the step (an outlier token would
    otherwise cost every other token its precision), so a packed batch equals its rows one by one: bit for bit
    through int32 sums; fp8's float32 sums may be ordered differently for one row than for six."""
    torch.manual_seed(1)
    layer = Q.QuantizedLinear(torch.randn(32, 32), None, method)
    x = torch.randn(6, 32)
    x[2] *= 1000
    together, alone = layer(x), torch.cat([layer(x[i:i + 1]) for i in range(6)])
    assert torch.equal(together, alone) if method == "w8a8" else torch.allclose(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, dtype", [*((m, torch.float32) for m in Q.QUANTIZATION_METHODS),
                                           ("int8", torch.bfloat16), ("int4", torch.bfloat16)])
def test_compiled_quantized_layers_compute_the_same_numbers(method, dtype):
    """torch_compile compiles these layers inside the decode graph, and w8a8's alone for prefill-sized
    inputs: the activations' scales and quantized values, and the rescaled product, stay bit for bit eager's
    (int8 in bf16 on each of its three branches on the row count where the CPU has AMX)."""
    torch.manual_seed(2)
    layer = Q.quantized_linear(torch.randn(48, 64).to(dtype), torch.randn(48).to(dtype), method)
    inputs = [(torch.randn(rows, 64) * torch.logspace(-2, 2, rows)[:, None]).to(dtype)
              for rows in (1, 5, 3 * max(Q.CPU_INT8_KERNEL_MAX_ROWS, I4.CPU_INT4_KERNEL_MAX_ROWS), 600)]
    eager = [layer(x) for x in inputs]
    in_a_graph = torch.compile(layer.forward, dynamic=True)
    assert all(torch.equal(in_a_graph(x), want) for x, want in zip(inputs[:2], eager))
    Q.compile_quantized_layers(layer)
    with torch.inference_mode():
        assert all(torch.equal(layer(x), want) for x, want in zip(inputs, eager))


def test_quantization_is_checked():
    with pytest.raises(ValueError, match="quantization must be one of int8, int4, w8a8, fp8"):
        EngineConfig(model="m", quantization="nf4")


def test_quantization_of_an_encoder_is_refused(tiny_model):
    with pytest.raises(ValueError, match="quantization applies to decoder models"):
        LLM(tiny_model("bert"), dtype="float32", quantization="int8")


def dequantized_reference(model_dir: str, method: str):
    """Hugging Face on the engine's quantized weights, dequantized to fp32 (a tied head gets its own copy,
    as in the engine; the input embeddings stay exact); for w8a8 and fp8 every such layer's input is
    quantized per token and dequantized too."""
    hf = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    quantize = Q.quantize_fp8 if method == "fp8" else Q.quantize_int8
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if isinstance(mod, torch.nn.Linear) and (".layers." in name or name == "lm_head"):
                # The layer's own dequantized weights (int4: its scales rounded as its kernel takes them).
                dequantized = Q.quantized_linear(mod.weight, None, method, name == "lm_head").weight.float()
                mod.weight = torch.nn.Parameter(dequantized)
                if method in ("w8a8", "fp8"):
                    mod.register_forward_pre_hook(lambda _, args: (Q.dequantize(*quantize(args[0]), torch.float32),))
    return hf


def beside_hf(hf, out) -> list[tuple[int, float, torch.Tensor]]:
    """(token, the engine's logprob of it, Hugging Face's logits where it was chosen) for each generated token of
    a generation output (logprobs=1), Hugging Face running the prompt and the tokens teacher-forced."""
    c = out.outputs[0]
    with torch.no_grad():
        logits = hf(torch.tensor([out.prompt_token_ids + c.token_ids])).logits[0]
    start = len(out.prompt_token_ids) - 1
    return [(tok, entry[tok].logprob, logits[start + k]) for k, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs))]


@pytest.mark.parametrize("arch, method", [(arch, method) for method in Q.QUANTIZATION_METHODS
                                          for arch in ("llama", "qwen3")])
def test_quantized_generation_follows_hf_on_the_dequantized_weights(arch, method, tiny_model):
    model_dir = tiny_model(arch)
    llm = LLM(model_dir, dtype="float32", block_size=8, quantization=method)
    hf = dequantized_reference(model_dir, method)
    prompts = [sentence(500 + i, n) for i, n in enumerate((5, 30))]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, logprobs=1, ignore_eos=True))
    # int8 (the CPU's int8 x bf16 kernel) and fp8 on CUDA (its row-wise _scaled_mm writes only bf16) carry bf16
    # activations (logprob errors seen up to 0.09 and 0.16 (H200), logits of std ~1.6: a bf16-rounded input
    # may take the next float8 code), so a token may differ from HF's only at a near-tie. w8a8 is the same
    # integer arithmetic as its reference, fp8 elsewhere the same float8 products: only float rounding differs
    # (seen 2e-6).
    fp8_bf16_rows = method == "fp8" and llm.engine.runner.device.type == "cuda"
    tol = 0.25 if fp8_bf16_rows else 0.15 if method in ("int8", "int4") else 1e-4
    for out in outs:
        for k, (tok, logprob, row) in enumerate(beside_hf(hf, out)):
            assert row.max() - row[tok] < tol, f"step {k}: token {tok} is not HF's near-top"
            assert abs(logprob - row.log_softmax(-1)[tok].item()) < tol
    assert_pool_free(llm)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_bf16_quantized_generation_on_amx_tiles_as_on_the_dequantized_product(method, tiny_model, monkeypatch):
    """A bf16 engine whose int8 / int4 layers take the AMX kernel for its prefill rows (30 tokens; torch's kernel for
    its decodes) generates what the same engine does with the dequantized product there: the same tokens, their
    logprobs within bf16's rounding."""
    require_amx_kernel(cpu_amx_matmul.library())
    calls = []
    for name in ("int8_matmul", "int4_matmul"):
        kernel = getattr(cpu_amx_matmul, name)
        monkeypatch.setattr(cpu_amx_matmul, name, lambda *a, kernel=kernel: calls.append(a[0].shape[0]) or kernel(*a))
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=1, ignore_eos=True)
    prompt = [sentence(700, 30)]
    llm = LLM(tiny_model("llama"), dtype="bfloat16", block_size=8, quantization=method,
              enable_prefix_caching=False)  # both runs compute the whole prompt
    calls.clear()  # the start-up checks'
    amx = llm.generate(prompt, params)[0].outputs[0]
    assert calls and min(calls) > Q.CPU_AMX_INT8_ROWS[0]  # the prefill's products (the logits head: one row)
    monkeypatch.setattr(Q, "CPU_AMX_INT8_ROWS", (4, 0))  # every row count above torch's kernel: dequantized
    monkeypatch.setattr(I4, "CPU_INT4_AMX_ROWS", (8, 0))
    calls.clear()
    dequantized = llm.generate(prompt, params)[0].outputs[0]
    assert not calls and amx.token_ids == dequantized.token_ids
    for a, d, tok in zip(amx.logprobs, dequantized.logprobs, amx.token_ids):
        assert abs(a[tok].logprob - d[tok].logprob) < 0.05
    assert_pool_free(llm)


@pytest.mark.parametrize("method", Q.QUANTIZATION_METHODS)
def test_quantized_yes_no_reranker_matches_hf_on_the_dequantized_weights(method, tiny_model):
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
    if method == "int4":
        assert isinstance(down_proj, I4.Int4Linear) and down_proj.codes.dtype == torch.uint8
    else:
        assert down_proj.qweight.dtype == (torch.float8_e4m3fn if method == "fp8" else torch.int8)
        assert down_proj.matmul is Q.select_matmul(down_proj)
    assert_pool_free(llm)


@pytest.mark.parametrize("method, warns", [("int8", False), ("int4", False), ("w8a8", False), ("fp8", True)])
def test_an_emulated_quantization_is_announced(method, warns, tiny_model, caplog):
    """On a CPU int8, int4 and w8a8 have their kernels; fp8 has none (no fp8 units): the engine says so. On a GPU
    int8 and int4 have none (fp8 has on Ada / Hopper, w8a8 from Ampere on)."""
    with caplog.at_level("WARNING", logger="engine.quantization"):
        llm = LLM(tiny_model("llama"), dtype="float32", quantization=method)
    if llm.engine.runner.device.type == "cuda":
        fast_from = {"w8a8": (8, 0), "fp8": (8, 9)}
        warns = method in ("int8", "int4") or torch.cuda.get_device_capability() < fast_from[method]
    assert ("runs emulated" in caplog.text) == warns
