"""Step metadata for attention, set once per step instead of threaded through every forward."""
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(slots=True)
class PrefillSpan:
    start: int  # where the chunk's tokens sit in the packed step
    end: int
    context_len: int  # keys the chunk attends to: earlier-computed (or cached) tokens + the chunk
    context_slots: torch.Tensor | None = None  # cache slots of the whole context; None: the chunk is all of it


@dataclass(slots=True)
class Context:
    causal: bool = True
    prefills: list[PrefillSpan] = field(default_factory=list)
    num_prefill_tokens: int = 0
    slot_mapping: torch.Tensor | None = None  # where each packed token's K/V is written
    decode_block_table: torch.Tensor | None = None  # [batch, max_blocks] blocks of each decode, padded
    decode_context_lens: torch.Tensor | None = None  # [batch] int32 tokens in each decode's context
    # Rows whose hidden states the step's outputs read (sampled, pooled): the last layer computes only these past
    # its attention, and the model returns them in this order. None: every row.
    output_rows: torch.Tensor | None = None
    # Whatever the attention backend derived once for the whole step (masks, block masks), and its prefill
    # kernel, which every layer's prefill calls (inside a compiled model through an opaque op).
    prefill_meta: Any = None
    prefill_kernel: Any = None
    decode_meta: Any = None

    def prefill_key_slots(self) -> torch.Tensor | None:
        """Cache slots of every prefill span's whole context, packed in span order, for one-call prefill
        kernels; None when no span reads cached or earlier-computed keys (the step's own k/v are the keys)."""
        if all(span.context_slots is None for span in self.prefills):
            return None
        return torch.cat([span.context_slots if span.context_slots is not None
                          else self.slot_mapping[span.start:span.end] for span in self.prefills])


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(ctx: Context) -> None:
    global _CONTEXT
    _CONTEXT = ctx
