"""One kernel up to a row count, another up to the next, and so on, in eager steps and compiled graphs alike (the
CPU's weight-only int8 and int4 layers: their kernels' time grows with the rows much faster than a float matmul's)."""
from collections.abc import Callable

import torch


def by_row_count(limits: tuple[int, ...], kernels: tuple[Callable, ...], rows: torch.Tensor, *tensors: torch.Tensor):
    """kernels[i](rows, *tensors) for the first limits[i] (ascending) the row count does not exceed; the last
    kernel (one more than the limits) above them all."""
    if not limits:
        return kernels[0](rows, *tensors)
    if torch.compiler.is_compiling():
        # In a graph a Python branch on the symbolic row count would guard it to the warm-up's side, and the
        # first step on the other side would compile again mid-serving (SmolLM2: a 26 s first token for a
        # prompt over 64 tokens); cond compiles every side into the one graph.
        return torch.cond(rows.shape[0] > limits[0], lambda *a: by_row_count(limits[1:], kernels[1:], *a),
                          kernels[0], (rows, *tensors))
    return kernels[next((i for i, most in enumerate(limits) if rows.shape[0] <= most), len(limits))](rows, *tensors)
