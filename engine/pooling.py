"""Pooling as segment operations over the packed step: one gather or one index_add for every
sequence that finishes, never a loop over sequences."""
import torch

POOLING_METHODS = ("cls", "mean", "last")


def pool_segments(hidden: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, method: str,
                  num_rows: int | None = None) -> torch.Tensor:
    """hidden [tokens, dim]; starts/ends [segments] (end exclusive) -> [segments, dim].
    Means are summed in float32, as a per-sequence `mean` in float32 would be. num_rows, the sum of the
    segments' lengths, spares a GPU the wait for it to be read back."""
    if method == "cls":
        return hidden[starts]
    if method == "last":
        return hidden[ends - 1]
    if method != "mean":
        raise ValueError(f"pooling must be one of {', '.join(POOLING_METHODS)}, got {method!r}")
    lengths = ends - starts
    segment = torch.arange(len(starts), device=hidden.device).repeat_interleave(lengths, output_size=num_rows)
    offsets = lengths.cumsum(0) - lengths  # where each segment starts among the gathered rows
    rows = torch.arange(len(segment), device=hidden.device) - offsets[segment] + starts[segment]
    sums = torch.zeros(len(starts), hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, segment, hidden[rows].float())
    return sums / lengths.unsqueeze(1).to(torch.float32)
