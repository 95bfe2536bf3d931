"""int8 quantization of a decoder's linear layers: one symmetric scale per output channel.

Two methods:
- "int8" (weight-only, W8A16): activations stay in the serving dtype. At small batches a decode step is
  bound by reading the weights, and int8 reads a quarter of fp32's bytes.
- "w8a8": int8 weights and int8 activations with one dynamic scale per token (vLLM's W8A8-INT8 scheme;
  llama.cpp quantizes activations to 8 bits for its quantized dot products too). Every matmul is
  int8 x int8 with int32 accumulation, which CPUs with VNNI run several times faster than fp32 at
  every batch size, prefill included; it costs some accuracy (README: perplexity and top-1 agreement).
Attention, norms and the KV cache keep the serving dtype in both. The matmul kernel is picked here,
once per device and method: on CPU, torch's int8 kernels; elsewhere a portable float matmul of the
same integers (correct, not faster)."""
import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATION_METHODS = ("int8", "w8a8")
# Rows up to which the CPU int8 x bf16 kernel beats dequantize + fp32 matmul (2 threads, SmolLM2's shapes:
# the kernel wins up to 64 rows for every projection and the logits head, they tie at 128; README).
CPU_INT8_KERNEL_MAX_ROWS = 64


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows and float32 per-row scales [rows, 1] with x ~= q * scale, rounded to nearest.
    Used for weights once and for activations on every w8a8 matmul, so it is kept to a few ops."""
    x = x.float()
    # abs().amax(): torch's inf-norm kernel is 5-10x slower at 32+ rows (measured).
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-12).div_(127)
    return torch.div(x, scale).round_().to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scale: [rows, 1], as quantize_int8 returns it."""
    return q * scale.to(dtype)  # one pass: int8 * float promotes to the float dtype


def _portable_matmul(x: torch.Tensor, layer: "Int8Linear") -> torch.Tensor:
    return F.linear(x, layer.qweight.to(x.dtype)) * layer.scale.to(x.dtype)


def _dequantized_mm(rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    scale_bf16: torch.Tensor) -> torch.Tensor:
    return F.linear(rows, dequantize(qweight, scale[:, None], rows.dtype))


def _int8_kernel_mm(rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    scale_bf16: torch.Tensor) -> torch.Tensor:
    # The kernel's int8 x bf16 path is the fast one even without bf16 hardware; its fp32 path is not.
    return torch._weight_int8pack_mm(rows.to(torch.bfloat16), qweight, scale_bf16).to(rows.dtype)


def _cpu_matmul(x: torch.Tensor, layer: "Int8Linear") -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    args = (rows, layer.qweight, layer.scale, layer.scale_bf16)
    if torch.compiler.is_compiling():
        # In a graph a Python branch on the symbolic row count would guard it to the warm-up's side, and the
        # first step on the other side would compile again mid-serving (SmolLM2: a 26 s first token for a
        # prompt over 64 tokens); cond compiles both sides into the one graph.
        out = torch.cond(rows.shape[0] > CPU_INT8_KERNEL_MAX_ROWS, _dequantized_mm, _int8_kernel_mm, args)
    else:
        out = (_dequantized_mm if rows.shape[0] > CPU_INT8_KERNEL_MAX_ROWS else _int8_kernel_mm)(*args)
    return out.view(*x.shape[:-1], -1)


def _int8_activations_product(rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                              int_mm) -> torch.Tensor:
    xq, xscale = quantize_int8(rows)
    # Convert first, then scale in place: int32 * float32 promotes element by element, 1.5-4x slower.
    return int_mm(xq, qweight.t()).float().mul_(scale).mul_(xscale)


# The same function compiled (engine option torch_compile): quantizing and rescaling become one pass each
# instead of seven; 1.1-2.9x faster per SmolLM2 projection at 4,096 rows (the matmul's share varies).
_fused_int8_activations_product = torch.compile(_int8_activations_product, dynamic=True)


