"""Every prefill span of a step in one FlexAttention call (CUDA).

The step's tokens stay packed, no padding: queries [1, heads, tokens, dim] against the packed keys of
the spans' contexts, with a document mask (a query sees only its own sequence's keys, causally by
absolute position). The block mask is built from the span boundaries with tensor ops: each query
tile lists the contiguous range of key tiles its sequences span, so tiles of other sequences are
skipped, not masked."""
from dataclasses import dataclass

import torch

from engine.attention import read_kv
from engine.context import Context
from engine.transfer import to_device

TILE = 128  # FlexAttention's default block size for queries and keys


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(slots=True)
class FlexPrefillMeta:
    block_mask: object
    kv_slots: torch.Tensor | None  # cache slots of the packed keys; None: the step's own k/v are the keys


class FlexPrefill:
    def __init__(self, device: torch.device, compile: bool = True):
        from torch.nn.attention.flex_attention import flex_attention
        self.device = device
        # Compiled, FlexAttention is a fused kernel; eager it is a reference (tests on CPU use that).
        self._flex = torch.compile(flex_attention, dynamic=True) if compile else flex_attention

    def prepare(self, ctx: Context) -> FlexPrefillMeta:
        from torch.nn.attention.flex_attention import BlockMask
        spans = ctx.prefills
        dev = self.device
        t, s = spans[-1].end - spans[0].start, sum(span.context_len for span in spans)  # no device sync
        q_lens = to_device([span.end - span.start for span in spans], dev)
        kv_lens = to_device([span.context_len for span in spans], dev)
        kv_slots = ctx.prefill_key_slots()
        docs = torch.arange(len(spans), device=dev)
        q_doc, kv_doc = docs.repeat_interleave(q_lens, output_size=t), docs.repeat_interleave(kv_lens, output_size=s)
        q_start, kv_start = q_lens.cumsum(0) - q_lens, kv_lens.cumsum(0) - kv_lens
        # Absolute positions: a chunk's first query sits after its context's earlier keys.
        q_pos = torch.arange(t, device=dev) - q_start[q_doc] + (kv_lens - q_lens)[q_doc]
        kv_pos = torch.arange(s, device=dev) - kv_start[kv_doc]
        causal = ctx.causal

        def document_mask(b, h, q_idx, kv_idx):
            same = q_doc[q_idx] == kv_doc[kv_idx]
            return same & (kv_pos[kv_idx] <= q_pos[q_idx]) if causal else same

        # Key tiles each query tile needs: from its first sequence's first key to its last query's last key.
        nq, nk = -(-t // TILE), -(-s // TILE)
        first = torch.arange(nq, device=dev) * TILE
        last = torch.clamp(first + TILE, max=t) - 1
        lo = kv_start[q_doc[first]] // TILE
        end_key = kv_start[q_doc[last]] + (q_pos[last] + 1 if causal else kv_lens[q_doc[last]])
        count = -(-end_key // TILE) - lo
        indices = torch.clamp(lo[:, None] + torch.arange(nk, device=dev)[None], max=nk - 1)
        block_mask = BlockMask.from_kv_blocks(count.int()[None, None], indices.int()[None, None],
                                              BLOCK_SIZE=TILE, mask_mod=document_mask, seq_lengths=(t, s))
        return FlexPrefillMeta(block_mask, kv_slots)

    def __call__(self, q, k, v, pool, scale: float, ctx: Context) -> torch.Tensor:
        meta: FlexPrefillMeta = ctx.prefill_meta
        if meta.kv_slots is not None:
            k, v = read_kv(pool, meta.kv_slots, q.dtype)
        out = self._flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                         block_mask=meta.block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
        return out[0].transpose(0, 1)
