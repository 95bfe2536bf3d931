"""Quantization of a decoder's linear layers: one symmetric scale per output channel, or per group for int4.

Four methods:
- "int8" (weight-only, W8A16): activations stay in the serving dtype. At small batches a decode step is
  bound by reading the weights, and int8 reads a quarter of fp32's bytes.
- "int4" (weight-only, W4A16, engine.int4_linear): 4-bit codes with a scale and zero point per 32 input
  channels (llama.cpp's Q4_1), a quarter of bf16's bytes: the fastest small-batch decode on a CPU. The logits
  head takes int8.
- "w8a8": int8 weights and int8 activations with one dynamic scale per token (vLLM's W8A8-INT8 scheme;
  llama.cpp quantizes activations to 8 bits for its quantized dot products too). Every matmul is
  int8 x int8 with int32 accumulation, which CPUs with VNNI run several times faster than fp32 at
  every batch size, prefill included; it costs some accuracy (README: perplexity and top-1 agreement).
- "fp8": float8 (e4m3) weights and float8 activations with one dynamic scale per token (vLLM's dynamic
  FP8 W8A8): torch._scaled_mm with row-wise scales, float32 accumulation. Hopper and Ada GPUs run it on
  their fp8 tensor cores at twice the bf16 rate, with half the weight bytes; CPUs have the same op (oneDNN),
  slower than bf16 there.
Attention and norms keep the serving dtype in all four (the KV cache too, unless kv_cache_dtype says
otherwise). The matmul kernel is picked here, once per device and method: on CPU, torch's int8 kernels;
w8a8 on a GPU, torch._int_mm (cuBLASLt's int8 GEMM, the int8 tensor cores of Ampere and later); for fp8,
torch._scaled_mm; each where one call on the device matched its reference at start-up; elsewhere (and
weight-only int8 on a GPU) a portable float matmul of the same quantized numbers (correct, not faster)."""
import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from engine import cpu_amx_matmul
from engine.int4_linear import Int4Linear
from engine.opaque_op import opaque_op
from engine.row_count_branch import by_row_count

log = logging.getLogger(__name__)

