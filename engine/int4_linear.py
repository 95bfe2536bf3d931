"""Weight-only 4-bit linear layers (quantization "int4", W4A16): llama.cpp's Q4_1 and GPTQ's asymmetric form.

A row's weights are quantized in groups of GROUP_SIZE input channels, each group with its own scale and zero
point: w ~= (q - 8) * scale + zero, q in 0..15, rounded to nearest between the group's minimum and maximum (both
ends exact, so a Q4_1 GGUF's dequantized weights come back on their own grid, up to the scales' rounding).
A decode step of a small batch on a CPU is bound by reading the weights, and 4 bits read a quarter of bf16's bytes.

On a CPU, up to CPU_INT4_KERNEL_MAX_ROWS rows take torch's int4 x bf16 kernel on its packed copy of the codes;
its time grows with the rows much faster than a float matmul's, so more rows (prefill) dequantize the codes
for one matmul in the serving dtype; with AMX (bf16), rows between the two take engine.cpu_amx_matmul's tiles.
Elsewhere (GPUs, a torch whose kernel is missing or computes otherwise) every call dequantizes: correct, not
faster. Resident: the codes and the kernel's copy, a byte a weight."""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from engine import cpu_amx_matmul, cpu_int4
from engine.c_kernels import cpu_flags
from engine.opaque_op import opaque_op
from engine.row_count_branch import by_row_count

GROUP_SIZE = 32  # input channels a scale and zero point cover (Q4_0 / Q4_1's block)
KERNEL_ROW_MULTIPLE = 16  # the CPU kernel takes output sizes in multiples of 16: the layer pads its rows
# Rows up to which the int4 kernel beats dequantizing for a bf16 matmul (SmolLM2's projections, 2 threads): 64 on
# an AMD EPYC with AVX512-BF16 (README); on a Xeon with AMX, whose bf16 products are ~5x faster, 16 (kernel
# against dequantized product at 3,072 x 576: 346 / 333 us at 16 rows, 687 / 344 at 32).
CPU_INT4_KERNEL_MAX_ROWS = 16 if "amx_bf16" in cpu_flags() else 64
# bf16 layers where the AMX kernel checks out (engine.cpu_amx_matmul): torch's kernel up to 8 rows, the AMX one up to
# 256, the dequantized product above (SmolLM2's projections, 2-core AMX Xeon: torch's kernel 1.2-1.3x faster at 8
# rows, the AMX one 1.4-1.5x at 16 and 1.4-3x at 32-64 (against the dequantized product then), 1.03-1.17x at 256,
# 0.5-1.3x from 1,024).
CPU_INT4_AMX_ROWS = (8, 256)


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in 0..15 (uint8 [out, in]) and float32 [out, in // GROUP_SIZE, 2] (scale, zero) with
    w ~= (q - 8) * scale + zero per group."""
    out_features, in_features = w.shape
    if in_features % GROUP_SIZE:
        raise ValueError(f"quantization int4 needs input sizes in multiples of {GROUP_SIZE}, got a layer of "
                         f"{in_features}")
    g = w.float().view(out_features, -1, GROUP_SIZE)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (high - low) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0, its value exact
    q = torch.div(g - low, scale).round_().clamp_(0, 15).to(torch.uint8).view(out_features, in_features)
    return q, torch.cat((scale, low + 8 * scale), dim=-1)


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes: two 4-bit codes a byte (pack_codes), scales as quantize_int4 gives them (in any float dtype). On the
    CPU one C pass where it gives the ops' weights (engine.cpu_int4: 1.7-2.6x faster), else the ops; a compiled
    graph traces the ops."""
    if codes.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) \
            and not torch.compiler.is_compiling() and cpu_int4.checks_out(GROUP_SIZE):
        return cpu_int4.dequantize(codes, scales, dtype)
    return dequantize_int4_by_ops(codes, scales, dtype)


