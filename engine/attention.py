"""Attention over a packed step: per-sequence prefill chunks, one batched call for all decodes.
Pure PyTorch so the same code runs on CPU and CUDA."""
import torch
import torch.nn.functional as F
from torch import nn

from engine.context import get_context


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        # Views of this layer's part of the block pool: [num_slots, num_kv_heads, head_dim].
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.block_size = 0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim] -> [tokens, heads * dim]"""
        ctx = get_context()
        if self.k_cache is not None and ctx.slot_mapping is not None:
            self.k_cache.index_copy_(0, ctx.slot_mapping, k)
            self.v_cache.index_copy_(0, ctx.slot_mapping, v)
        out = torch.empty_like(q)
        for span in ctx.prefills:
            if span.context_slots is None:
                kk, vv = k[span.start:span.end], v[span.start:span.end]
            else:
                kk, vv = self.k_cache[span.context_slots], self.v_cache[span.context_slots]
            out[span.start:span.end] = self._sdpa(
                q[span.start:span.end].transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1),
                span.mask, ctx.causal and span.mask is None).transpose(0, 1)
        if ctx.decode_block_table is not None:
            p, b = ctx.num_prefill_tokens, ctx.decode_block_table.shape[0]
            kk = self._gather_blocks(self.k_cache, ctx.decode_block_table)  # [batch, kv_heads, context, dim]
            vv = self._gather_blocks(self.v_cache, ctx.decode_block_table)
            # GQA without copying K/V: a kv head's query heads become its rows of queries.
            qd = q[p:].view(b, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
            od = F.scaled_dot_product_attention(qd, kk, vv, attn_mask=ctx.decode_mask, scale=self.scale)
            out[p:] = od.reshape(b, self.num_heads, self.head_dim)
        return out.flatten(1)

    def _gather_blocks(self, cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        # Whole blocks are contiguous in the pool: copying them is far cheaper than gathering slots.
        b, w = table.shape
        blocks = cache.view(-1, self.block_size, self.num_kv_heads, self.head_dim)
        return blocks[table].view(b, w * self.block_size, self.num_kv_heads, self.head_dim).transpose(1, 2)

    def _sdpa(self, q, k, v, mask, causal):
        """One sequence: q [heads, n, dim], k/v [kv_heads, context, dim]. The fused CPU kernel
        takes only 4-D inputs; 3-D ones fall back to a generic path several times slower."""
        mask = None if mask is None else mask[None, None]
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=causal,
                                             scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads)
        return out[0]
