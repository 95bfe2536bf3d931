"""Attention over a packed step: one backend call for all prefill spans, one for all decodes.

The kernels live in the backend that engine.kernels picks for the device; this module routes the two halves
of the step. The step's keys and values reach the paged pool before it (CacheWrite): written by the layer's
rotary op, fused with it where the layer ops are (engine.layer_ops)."""
from typing import NamedTuple, Optional

import torch
from torch import nn

from engine.context import get_context
from engine.quantization import FP8, FP8_MAX


class CacheWrite(NamedTuple):
    """Where a layer's keys and values of the step go: its views of the pool, and each packed token's slot."""
    k_cache: torch.Tensor  # [num_slots, kv_heads, head_dim]
    v_cache: torch.Tensor
    slots: torch.Tensor  # int64 [tokens]


def write_kv(cache: CacheWrite, k: torch.Tensor, v: torch.Tensor) -> None:
    for pool, x in ((cache.k_cache, k), (cache.v_cache, v)):
        values = as_cache_values(x, pool.dtype)
        if pool.dtype == FP8:  # index_copy_ has no float8 kernel: the same bytes as uint8
            pool, values = pool.view(torch.uint8), values.view(torch.uint8)
        pool.index_copy_(0, cache.slots, values)


def as_cache_values(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the pool's dtype. A float8 pool (kv_cache_dtype fp8, scale 1) saturates at its largest value, as
    the GPU's cast does, where PyTorch's would give NaN; readers convert back to the queries' dtype."""
    if dtype == FP8:
        x = x.clamp(-FP8_MAX, FP8_MAX)
    return x.to(dtype)


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        # Views of this layer's part of the block pool: [num_slots, num_kv_heads, head_dim].
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.block_size = 0
        self.backend = None  # set by the model runner: an AttentionBackend

    def cache_write(self) -> CacheWrite | None:
        """Where this step's keys and values go; None where nothing is kept (encoders, a model without a pool)."""
        slots = get_context().slot_mapping
        return None if self.k_cache is None or slots is None else CacheWrite(self.k_cache, self.v_cache, slots)

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
        attend = _prefill_op if torch.compiler.is_compiling() else _prefill
        return attend(q, k, v, self.k_cache, self.v_cache, self.scale)


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: Optional[torch.Tensor],
             v_cache: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """The step's prefill kernel (the backend's, set on the context with its metadata) on every span."""
    ctx = get_context()
    return ctx.prefill_kernel(q, k, v, k_cache, v_cache, scale, ctx).contiguous()


# The pool's views are arguments, so the op is ordered after the step's writes into them.
_prefill_op = torch.library.custom_op("servecluster::prefill_attention", _prefill, mutates_args=())
_prefill_op.register_fake(lambda q, k, v, k_cache, v_cache, scale: q.new_empty(q.shape))
