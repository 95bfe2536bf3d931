"""Copies checkpoint tensors into a model, fusing the stacked projections."""
from typing import Callable, Iterable

import torch
from torch import nn


def load_into(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
              rename: Callable[[str], str | None], stacked: tuple[tuple[str, str, int], ...] = ()) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        name = rename(name)
        if name is None:
            continue
        for fused, part, index in stacked:
            if f".{part}." in name:
                name = name.replace(part, fused)
                param = params[name]
                sizes = model.get_submodule(name.rsplit(".", 1)[0]).shard_sizes
                offset = sum(sizes[:index])
                param.data[offset:offset + sizes[index]].copy_(tensor)
                loaded.add(name)
                break
        else:
            if name not in params:
                continue  # e.g. rotary inv_freq buffers or pooler weights that the task does not use
            if params[name].shape != tensor.shape:
                raise ValueError(f"weight {name} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(params[name].shape)}")
            params[name].data.copy_(tensor)
            loaded.add(name)
    missing = [n for n in params if n not in loaded]
    if missing:
        raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))

