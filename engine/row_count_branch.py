"""One kernel up to a row count and another above it, in eager steps and compiled graphs alike (the CPU's
weight-only int8 and int4 layers: their kernels' time grows with the rows much faster than a float matmul's)."""
from collections.abc import Callable

import torch


def by_row_count(max_rows: int, small: Callable, large: Callable, rows: torch.Tensor, *tensors: torch.Tensor):
    """small(rows, *tensors) for at most max_rows rows, else large(rows, *tensors)."""
    if torch.compiler.is_compiling():
        # In a graph a Python branch on the symbolic row count would guard it to the warm-up's side, and the
        # first step on the other side would compile again mid-serving (SmolLM2: a 26 s first token for a
        # prompt over 64 tokens); cond compiles both sides into the one graph.
        return torch.cond(rows.shape[0] > max_rows, large, small, (rows, *tensors))
    return (large if rows.shape[0] > max_rows else small)(rows, *tensors)
