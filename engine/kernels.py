"""The one place where device-specific kernels are chosen; any other device gets the portable PyTorch ones, so
the engine stays device-agnostic: attention (engine.attention_backends), a decoder layer's elementwise
passes (engine.layer_ops), fp8 / w8a8 layers' quantization of their inputs (engine.triton_quant), all CUDA,
and the CPU's linear layers (engine.packed_linear) and C kernels (engine.c_kernels: paged decode attention in
engine.cpu_paged_decode, a step's prefill spans in one AMX call in engine.cpu_span_attention, a decoder layer's
fused bf16 ops in engine.cpu_layer_ops)."""
import functools
import logging

import torch

from engine import cpu_layer_ops
from engine.attention_backends import AttentionBackend, GatherDecode, PerSequencePrefill
from engine.cpu_paged_decode import CPUPagedDecode, checks_out as cpu_decode_checks_out
from engine.cpu_span_attention import CPUSpanPrefill, checks_out as cpu_span_checks_out
from engine.layer_ops import (CPUEncoderLayerOps, CPUFusedLayerOps, EncoderLayerOps, FusedLayerOps, LayerOps,
                              encoder_ops_check_out, fused_ops_check_out)
from engine.packed_linear import packing_checks_out
from engine.quantization import FP8, quantize_fp8, quantize_int8

log = logging.getLogger(__name__)


def select_attention_backend(device: torch.device, dtype: torch.dtype, head_dim: int | None,
                             kv_dtype: torch.dtype | None = None, decodes: bool = True) -> AttentionBackend:
    """Prefill on CUDA: a variable-length kernel where one checks out (flash attention in fp16 / bf16, the
    memory-efficient one in float32), else FlexAttention; decode: the paged Triton kernel. On the CPU: in bf16
    with AMX every span of a step in one call of the compiled C kernel where it checks out for the head size
    (engine.cpu_span_attention), else one SDPA call per span; and for a model that decodes (generates), decode in
    place by the compiled C kernel where it checks out for the pool's dtype, the serving one or float8
    (engine.cpu_paged_decode)."""
    if device.type != "cuda":
        cpu = device.type == "cpu"
        in_place = cpu and decodes and cpu_decode_checks_out(dtype, head_dim or 64, kv_dtype)
        spans = cpu and dtype == torch.bfloat16 and head_dim is not None and cpu_span_checks_out(head_dim, kv_dtype)
        return AttentionBackend(CPUSpanPrefill() if spans else PerSequencePrefill(),
                                CPUPagedDecode() if in_place else GatherDecode(dtype))
    from engine.flex_prefill import FlexPrefill, flex_available
    from engine.triton_decode import TritonPagedDecode, triton_available
    from engine.varlen_prefill import VarlenPrefill, varlen_kernel
    if head_dim is not None and (attend := varlen_kernel(device, dtype, head_dim)) is not None:
        prefill = VarlenPrefill(device, attend)
    else:
        prefill = FlexPrefill(device) if flex_available() else PerSequencePrefill()
    if not triton_available():
        return AttentionBackend(prefill, GatherDecode(dtype))
    # Contexts are split where a step would launch fewer than two programs per SM.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return AttentionBackend(prefill, TritonPagedDecode(min_programs=2 * sms))


def select_layer_ops(device: torch.device, dtype: torch.dtype, spec, kv_dtype: torch.dtype | None = None) -> LayerOps:
    """Fused Triton kernels on CUDA in fp16 / bf16, fused C kernels on the CPU in bf16 (a bf16 or float8 pool), where
    they check out for the model's shapes (spec: its DecoderSpec) and KV cache dtype; float32 keeps Hugging Face's
    roundings, op by op."""
    from engine.triton_decode import triton_available
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and triton_available():
        if fused_ops_check_out(device, dtype, spec, kv_dtype):
            return FusedLayerOps()
        log.warning("the fused layer ops differ from PyTorch's on this device; decoder layers run op by op")
    if device.type == "cpu" and dtype == torch.bfloat16 and (kv_dtype or dtype) in (dtype, FP8) \
            and cpu_layer_ops.library() is not None:
        if fused_ops_check_out(device, dtype, spec, kv_dtype, CPUFusedLayerOps()):
            return CPUFusedLayerOps()
        log.warning("the fused C layer ops differ from PyTorch's on this CPU; decoder layers run op by op")
    return LayerOps()


def select_encoder_layer_ops(device: torch.device, dtype: torch.dtype, spec) -> EncoderLayerOps:
    """An encoder layer's add + LayerNorm and activation as C kernels on the CPU in bf16 where they check out for
    the model's width, activation and epsilon (spec: its EncoderSpec); PyTorch's ops elsewhere (float32 keeps
    Hugging Face's roundings)."""
    if device.type == "cpu" and dtype == torch.bfloat16 and cpu_layer_ops.library() is not None:
        if encoder_ops_check_out(CPUEncoderLayerOps(), spec.hidden_size, spec.activation, spec.eps):
            return CPUEncoderLayerOps()
        log.warning("the fused C encoder ops differ from PyTorch's on this CPU; encoder layers run op by op")
    return EncoderLayerOps()


def packs_linears(device: torch.device, dtype: torch.dtype) -> bool:
    """Linear layers on the CPU take oneDNN's packed weights where its product checks out; CUDA keeps cuBLAS."""
    return device.type == "cpu" and packing_checks_out(dtype)


@functools.cache  # one choice (and at most one warning) per device and method, not one per layer
def select_activation_quantizer(device: torch.device, method: str):
    """Per-token quantization of a layer's input for the fp8 or w8a8 method: one Triton kernel on CUDA where it
    matches the PyTorch quantizer on the device, else that quantizer's ops."""
    from engine.triton_decode import triton_available
    dtype, ops = (torch.int8, quantize_int8) if method == "w8a8" else (FP8, quantize_fp8)
    if device.type == "cuda" and triton_available():
        from engine import triton_quant
        if triton_quant.checks_out(device, dtype):
            return triton_quant.quantize_int8_rows if method == "w8a8" else triton_quant.quantize_fp8_rows
        log.warning("the %s quantization kernel differs from PyTorch's on this device; layers quantize op by op",
                    method)
    return ops
