"""Attention over a packed step: one backend call for all prefill spans, one for all decodes.

The kernels live in the backend that engine.kernels picks for the device; this module routes the two halves
of the step. The step's keys and values reach the paged pool before it (CacheWrite): written by the layer's
rotary op, fused with it where the layer ops are (engine.layer_ops)."""
from typing import NamedTuple, Optional

import torch
from torch import nn

from engine.context import get_context
from engine.opaque_op import opaque_op
from engine.quantization import FP8, quantize_fp8


class CacheWrite(NamedTuple):
    """Where a layer's keys and values of the step go: its views of the pool, and each packed token's slot."""
    k_cache: torch.Tensor  # [num_slots, kv_heads, head_dim]
    v_cache: torch.Tensor
    slots: torch.Tensor  # int64 [tokens]
    k_scale: torch.Tensor | None = None  # a float8 pool's: [num_slots, kv_heads] float32 (quantize_kv)
    v_scale: torch.Tensor | None = None


def write_kv(cache: CacheWrite, k: torch.Tensor, v: torch.Tensor) -> None:
    for pool, scales, x in ((cache.k_cache, cache.k_scale, k), (cache.v_cache, cache.v_scale, v)):
        if scales is None:
            pool.index_copy_(0, cache.slots, x)
            continue
        q, scale = quantize_kv(x)
        # index_copy_ has no float8 kernel: the same bytes as uint8.
        pool.view(torch.uint8).index_copy_(0, cache.slots, q.view(torch.uint8))
        scales.index_copy_(0, cache.slots, scale)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[tokens, kv_heads, head_dim] keys or values -> float8 e4m3 values and one float32 scale per (token, kv
    head), absmax / 448 (kv_cache_dtype fp8). A scale for each head of each token keeps every value at float8's
    relative precision, none among the subnormals: SmolLM2's perplexity +0.2% where one scale of 1 (vLLM's
    default without calibrated scales) cost +1.2% (README)."""
    q, scale = quantize_fp8(x)  # rows over the last dimension, any leading ones (no reshape: a compiled decode
    return q, scale.squeeze(-1)  # graph would specialise on a batch of one)


# A layer's pool as the prefill kernels get it: (k_cache, v_cache, k_scale, v_scale), the scales None but for a
# float8 pool.
Pool = tuple


def in_whole_rows(pool: Pool, dtype: torch.dtype) -> bool:
    """The pool as the CPU's C kernels read it, by raw pointers: contiguous keys and values in dtype, or float8
    ones with contiguous float32 scales."""
    k_cache, v_cache, k_scale, v_scale = pool
    scales = () if k_scale is None else (k_scale, v_scale)
    return all(x.is_contiguous() for x in (k_cache, v_cache, *scales)) and \
        k_cache.dtype == v_cache.dtype == (FP8 if scales else dtype) and all(s.dtype == torch.float32 for s in scales)


def read_kv(pool: Pool, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's keys and values at slots, in dtype: a float8 pool's times their scales."""
    k_cache, v_cache, k_scale, v_scale = pool
    return dequantized_kv(k_cache[slots], None if k_scale is None else k_scale[slots], dtype), \
        dequantized_kv(v_cache[slots], None if v_scale is None else v_scale[slots], dtype)


def dequantized_kv(x: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x [..., head_dim] in dtype; scales [...]: a float8 pool's, multiplied in float32 and rounded once."""
    if scales is None:
        return x.to(dtype)
    return (x.float() * scales[..., None]).to(dtype)


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        # Views of this layer's part of the block pool: [num_slots, num_kv_heads, head_dim], and a float8 pool's
        # scales [num_slots, num_kv_heads] (kv_cache_dtype fp8; else None).
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        self.block_size = 0
        self.backend = None  # set by the model runner: an AttentionBackend

    def cache_write(self) -> CacheWrite | None:
        """Where this step's keys and values go; None where nothing is kept (encoders, a model without a pool)."""
        slots = get_context().slot_mapping
        if self.k_cache is None or slots is None:
            return None
        return CacheWrite(self.k_cache, self.v_cache, slots, self.k_scale, self.v_scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim] -> [tokens, heads * dim]; the step's k and v
        are in the pool already (cache_write)."""
        ctx = get_context()
        if ctx.decode_block_table is None:
            return self._prefill(q, k, v).flatten(1)
        p = ctx.num_prefill_tokens
        if p == 0:
            return self.backend.decode(self, q, ctx).flatten(1)
        return torch.cat([self._prefill(q[:p], k[:p], v[:p]), self.backend.decode(self, q[p:], ctx)]).flatten(1)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # Inside a compiled model (torch_compile) the kernel is one opaque op: the step's span lengths stay
        # out of the graph (one graph serves every step) and inductor fuses the ops around it.
        return _prefill_op(q, k, v, self.k_cache, self.v_cache, self.k_scale, self.v_scale, self.scale)


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: Optional[torch.Tensor],
             v_cache: Optional[torch.Tensor], k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor],
             scale: float) -> torch.Tensor:
    """The step's prefill kernel (the backend's, set on the context with its metadata) on every span."""
    ctx = get_context()
    return ctx.prefill_kernel(q, k, v, (k_cache, v_cache, k_scale, v_scale), scale, ctx).contiguous()


# The pool's views are arguments, so the op is ordered after the step's writes into them.
_prefill_op = opaque_op("prefill_attention", _prefill,
                        lambda q, k, v, k_cache, v_cache, k_scale, v_scale, scale: q.new_empty(q.shape))
