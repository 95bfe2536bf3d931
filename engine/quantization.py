"""Weight-only int8 quantization of a decoder's linear layers (one symmetric scale per output channel).

At small batches a decode step is bound by reading the weights from memory: int8 reads a quarter of
fp32's bytes. Activations stay in the serving dtype, so attention, norms and the KV cache are unchanged.
The matmul kernel is picked here, once per device: on CPU, torch's int8 x bf16 kernel for the few rows
of a decode step and a dequantized fp32 matmul for prefill-sized inputs (README: measured crossover);
elsewhere a portable dequantize-then-matmul."""
import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATION_METHODS = ("int8",)
# Rows up to which the CPU int8 kernel beats dequantize + fp32 matmul (2 threads, SmolLM2's shapes: the
# kernel wins up to 64 rows for every projection and the logits head, they tie at 128; README).
CPU_INT8_KERNEL_MAX_ROWS = 64


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weights and float32 per-row scales with weight ~= q * scale[:, None]."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q * scale.to(dtype)[:, None]  # one pass: int8 * float promotes to the float dtype


def _portable_matmul(x: torch.Tensor, layer: "Int8Linear") -> torch.Tensor:
    return F.linear(x, layer.qweight.to(x.dtype)) * layer.scale.to(x.dtype)


def _cpu_matmul(x: torch.Tensor, layer: "Int8Linear") -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > CPU_INT8_KERNEL_MAX_ROWS:
        return F.linear(x, dequantize(layer.qweight, layer.scale, x.dtype))
    # The kernel's int8 x bf16 path is the fast one even without bf16 hardware; its fp32 path is not.
    out = torch._weight_int8pack_mm(rows.to(torch.bfloat16), layer.qweight, layer.scale_bf16)
    return out.to(x.dtype).view(*x.shape[:-1], -1)


def select_int8_matmul(device: torch.device):
    return _cpu_matmul if device.type == "cpu" else _portable_matmul


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, shard_sizes: tuple[int, ...] | None = None):
        super().__init__()
        self.shard_sizes = shard_sizes  # a fused projection's split (q/k/v, gate/up), as on the nn.Linear
        q, scale = quantize_int8(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))
        self.bias = bias
        self.dtype = weight.dtype
        self.matmul = select_int8_matmul(weight.device)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weights: keeps DecoderModel.output_embeddings() meaning the same for a
        quantized untied head."""
        return dequantize(self.qweight, self.scale, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x, self)
        return out if self.bias is None else out + self.bias


def quantize_decoder(model: nn.Module, logits_head: bool) -> None:
    """Replaces every projection of every layer, and the logits head of a generating model, by its
    quantized form in place. A tied logits head gets its own int8 copy; the input embedding table stays
    as it is (a lookup reads one row per token)."""
    if not getattr(model, "is_decoder", False):
        raise ValueError("quantization applies to decoder models (generation and yes/no reranking) only")
    for layer in model.layers:
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                             (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            linear = getattr(parent, name)
            setattr(parent, name, Int8Linear(linear.weight.data, linear.bias, getattr(linear, "shard_sizes", None)))
    if logits_head:
        model.lm_head = Int8Linear(model.output_embeddings().data, None)
