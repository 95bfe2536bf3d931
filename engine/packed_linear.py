"""Linear layers on the CPU through oneDNN, each weight packed once into oneDNN's blocked layout.

`F.linear` on a CPU runs each call's matrix product against the plain row-major weight; oneDNN's kernels
with the weight reordered once at load run the same product faster at every row count, most of all at the
few rows of a decode step, which is bound by reading the weights (AMD EPYC, 2 cores, AVX512-BF16: a
576 x 3072 bf16 product 1.5-2.2x faster at 1-32 rows, 5-15% at 256-2,048; float32 1.2-3x; DRAM read
~30 GB/s, `F.linear` over SmolLM2's bf16 weights at batch 1 ~13 GB/s, packed ~20 GB/s). In bf16 the
results are bit for bit `F.linear`'s; in float32 they differ by the order of the sums (~1e-6 relative).
This is inductor's own CPU weight prepacking (its freezing pass), done here for eager steps too.

The packed weight is an opaque mkldnn tensor: a compiled model (torch_compile) calls the product as one
opaque op, and the few readers of a weight (the yes/no head's rows, taken once at start-up, a state_dict)
get it unpacked."""
import ctypes
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.opaque_op import opaque_op


def _packed_product(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor],
                    out_features: int) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


# Inductor has no lowering for an mkldnn weight as a graph input: inside a compiled graph the product is one
# opaque op, which inductor calls as it is.
_packed_product_op = opaque_op("packed_linear", _packed_product,
                               lambda x, packed, bias, out_features: x.new_empty(*x.shape[:-1], out_features))


class PackedLinear(nn.Module):
    """nn.Linear's product with the weight held packed (the unpacked one is not kept)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
        self.bias = bias

    @property
    def weight(self) -> torch.Tensor:
        """The weight, unpacked: a copy, for the rare reader (the yes/no head's rows at start-up, state_dict())."""
        return self.packed.to_dense()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # nn.Linear's keys, so a packed model's state_dict() still holds every weight.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_product_op(x, self.packed, self.bias, self.out_features)


def pack_linears(model: nn.Module, logits_head: bool) -> None:
    """Replaces every nn.Linear of the model by its packed form, in place; with logits_head a decoder whose
    logits head is its input embedding table (tied) gets a packed copy of its own as lm_head (the table
    stays for the lookup: one row per token), as quantization does."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                packed = PackedLinear(child.weight.data, child.bias)
                if hasattr(child, "shard_sizes"):  # a fused q/k/v or gate/up layer's parts, as the loader stacked them
                    packed.shard_sizes = child.shard_sizes
                setattr(parent, name, packed)
    if logits_head and getattr(model, "is_decoder", False) and getattr(model, "lm_head", None) is None:
        model.lm_head = PackedLinear(model.output_embeddings().data, None)
    _return_freed_memory()


def _return_freed_memory() -> None:
    """The unpacked weights are freed, but glibc keeps freed heap pages in the process until trimmed (SmolLM2 in
    float32: resident memory +520 MB over the unpacked model, +119 MB trimmed: its packed logits head)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError, TypeError):  # not glibc (TypeError: Windows has no process handle): no trim
        pass


@functools.cache
def packing_checks_out(dtype: torch.dtype) -> bool:
    """oneDNN is there and its packed product gives F.linear's results (to the dtype's rounding), with and
    without a bias, for one row and for several: elsewhere (a CPU without it, a build that refuses the
    dtype) layers keep F.linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 40, generator=gen).to(dtype), torch.randn(48, generator=gen).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    try:
        for b in (None, bias):
            layer = PackedLinear(weight, b)
            for rows in (1, 5):
                x = torch.randn(rows, 40, generator=gen).to(dtype)
                if not torch.allclose(layer(x).float(), F.linear(x, weight, b).float(), atol=tol, rtol=tol):
                    return False
    except Exception:  # noqa: BLE001 (any refusal: F.linear stays)
        return False
    return True