QUANTIZATION_METHODS = ("int8", "int4", "w8a8", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# torch._scaled_mm takes inner and output dimensions in multiples of 16 (cuBLASLt's fp8 alignment); a layer of
# other shapes keeps the portable matmul.
FP8_ALIGNMENT = 16
INT_MM_PADDING = 16  # zero rows added to every GPU torch._int_mm call (_padded_int_mm)
# torch._int_mm on CUDA takes inner and output sizes in multiples of 8; other layers keep the portable matmul.
INT_MM_ALIGNMENT = 8
# Rows up to which the CPU int8 x bf16 kernel beats dequantize + fp32 matmul (2 threads, SmolLM2's shapes:
# the kernel wins up to 64 rows for every projection and the logits head, they tie at 128; README).
CPU_INT8_KERNEL_MAX_ROWS = 64
# bf16 layers on a CPU with AMX (engine.cpu_amx_matmul): torch's kernel up to 4 rows, the AMX kernel up to 512, the
# dequantized product above (2-core AMX Xeon, SmolLM2's shapes: torch's kernel 1.1-2.3x faster at 1-4 rows, the AMX
# one 1.1-1.9x at 8 and 5-10x at 32-128; it ties the dequantized product at ~1,024 rows, 0.3-0.8x at 2,048-8,192).
CPU_AMX_INT8_ROWS = (4, 512)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows and float32 per-row scales [rows, 1] with x ~= q * scale, rounded to nearest.
    Used for weights once and for activations on every w8a8 matmul, so it is kept to a few ops."""
    x = x.float()
    scale = _row_scales(x, 127)
    return torch.div(x, scale).round_().to(torch.int8), scale


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 e4m3 rows and float32 per-row scales [rows, 1] with x ~= q * scale (the cast rounds to nearest)."""
    x = x.float()
    scale = _row_scales(x, FP8_MAX)
    # e4m3fn has no infinity: a quotient rounded a step above the largest value would cast to NaN.
    return torch.div(x, scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def _row_scales(x: torch.Tensor, largest: float) -> torch.Tensor:
    # abs().amax(): torch's inf-norm kernel is 5-10x slower at 32+ rows (measured). Divided by a tensor, correctly
    # rounded on every device as the Triton kernels divide (div_rn; an FP8 checkpoint's per-channel scales then
    # come back exactly): CUDA divides by a Python number as a multiplication by its float32 reciprocal (a bit
    # apart for 55% of scales at 448). No slower on CPU (7.2 against 7.5 us a decode row, measured).
    amax = x.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-12)
    return amax.div_(torch.full_like(amax, largest))


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scale: [rows, 1], as quantize_int8 / quantize_fp8 return it."""
    if q.dtype == FP8:  # float8 takes part in no type promotion
        q = q.to(dtype)
    return q * scale.to(dtype)  # int8 * float promotes to the float dtype in the same pass


def _portable_matmul(x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
    return F.linear(x, layer.qweight.to(x.dtype)) * layer.scale.to(x.dtype)


def _dequantized_mm(rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    scale_bf16: torch.Tensor) -> torch.Tensor:
    return F.linear(rows, dequantize(qweight, scale[:, None], rows.dtype))


def _int8_kernel_mm(rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    scale_bf16: torch.Tensor) -> torch.Tensor:
    # The kernel's int8 x bf16 path is the fast one even without bf16 hardware; its fp32 path is not.
    return torch._weight_int8pack_mm(rows.to(torch.bfloat16), qweight, scale_bf16).to(rows.dtype)


def _amx_int8_mm(rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                 scale_bf16: torch.Tensor) -> torch.Tensor:
    return cpu_amx_matmul.int8_matmul(rows, qweight, scale)


def _by_rows(x: torch.Tensor, layer: "QuantizedLinear", limits: tuple[int, ...], kernels: tuple) -> torch.Tensor:
    out = by_row_count(limits, kernels, x.reshape(-1, x.shape[-1]), layer.qweight, layer.scale, layer.scale_bf16)
    return out.view(*x.shape[:-1], -1)


def _cpu_matmul(x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
    return _by_rows(x, layer, (CPU_INT8_KERNEL_MAX_ROWS,), (_int8_kernel_mm, _dequantized_mm))


def _cpu_amx_matmul(x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
    return _by_rows(x, layer, CPU_AMX_INT8_ROWS, (_int8_kernel_mm, _amx_int8_mm, _dequantized_mm))


def _int8_activations_product(rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                              int_mm, quantize=quantize_int8) -> torch.Tensor:
    xq, xscale = quantize(rows)
    # Convert first, then scale in place: int32 * float32 promotes element by element, 1.5-4x slower.
    return int_mm(xq, qweight.t()).float().mul_(scale).mul_(xscale)


# The same function compiled (engine option torch_compile): quantizing and rescaling become one pass each
# instead of seven; 1.1-2.9x faster per SmolLM2 projection at 4,096 rows (the matmul's share varies).
_fused_int8_activations_product = torch.compile(_int8_activations_product, dynamic=True)


def _int8_activations_matmul(x: torch.Tensor, layer: "QuantizedLinear", int_mm,
                             product=_int8_activations_product, quantize=quantize_int8) -> torch.Tensor:
    out = product(x.reshape(-1, x.shape[-1]), layer.qweight, layer.scale, int_mm, quantize)
    return out.to(x.dtype).view(*x.shape[:-1], -1)


def _float_int_mm(xq: torch.Tensor, qweight_t: torch.Tensor) -> torch.Tensor:
    # int8 values are exact in float32, and so are their sums below 2^24 (|sum| <= 127^2 x in_features).
    return xq.float() @ qweight_t.float()


def _cpu_w8a8_matmul(x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
    return _int8_activations_matmul(x, layer, torch._int_mm)


def _cpu_amx_w8a8_matmul(x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
    # The rows quantized and multiplied by AMX-INT8 tiles in one C call: _cpu_w8a8_matmul's numbers bit for bit.
    out = cpu_amx_matmul.w8a8_matmul(x.reshape(-1, x.shape[-1]), layer.qweight, layer.scale)
    return out.to(x.dtype).view(*x.shape[:-1], -1)


def _cpu_fused_w8a8_matmul(x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
    # A compiled decode graph fuses the eager form itself; a small eager step would pay more for the
    # compiled call (guards, wrapper) than it saves.
    if torch.compiler.is_compiling() or x.shape[:-1].numel() <= CPU_INT8_KERNEL_MAX_ROWS:
        return _cpu_w8a8_matmul(x, layer)
    return _int8_activations_matmul(x, layer, torch._int_mm, _fused_int8_activations_product)


def _portable_w8a8_matmul(x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
    return _int8_activations_matmul(x, layer, _float_int_mm)


def _padded_int_mm(xq: torch.Tensor, qweight_t: torch.Tensor) -> torch.Tensor:
    # cuBLASLt's int8 GEMM (torch._int_mm on CUDA) takes more than 16 rows: every call gets 16 zero rows more,
    # so a decode of one runs too, and a compiled graph holds no branch on the row count.
    return torch._int_mm(F.pad(xq, (0, 0, 0, INT_MM_PADDING)), qweight_t)[:xq.shape[0]]


def _gpu_w8a8_matmul(x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
    # A compiled model fuses quantize_int8's ops itself.
    quantize = quantize_int8 if torch.compiler.is_compiling() else layer.quantize_activations
    return _int8_activations_matmul(x, layer, _padded_int_mm, quantize=quantize)


@functools.cache
def int_mm_checks_out(device: torch.device) -> bool:
    """torch._int_mm gives exact int32 products of int8 matrices on this device (one row, a few, more than 32),
    checked once; False: the op is missing or refuses."""
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randint(-127, 128, (48, 64), generator=gen, device=device, dtype=torch.int8)
    try:
        for rows in (1, 5, 33):
            x = torch.randint(-127, 128, (rows, 64), generator=gen, device=device, dtype=torch.int8)
            if not torch.equal(_padded_int_mm(x, w.t()), (x.double() @ w.t().double()).int()):
                return False
    except Exception:  # noqa: BLE001 (no int8 GEMM on this device)
        return False
    return True


def _scaled_mm(xq: torch.Tensor, qweight: torch.Tensor, xscale: torch.Tensor, scale: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    return torch._scaled_mm(xq, qweight.t(), scale_a=xscale, scale_b=scale[None], out_dtype=out_dtype)


# In a compiled model the product is one opaque op: _scaled_mm's own shape checks would otherwise guard the
# graph on a single row (a decode of one, a prefill with one output row) and compile it again for more.
_scaled_mm_op = opaque_op("fp8_scaled_mm", _scaled_mm, lambda xq, qweight, xscale, scale, out_dtype:
                          xq.new_empty((xq.shape[0], qweight.shape[0]), dtype=out_dtype))


def _fp8_scaled_matmul(x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
    # A compiled model fuses quantize_fp8's ops itself.
    quantize = quantize_fp8 if torch.compiler.is_compiling() else layer.quantize_activations
    xq, xscale = quantize(x.reshape(-1, x.shape[-1]))
    out = _scaled_mm_op(xq, layer.qweight, xscale, layer.scale, layer.scaled_mm_out_dtype)
    return out.to(x.dtype).view(*x.shape[:-1], -1)


def _portable_fp8_matmul(x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
    # In float32, as _scaled_mm accumulates: products of two e4m3 values are exact there.
    xq, xscale = quantize_fp8(x.reshape(-1, x.shape[-1]))
    w = dequantize(layer.qweight, layer.scale[:, None], torch.float32)
    out = F.linear(dequantize(xq, xscale, torch.float32), w)
    return out.to(x.dtype).view(*x.shape[:-1], -1)


@functools.cache
def scaled_mm_out_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The output dtype torch._scaled_mm gives row-wise scaled fp8 products in on this device for a model
    serving in dtype: dtype itself, else bfloat16 (CUDA's row-wise kernels write only that), checked once
    against the float reference at batch sizes 1, 5 and 33; None: the op is missing, refuses or differs."""
    gen = torch.Generator(device=device).manual_seed(0)
    wq, wscale = quantize_fp8(torch.randn(48, 64, generator=gen, device=device))
    for out_dtype in dict.fromkeys((dtype, torch.bfloat16)):
        try:
            for rows in (1, 5, 33):
                xq, xscale = quantize_fp8(torch.randn(rows, 64, generator=gen, device=device))
                got = torch._scaled_mm(xq, wq.t(), scale_a=xscale, scale_b=wscale.view(1, -1), out_dtype=out_dtype)
                want = (xq.float() * xscale) @ (wq.float() * wscale).t()
                if got.dtype != out_dtype or not torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2):
                    break
            else:
                return out_dtype
        except Exception:  # noqa: BLE001 (no fp8 matmul on this device or for this dtype)
            continue
    return None


