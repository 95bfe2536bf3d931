"""Attention backends, and the portable PyTorch kernels; engine.kernels picks a device's.

A backend is a prefill kernel (every prefill span of the step in one variable-length call where the
device has one; called as kernel(q, k, v, pool, scale, ctx), pool as engine.attention.Pool) and a decode kernel (every
decode of the step in one call over the paged pool).
Any device without CUDA's kernels gets the portable PyTorch kernels below, so the engine itself stays
device-agnostic."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention import dequantized_kv, read_kv
from engine.context import Context


class PerSequencePrefill:
    """One fused SDPA call per span. On CPU this is the fastest variable-length attention measured
    (README: one padded call with a mask, FlexAttention and nested tensors were 1.5x to 10x slower,
    because the fused CPU kernel skips the causal triangle only under is_causal, never under a mask)."""

    def prepare(self, ctx: Context) -> list[torch.Tensor | None]:
        masks = []
        for span in ctx.prefills:
            if span.context_slots is None:
                masks.append(None)
                continue
            n, dev = span.end - span.start, span.context_slots.device
            # A chunk after earlier context: causal, aligned to the chunk's end.
            keys = torch.arange(span.context_len, device=dev)
            masks.append((keys[None] <= torch.arange(n, device=dev)[:, None] + (span.context_len - n))[None, None])
        return masks

    def __call__(self, q, k, v, pool, scale: float, ctx: Context) -> torch.Tensor:
        out = torch.empty_like(q)
        for span, mask in zip(ctx.prefills, ctx.prefill_meta):
            if span.context_slots is None:
                kk, vv = k[span.start:span.end], v[span.start:span.end]
            else:
                kk, vv = read_kv(pool, span.context_slots, q.dtype)
            # The fused CPU kernel takes only 4-D inputs; 3-D ones fall back to a generic path.
            o = F.scaled_dot_product_attention(
                q[span.start:span.end].transpose(0, 1)[None], kk.transpose(0, 1)[None], vv.transpose(0, 1)[None],
                attn_mask=mask, is_causal=ctx.causal and mask is None, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
            out[span.start:span.end] = o[0].transpose(0, 1)
        return out


class GatherDecode:
    """Copies each decode's whole blocks out of the pool and runs one masked SDPA for the batch.
    Whole blocks are contiguous rows of the pool, so `index_select` copies them as memcpys (advanced
    indexing was 3.7x slower at 32 decodes); CUDA uses the in-place paged kernel instead."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype  # the queries': SDPA takes an additive mask only in their dtype

    def prepare(self, ctx: Context, block_size: int) -> torch.Tensor:
        lens = ctx.decode_context_lens
        keys = torch.arange(ctx.decode_block_table.shape[1] * block_size, device=lens.device)
        # An additive mask, built once per step: SDPA converts a boolean one in every layer.
        mask = torch.zeros((lens.shape[0], keys.shape[0]), dtype=self.dtype, device=lens.device)
        return mask.masked_fill_(keys[None] >= lens[:, None], float("-inf"))

    def __call__(self, layer, q, ctx: Context) -> torch.Tensor:
        table = ctx.decode_block_table
        b, w = table.shape
        # (b, w, block) then flatten, not one view to (b, w * block): a compiled graph then needs no
        # guard on w, so one graph serves every context length.
        shape = (b, w, layer.block_size, layer.num_kv_heads, layer.head_dim)
        blocks = table.flatten()
        kk, vv = (self._blocks(pool, scales, layer, blocks, q.dtype)
                  for pool, scales in ((layer.k_cache, layer.k_scale), (layer.v_cache, layer.v_scale)))
        # GQA without copying K/V: a kv head's query heads become its rows of queries.
        qd = q.view(b, layer.num_kv_heads, layer.num_heads // layer.num_kv_heads, layer.head_dim)
        od = F.scaled_dot_product_attention(qd, kk.view(shape).flatten(1, 2).transpose(1, 2),
                                            vv.view(shape).flatten(1, 2).transpose(1, 2),
                                            attn_mask=ctx.decode_meta[:, None, None, :], scale=layer.scale)
        return od.reshape(b, layer.num_heads, layer.head_dim)

    @staticmethod
    def _blocks(pool: torch.Tensor, scales: torch.Tensor | None, layer, blocks: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        """Whole blocks of the pool [len(blocks), block_size * kv_heads * head_dim] in dtype (a float8 pool's
        dequantized)."""
        per_block = layer.block_size * layer.num_kv_heads
        x = pool.view(-1, per_block, layer.head_dim).index_select(0, blocks)
        s = None if scales is None else scales.view(-1, per_block).index_select(0, blocks)
        return dequantized_kv(x, s, dtype).flatten(1)


@dataclass(slots=True)
class AttentionBackend:
    prefill: object
    decode: object

    @property
    def name(self) -> str:
        """Which kernels run, e.g. for a benchmark's table."""
        return f"{getattr(self.prefill, 'name', type(self.prefill).__name__)} + {type(self.decode).__name__}"

    @property
    def decode_is_graphable(self) -> bool:
        """The decode kernel's shapes depend only on the batch size, so a CUDA graph can replay it."""
        return getattr(self.decode, "graphable", False)

    def prepare(self, ctx: Context, block_size: int) -> None:
        """Per-step metadata, built once and shared by every layer."""
        if ctx.prefills:
            ctx.prefill_kernel, ctx.prefill_meta = self.prefill, self.prefill.prepare(ctx)
        if ctx.decode_block_table is not None:
            ctx.decode_meta = self.decode.prepare(ctx, block_size)
