"""Prefill steps padded to a few token counts on the CPU, so that each count's matrix products are built once.

oneDNN builds (JIT-compiles) a product for every new shape it is given, and a step's token count is the row count
of every linear layer: each prefill step of a new count paid that again for each layer shape (~1-8 ms a shape;
all-MiniLM-L6-v2 in bf16 on a 2-core AMX Xeon: 12-15% of the time to embed documents not seen before). Padded up
to one of eight sizes an octave (the engine's max_num_batched_tokens the largest), counts repeat and each product
is built once per size, for at most an eighth more rows a step. Padding tokens (id 0) form spans of
their own, or in a step with decodes are decodes of their own, their keys and values written to the pool's
scratch block: rows never mix outside attention and no output reads them. All-decode steps keep their count (at
most max_num_seqs counts, each built once)."""
import torch

from engine.context import Context, PrefillSpan

PADDING_SPAN = 64  # tokens a padding span holds at most (and max_model_len): attention among them stays small


def padded_size(tokens: int, most: int) -> int:
    """tokens rounded up to one of eight sizes an octave (a multiple of 8 up to 64), at most `most`."""
    step = 8 if tokens <= 64 else 1 << (tokens.bit_length() - 4)
    return max(tokens, min(-(-tokens // step) * step, most))


def pad_context(ctx: Context, size: int, span: int, scratch_block: int, block_size: int) -> None:
    """A step (not all decodes) extended to `size` tokens (none where that is not more than it has): a step of
    prefills only by padding spans of `span` tokens; a step with decodes, which sit last, by padding decodes, each
    reading one key of the scratch block. With a pool, padding tokens write their keys and values to the scratch
    block."""
    table = ctx.decode_block_table
    tokens = ctx.num_prefill_tokens + (0 if table is None else table.shape[0])
    if size <= tokens:
        return
    if table is not None:
        ctx.decode_block_table = torch.cat([table, table.new_full((size - tokens, table.shape[1]), scratch_block)])
        ctx.decode_context_lens = torch.cat([ctx.decode_context_lens, ctx.decode_context_lens.new_ones(size - tokens)])
    else:
        for start in range(tokens, size, span):
            end = min(start + span, size)
            ctx.prefills.append(PrefillSpan(start, end, end - start))
        ctx.num_prefill_tokens = size
    if ctx.slot_mapping is not None:
        scratch = torch.arange(size - tokens, device=ctx.slot_mapping.device) % block_size + scratch_block * block_size
        ctx.slot_mapping = torch.cat([ctx.slot_mapping, scratch])


def pad_inputs(size: int, span: int, input_ids: torch.Tensor, positions: torch.Tensor,
               token_types: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A step's token ids, positions and token types up to `size` tokens: padding tokens are id 0, type 0, at their
    place in their padding span of `span` tokens (inside the model's positions)."""
    pad = size - input_ids.shape[0]
    zeros = input_ids.new_zeros(pad)
    positions = torch.cat([positions, torch.arange(pad, device=positions.device) % span])
    return (torch.cat([input_ids, zeros]), positions,
            None if token_types is None else torch.cat([token_types, zeros.to(token_types.dtype)]))