# The portable matmuls: correct everywhere, faster nowhere (quantize_decoder warns where a layer gets one).
EMULATED = (_portable_matmul, _portable_w8a8_matmul, _portable_fp8_matmul)


def select_matmul(layer: "QuantizedLinear", compiled: bool = False):
    """The one place that picks a quantized layer's kernel: by its method and device and, off the CPU, by
    whether torch._scaled_mm (fp8) or torch._int_mm (w8a8) takes the layer there (compiled: torch_compile)."""
    device = layer.qweight.device
    on_cpu = device.type == "cpu"
    if layer.method == "fp8":
        return _portable_fp8_matmul if layer.scaled_mm_out_dtype is None else _fp8_scaled_matmul
    if layer.method == "w8a8":
        if not on_cpu:
            return _gpu_w8a8_matmul if layer.int_mm else _portable_w8a8_matmul
        if layer.qweight.shape[1] % 64 == 0 and cpu_amx_matmul.checks_out():  # faster at every row count measured
            return _cpu_amx_w8a8_matmul
        return _cpu_fused_w8a8_matmul if compiled else _cpu_w8a8_matmul
    if not on_cpu:
        return _portable_matmul
    amx = layer.dtype == torch.bfloat16 and layer.qweight.shape[1] % 32 == 0 and cpu_amx_matmul.checks_out()
    return _cpu_amx_matmul if amx else _cpu_matmul


