"""Checkpoints stored quantized (config.json's `quantization_config`).

FP8 checkpoints load: compressed-tensors' float-quantized format (llm-compressor, Neural Magic's -FP8 models;
one weight scale per tensor or per output channel), fbgemm_fp8 (per channel) and transformers' fine-grained
fp8 (one scale per block of weights, Qwen3-FP8 and DeepSeek's). Each float8 weight is multiplied by its
scales as it is read, so the model gets the checkpoint's numbers as float weights; stored activation scales
are not used (an fp8 layer here scales each token's activations by their own absmax). Where the device has
fp8 matmuls the model is then served with quantization fp8, as vLLM serves these checkpoints (a per-channel
checkpoint's float8 values come back bit for bit); elsewhere in the serving dtype. Every other method (GPTQ,
AWQ, bitsandbytes, integer compressed-tensors, ...) is refused by name: its packed weights would fail to load
or, in the float8 case without this, load as the wrong numbers."""
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from engine.loader import iter_weights
from engine.quantization import scaled_mm_out_dtype

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_METHODS = ("compressed-tensors", "fbgemm_fp8", "fp8")
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv")
# Activation and KV-cache scales of static fp8 schemes: nothing here reads them (and beside a stacked
# projection's weights they would be taken for its parts).
UNUSED_SUFFIXES = (".input_scale", ".input_scale_ub", ".k_scale", ".v_scale")


@dataclass(frozen=True, slots=True)
class CheckpointQuantization:
    method: str
    block: tuple[int, int] | None  # fine-grained fp8: the weight block one scale covers (rows, columns)


def read_checkpoint_quantization(qc: dict | None, model_dir: str) -> CheckpointQuantization | None:
    """qc: config.json's quantization_config. None: the checkpoint is not quantized; raises for a method that
    does not load here."""
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        weights = [g.get("weights") or {} for g in groups]
        if not weights or any(w.get("type") != "float" or w.get("num_bits") != 8 for w in weights):
            raise ValueError(f"{model_dir}: compressed-tensors checkpoints load only with 8-bit float weights "
                             f"(FP8); this one has {[(w.get('type'), w.get('num_bits')) for w in weights]}")
    elif method not in FP8_METHODS:
        raise ValueError(f"{model_dir} is quantized with {method!r}, which does not load here; FP8 checkpoints "
                         f"({', '.join(FP8_METHODS)}) do, and an unquantized checkpoint can be served with "
                         f"quantization int8, w8a8 or fp8")
    block = qc.get("weight_block_size") if method == "fp8" else None
    return CheckpointQuantization(method, tuple(block) if block else None)


def checkpoint_weights(model_dir: str, hf_config, quantization: str | None, is_decoder: bool, device: torch.device,
                       dtype: torch.dtype) -> tuple[Iterator[tuple[str, torch.Tensor]], str | None]:
    """The model's weights as the model loads them (an FP8 checkpoint's as float weights) and the quantization
    to serve them with: the config's, else the one served_quantization picks for the checkpoint."""
    stored = read_checkpoint_quantization(getattr(hf_config, "quantization_config", None), model_dir)
    weights = iter_weights(model_dir)
    if stored is None:
        return weights, quantization
    return dequantized_weights(weights, stored), quantization or served_quantization(stored, is_decoder, device, dtype)


def served_quantization(quant: CheckpointQuantization | None, is_decoder: bool, device: torch.device,
                        dtype: torch.dtype) -> str | None:
    """The quantization an FP8 checkpoint is served with when the config names none: fp8 for a decoder on a
    device with fp8 matmuls (not a CPU, where they are emulated), else none (its float weights)."""
    if quant is None or not is_decoder or device.type == "cpu":
        return None
    return "fp8" if scaled_mm_out_dtype(device, dtype) is not None else None


def dequantized_weights(weights: Iterable[tuple[str, torch.Tensor]],
                        quant: CheckpointQuantization) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with each float8 `<layer>.weight` times its `<layer>.weight_scale` (one per
    tensor or per output channel) or `<layer>.weight_scale_inv` (one per block; DeepSeek's name for the
    factor that dequantizes), as float32; activation and KV-cache scales dropped; every other tensor as stored.
    A weight and its scale may come in either order."""
    weights_waiting: dict[str, torch.Tensor] = {}
    scales_waiting: dict[str, torch.Tensor] = {}
    for name, tensor in weights:
        if name.endswith(UNUSED_SUFFIXES):
            continue
        if name.endswith(SCALE_SUFFIXES):
            layer = name.rsplit(".", 1)[0]
            if layer in weights_waiting:
                yield f"{layer}.weight", dequantize(weights_waiting.pop(layer), tensor, quant.block, layer)
            else:
                scales_waiting[layer] = tensor
        elif name.endswith(".weight") and tensor.dtype in FLOAT8:
            layer = name.removesuffix(".weight")
            if layer in scales_waiting:
                yield name, dequantize(tensor, scales_waiting.pop(layer), quant.block, layer)
            else:
                weights_waiting[layer] = tensor
        else:
            yield name, tensor
    if weights_waiting:
        raise ValueError(f"float8 weights without a weight_scale in the checkpoint: {sorted(weights_waiting)[:4]}")


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, layer: str) -> torch.Tensor:
    rows, cols = weight.shape
    scale = scale.float()
    if block is not None and scale.dim() == 2 and scale.numel() > 1:
        br, bc = block
        if scale.shape != (-(-rows // br), -(-cols // bc)):
            raise ValueError(f"{layer}: {tuple(scale.shape)} block scales do not tile a {rows}x{cols} weight "
                             f"in blocks of {br}x{bc}")
        scale = scale.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    elif scale.numel() == rows:
        scale = scale.reshape(rows, 1)
    elif scale.numel() != 1:
        raise ValueError(f"{layer}: a weight scale of shape {tuple(scale.shape)} fits neither the tensor, its "
                         f"{rows} output channels nor blocks")
    return weight.float() * scale
