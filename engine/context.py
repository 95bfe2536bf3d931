"""Step metadata for attention, set once per step instead of threaded through every forward."""
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class PrefillSpan:
    start: int  # where the chunk's tokens sit in the packed step
    end: int
    context_slots: torch.Tensor | None = None  # cache slots of the whole context; None: the chunk is all of it
    mask: torch.Tensor | None = None  # [chunk, context] bool, causal aligned to the chunk's end


@dataclass(slots=True)
class Context:
    causal: bool = True
    prefills: list[PrefillSpan] = field(default_factory=list)
    num_prefill_tokens: int = 0
    slot_mapping: torch.Tensor | None = None  # where each packed token's K/V is written
    decode_block_table: torch.Tensor | None = None  # [batch, max_blocks] blocks of each decode, padded
    decode_mask: torch.Tensor | None = None  # [batch, 1, 1, max_blocks * block_size] True where the slot is real


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(ctx: Context) -> None:
    global _CONTEXT
    _CONTEXT = ctx