class QuantizedLinear(nn.Module):
    """A linear layer's weights quantized by `method` (QUANTIZATION_METHODS), one scale per output channel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, method: str = "int8"):
        super().__init__()
        q, scale = (quantize_fp8 if method == "fp8" else quantize_int8)(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.squeeze(1))  # [out_features]: scales the matmul's columns
        self.register_buffer("scale_bf16", self.scale.to(torch.bfloat16))  # the int8 x bf16 kernel's
        self.bias = bias
        self.dtype, self.method = weight.dtype, method
        # fp8: what torch._scaled_mm writes for this layer on its device (None: the op is not used).
        aligned = all(n % FP8_ALIGNMENT == 0 for n in weight.shape)
        self.scaled_mm_out_dtype = (scaled_mm_out_dtype(weight.device, weight.dtype) if method == "fp8" and aligned
                                    else None)
        # w8a8 off the CPU: whether torch._int_mm takes the layer on its device.
        self.int_mm = (method == "w8a8" and weight.device.type != "cpu" and int_mm_checks_out(weight.device)
                       and all(n % INT_MM_ALIGNMENT == 0 for n in weight.shape))
        if self.scaled_mm_out_dtype is not None or self.int_mm:
            from engine.kernels import select_activation_quantizer
            self.quantize_activations = select_activation_quantizer(weight.device, method)
        self.matmul = select_matmul(self)

    @property
    def emulated(self) -> bool:
        """The portable matmul: the quantized values converted back to floats every call."""
        return self.matmul in EMULATED

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weights: keeps DecoderModel.output_embeddings() meaning the same for a
        quantized untied head."""
        return dequantize(self.qweight, self.scale[:, None], self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x, self)
        return out if self.bias is None else out + self.bias


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None, method: str,
                     logits_head: bool = False) -> nn.Module:
    """A linear layer's weights quantized by `method` (QUANTIZATION_METHODS). int4 keeps a logits head in int8,
    as llama.cpp's 4-bit files keep it (SmolLM2's Q4_1 file: Q8_0); in 4 bits the head cost SmolLM2 +8% perplexity
    (README)."""
    if method == "int4":
        return QuantizedLinear(weight, bias, "int8") if logits_head else Int4Linear(weight, bias)
    return QuantizedLinear(weight, bias, method)


def quantize_decoder(model: nn.Module, method: str, logits_head: bool) -> None:
    """Replaces every projection of every layer, and the logits head of a generating model, by its
    quantized form in place. A tied logits head gets its own quantized copy; the input embedding table stays
    as it is (a lookup reads one row per token)."""
    if not getattr(model, "is_decoder", False):
        raise ValueError("quantization applies to decoder models (generation and yes/no reranking) only")
    for layer in model.layers:
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                             (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            linear = getattr(parent, name)
            setattr(parent, name, quantized_linear(linear.weight.data, linear.bias, method))
    if logits_head:
        model.lm_head = quantized_linear(model.output_embeddings().data, None, method, logits_head=True)
    layers = [m for m in model.modules() if isinstance(m, (QuantizedLinear, Int4Linear))]
    device = next(iter(layers[0].buffers())).device
    if any(layer.emulated for layer in layers) or (method == "fp8" and device.type == "cpu"):
        log.warning("quantization %s on %s runs emulated (the quantized values converted back to floats every "
                    "call), slower than the unquantized model; fast: int8, int4 and w8a8 on CPU, fp8 on Ada / Hopper "
                    "GPUs, w8a8 on Ampere and later", method, device)


@torch.inference_mode()  # as engine steps run: a graph compiled outside it would not serve them
def compile_quantized_layers(model: nn.Module) -> None:
    """Engine option torch_compile: every quantized layer switches to its compiled kernel where it has one,
    each distinct shape compiled now (one call with prefill-sized zeros) rather than on a request."""
    warmed = set()
    for layer in model.modules():
        if not isinstance(layer, QuantizedLinear):
            continue
        layer.matmul = select_matmul(layer, compiled=True)
        if layer.matmul is _cpu_fused_w8a8_matmul and layer.qweight.shape not in warmed:
            warmed.add(layer.qweight.shape)
            layer(torch.zeros(2 * CPU_INT8_KERNEL_MAX_ROWS, layer.qweight.shape[1], dtype=layer.dtype,
                              device=layer.qweight.device))