def _int8_activations_matmul(x: torch.Tensor, layer: "Int8Linear", int_mm,
                             product=_int8_activations_product) -> torch.Tensor:
    out = product(x.reshape(-1, x.shape[-1]), layer.qweight, layer.scale, int_mm)
    return out.to(x.dtype).view(*x.shape[:-1], -1)


def _float_int_mm(xq: torch.Tensor, qweight_t: torch.Tensor) -> torch.Tensor:
    # int8 values are exact in float32, and so are their sums below 2^24 (|sum| <= 127^2 x in_features).
    return xq.float() @ qweight_t.float()


def _cpu_w8a8_matmul(x: torch.Tensor, layer: "Int8Linear") -> torch.Tensor:
    return _int8_activations_matmul(x, layer, torch._int_mm)


def _cpu_fused_w8a8_matmul(x: torch.Tensor, layer: "Int8Linear") -> torch.Tensor:
    # A compiled decode graph fuses the eager form itself; a small eager step would pay more for the
    # compiled call (guards, wrapper) than it saves.
    if torch.compiler.is_compiling() or x.shape[:-1].numel() <= CPU_INT8_KERNEL_MAX_ROWS:
        return _cpu_w8a8_matmul(x, layer)
    return _int8_activations_matmul(x, layer, torch._int_mm, _fused_int8_activations_product)


def _portable_w8a8_matmul(x: torch.Tensor, layer: "Int8Linear") -> torch.Tensor:
    return _int8_activations_matmul(x, layer, _float_int_mm)


def select_int8_matmul(device: torch.device, method: str, compiled: bool = False):
    """The one place that picks an int8 kernel for a device and method (compiled: torch_compile is on)."""
    on_cpu = device.type == "cpu"
    if method == "w8a8":
        if not on_cpu:
            return _portable_w8a8_matmul
        return _cpu_fused_w8a8_matmul if compiled else _cpu_w8a8_matmul
    return _cpu_matmul if on_cpu else _portable_matmul


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, method: str = "int8"):
        super().__init__()
        q, scale = quantize_int8(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.squeeze(1))  # [out_features]: scales the matmul's columns
        self.register_buffer("scale_bf16", self.scale.to(torch.bfloat16))  # the int8 x bf16 kernel's
        self.bias = bias
        self.dtype, self.method = weight.dtype, method
        self.matmul = select_int8_matmul(weight.device, method)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weights: keeps DecoderModel.output_embeddings() meaning the same for a
        quantized untied head."""
        return dequantize(self.qweight, self.scale[:, None], self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x, self)
        return out if self.bias is None else out + self.bias


def quantize_decoder(model: nn.Module, method: str, logits_head: bool) -> None:
    """Replaces every projection of every layer, and the logits head of a generating model, by its
    quantized form in place. A tied logits head gets its own int8 copy; the input embedding table stays
    as it is (a lookup reads one row per token)."""
    if not getattr(model, "is_decoder", False):
        raise ValueError("quantization applies to decoder models (generation and yes/no reranking) only")
    for layer in model.layers:
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                             (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            linear = getattr(parent, name)
            setattr(parent, name, Int8Linear(linear.weight.data, linear.bias, method))
    if logits_head:
        model.lm_head = Int8Linear(model.output_embeddings().data, None, method)


@torch.inference_mode()  # as engine steps run: a graph compiled outside it would not serve them
def compile_int8_layers(model: nn.Module) -> None:
    """Engine option torch_compile: every int8 layer switches to its compiled kernel where it has one,
    each distinct shape compiled now (one call with prefill-sized zeros) rather than on a request."""
    warmed = set()
    for layer in model.modules():
        if not isinstance(layer, Int8Linear):
            continue
        layer.matmul = select_int8_matmul(layer.qweight.device, layer.method, compiled=True)
        if layer.matmul is _cpu_fused_w8a8_matmul and layer.qweight.shape not in warmed:
            warmed.add(layer.qweight.shape)
            layer(torch.zeros(2 * CPU_INT8_KERNEL_MAX_ROWS, layer.qweight.shape[1], dtype=layer.dtype,
                              device=layer.qweight.device))