def dequantize_int4_by_ops(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dequantize_int4 in PyTorch ops, written into one buffer in place: 2x faster than stacking the halves (a
    SmolLM2 step's weights: 63 ms on the AMD EPYC)."""
    rows = codes.shape[0]
    q = torch.empty(rows, codes.shape[1], 2, dtype=dtype, device=codes.device)
    q[..., 0], q[..., 1] = codes & 15, codes >> 4
    s = scales.to(dtype)
    return q.view(rows, -1, GROUP_SIZE).sub_(8).mul_(s[..., :1]).add_(s[..., 1:]).view(rows, -1)


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in] codes -> [out, in // 2], the even input channel in the low half of each byte."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _kernel_operands(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU kernel's packed codes and its bf16 [in // GROUP_SIZE, out, 2] scales, rows padded to its multiple."""
    pad = -q.shape[0] % KERNEL_ROW_MULTIPLE
    q, scales = F.pad(q, (0, 0, 0, pad)), F.pad(scales, (0, 0, 0, 0, 0, pad))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    return packed, scales.transpose(0, 1).contiguous().to(torch.bfloat16)


def _int4_product(rows: torch.Tensor, packed: torch.Tensor, kernel_scales: torch.Tensor,
                  out_features: int) -> torch.Tensor:
    # bf16 activations: the kernel's float32 path is ~25x slower (SmolLM2, measured), as the int8 one's.
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16), packed, GROUP_SIZE, kernel_scales)
    return out[:, :out_features].to(rows.dtype)


# One opaque op in a compiled graph: inductor rewrites the aten kernel into a form that fails inside torch.cond.
_int4_product_op = opaque_op("int4_linear", _int4_product, lambda rows, packed, kernel_scales, out_features:
                             rows.new_empty(rows.shape[0], out_features))


# Both paths take the same tensors (engine.row_count_branch): the codes and scales, and the kernel's copies.
def _kernel_mm(rows: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, packed: torch.Tensor,
               kernel_scales: torch.Tensor) -> torch.Tensor:
    return _int4_product_op(rows, packed, kernel_scales, codes.shape[0])


def _dequantized_mm(rows: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, *kernel_operands) -> torch.Tensor:
    return F.linear(rows, dequantize_int4(codes, scales, rows.dtype))


def _amx_mm(rows: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, *kernel_operands) -> torch.Tensor:
    return cpu_amx_matmul.int4_matmul(rows, codes, scales)


@functools.cache
def cpu_kernel_checks_out() -> bool:
    """torch's CPU int4 kernel computes (q - 8) * scale + zero products (its packing and zero point convention
    differ between releases) on a layer with padded rows, checked once against the dequantized matmul."""
    gen = torch.Generator().manual_seed(0)
    q, scales = quantize_int4(torch.randn(40, 2 * GROUP_SIZE, generator=gen))
    scales = scales.to(torch.bfloat16).float()  # the kernel's scales are bf16
    try:
        packed, kernel_scales = _kernel_operands(q, scales)
        for rows in (1, 5):
            x = torch.randn(rows, 2 * GROUP_SIZE, generator=gen).to(torch.bfloat16)
            got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP_SIZE, kernel_scales)[:, :40]
            want = F.linear(x.float(), dequantize_int4(pack_codes(q), scales, torch.float32))
            if not torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
                return False
    except Exception:  # noqa: BLE001 (no such kernel in this torch, or it refuses the shapes)
        return False
    return True


class Int4Linear(nn.Module):
    """A linear layer's weights as 4-bit codes with a scale and zero point per GROUP_SIZE input channels."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scales = quantize_int4(weight)
        self.dtype, self.bias = weight.dtype, bias
        self.register_buffer("codes", pack_codes(q))
        self.register_buffer("scales", scales)
        self.on_kernel = weight.device.type == "cpu" and cpu_kernel_checks_out()
        if self.on_kernel:
            packed, kernel_scales = _kernel_operands(q, scales)
            self.register_buffer("packed", packed)
            self.register_buffer("kernel_scales", kernel_scales)
            # Both paths compute the same weights: the kernel's bf16 scales.
            self.scales = kernel_scales[:, :weight.shape[0]].transpose(0, 1).float().contiguous()
        # More rows than torch's kernel is fast at: AMX tiles where they check out, else the dequantized product.
        self.amx = self.on_kernel and self.dtype == torch.bfloat16 and cpu_amx_matmul.checks_out()

    @property
    def emulated(self) -> bool:
        """Every call dequantizes the weights (no faster kernel here)."""
        return not self.on_kernel

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weights (DecoderModel.output_embeddings() of a quantized untied head)."""
        return dequantize_int4(self.codes, self.scales, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.on_kernel:
            limits, kernels = ((CPU_INT4_AMX_ROWS, (_kernel_mm, _amx_mm, _dequantized_mm)) if self.amx else
                               ((CPU_INT4_KERNEL_MAX_ROWS,), (_kernel_mm, _dequantized_mm)))
            out = by_row_count(limits, kernels, rows, self.codes, self.scales, self.packed, self.kernel_scales)
        else:
            out = _dequantized_mm(rows, self.codes, self.scales)
        out = out.view(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias
