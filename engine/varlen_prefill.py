"""Every prefill span of a step in one flash-attention varlen call (CUDA, fp16 / bf16).

Packed queries [tokens, heads, dim] against the packed keys of the spans' contexts, delimited by
cumulative lengths: no padding, no mask, and no tile of another sequence is ever touched (what TEI
and vLLM run). A causal span is aligned to the end of its context, as flash attention aligns a query
run shorter than its keys: a chunk after cached or earlier-computed tokens sees all of them. Keys of
such spans are read from the pool by slot, as FlexPrefill does.

torch.nn.attention.varlen changed its signature between releases (2.10 took is_causal and no scale),
so the kernel is used only if one call on the device, causal with a cached context and
bidirectional, matches SDPA (varlen_kernel)."""
import inspect
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.context import Context
from engine.transfer import to_device

log = logging.getLogger(__name__)

# attend(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale) -> [tokens, heads, dim]; k, v may have fewer heads
# (GQA: each kv head serves a group of query heads).
Attend = Callable[..., torch.Tensor]


@dataclass(slots=True)
class VarlenPrefillMeta:
    cu_q: torch.Tensor  # int32 [spans + 1]: where each span's queries start in the packed step
    cu_k: torch.Tensor  # int32 [spans + 1]: where each span's context starts in the packed keys
    max_q: int
    max_k: int
    kv_slots: torch.Tensor | None  # cache slots of the packed keys; None: the step's own k/v are the keys


class VarlenPrefill:
    def __init__(self, device: torch.device, attend: Attend):
        self.device, self._attend = device, attend

    def prepare(self, ctx: Context) -> VarlenPrefillMeta:
        spans = ctx.prefills
        q_lens = [span.end - span.start for span in spans]
        k_lens = [span.context_len for span in spans]
        cu = [to_device([0, *itertools.accumulate(lens)], self.device, torch.int32) for lens in (q_lens, k_lens)]
        return VarlenPrefillMeta(cu[0], cu[1], max(q_lens), max(k_lens), ctx.prefill_key_slots())

    def __call__(self, q, k, v, k_cache, v_cache, scale: float, ctx: Context) -> torch.Tensor:
        meta: VarlenPrefillMeta = ctx.prefill_meta
        if meta.kv_slots is not None:
            k, v = k_cache[meta.kv_slots], v_cache[meta.kv_slots]
        return self._attend(q, k, v, meta.cu_q, meta.cu_k, meta.max_q, meta.max_k, ctx.causal, scale)


def reference_attend(q, k, v, cu_q, cu_k, max_q, max_k, causal: bool, scale: float) -> torch.Tensor:
    """What the kernel must compute, one SDPA per span (the check below; tests on CPU)."""
    out = torch.empty_like(q)
    for qs, qe, ks, ke in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        n, m = qe - qs, ke - ks
        mask = torch.arange(m, device=q.device)[None] <= torch.arange(n, device=q.device)[:, None] + (m - n)
        o = F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1),
                                           v[ks:ke].transpose(0, 1), attn_mask=mask if causal else None, scale=scale,
                                           enable_gqa=k.shape[1] != q.shape[1])
        out[qs:qe] = o.transpose(0, 1)
    return out


def varlen_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> Attend | None:
    """torch's flash-attention varlen call for this device, dtype and head size, if it computes what SDPA
    does; None where it is missing, refuses the shapes or answers differently."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if not {"scale", "window_size"} <= set(inspect.signature(varlen_attn).parameters):
        return None
    return checked_attend(varlen_attn, device, dtype, head_dim)


# How GQA's fewer kv heads reach the kernel: by varlen_attn's enable_gqa (torch 2.13 has it); as they are
# (flash attention's kernel takes them; releases before the keyword pass them on unchecked, or refuse);
# as copies of each kv head for its query heads (two copies a layer).
GQA_MODES = ("keyword", "native", "copies")


def checked_attend(varlen_attn: Callable, device: torch.device, dtype: torch.dtype, head_dim: int) -> Attend | None:
    """varlen_attn called the first way (GQA_MODES) that matches SDPA on the device for MHA and GQA shapes."""
    takes_keyword = "enable_gqa" in inspect.signature(varlen_attn).parameters
    failure = "it differs from SDPA"
    for gqa in GQA_MODES[0 if takes_keyword else 1:]:
        attend = flash_attend(varlen_attn, gqa)
        try:
            if _matches_reference(attend, device, dtype, head_dim):
                return attend
        except Exception as e:  # noqa: BLE001 (any refusal means: not this way)
            failure = f"{type(e).__name__}: {e}"
    log.warning("flash-attention varlen unavailable (%s); prefill uses FlexAttention", failure)
    return None


def flash_attend(varlen_attn: Callable, gqa: str) -> Attend:
    """torch's varlen_attn as an Attend, GQA passed the GQA_MODES way (attend.gqa says which)."""
    def attend(q, k, v, cu_q, cu_k, max_q, max_k, causal: bool, scale: float) -> torch.Tensor:
        kwargs = {}
        if k.shape[1] != q.shape[1] and gqa != "native":
            if gqa == "keyword":
                kwargs = {"enable_gqa": True}
            else:
                group = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale,
                           window_size=(-1, 0) if causal else (-1, -1), **kwargs)
    attend.gqa = gqa
    return attend


def _matches_reference(attend: Attend, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    gen = torch.Generator(device=device).manual_seed(0)
    q_lens, k_lens = [5, 37, 1], [13, 37, 9]  # chunks after cached context, a whole prompt, one token
    q = torch.randn(sum(q_lens), 4, head_dim, generator=gen, device=device, dtype=dtype)
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
                  for lens in (q_lens, k_lens))
    for kv_heads, causal in itertools.product((4, 2), (True, False)):  # MHA and GQA
        k, v = (torch.randn(sum(k_lens), kv_heads, head_dim, generator=gen, device=device, dtype=dtype)
                for _ in range(2))
        args = (q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), causal, head_dim ** -0.5)
        if not torch.allclose(attend(*args).float(), reference_attend(*args).float(), atol=2e-2, rtol=2e-2):
            return False
    return True
