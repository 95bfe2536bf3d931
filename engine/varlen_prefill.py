"""Every prefill span of a step in one variable-length attention call (CUDA).

Packed queries [tokens, heads, dim] against the packed keys of the spans' contexts, delimited by
cumulative lengths: no padding, no mask, and no tile of another sequence is ever touched (what TEI
and vLLM run). A causal span is aligned to the end of its context, as flash attention aligns a query
run shorter than its keys: a chunk after cached or earlier-computed tokens sees all of them. Keys of
such spans are read from the pool by slot, as FlexPrefill does.

Two kernels take cumulative lengths: flash attention's (torch.nn.attention.varlen, fp16 / bf16) and the
memory-efficient one (CUTLASS; the kernel SDPA runs for float32 on CUDA, so float32 needs no FlexAttention
compiled at start-up; its float32 accuracy is checked, a TF32 kernel would not pass). Their Python entry
points changed between torch releases (2.10's varlen_attn took is_causal and no scale), so a kernel is used
only if one call on the device, causal with a cached context and bidirectional, matches SDPA
(varlen_kernel): flash first, then memory-efficient."""
import inspect
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention import read_kv
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
        self.name = f"VarlenPrefill ({getattr(attend, 'name', attend.__name__)})"

    def prepare(self, ctx: Context) -> VarlenPrefillMeta:
        spans = ctx.prefills
        q_lens = [span.end - span.start for span in spans]
        k_lens = [span.context_len for span in spans]
        cu = [to_device([0, *itertools.accumulate(lens)], self.device, torch.int32) for lens in (q_lens, k_lens)]
        return VarlenPrefillMeta(cu[0], cu[1], max(q_lens), max(k_lens), ctx.prefill_key_slots())

    def __call__(self, q, k, v, pool, scale: float, ctx: Context) -> torch.Tensor:
        meta: VarlenPrefillMeta = ctx.prefill_meta
        if meta.kv_slots is not None:
            k, v = read_kv(pool, meta.kv_slots, q.dtype)
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
    """The first variable-length kernel for this device, dtype and head size that computes what SDPA does:
    flash attention's (fp16 / bf16), else the memory-efficient one (any dtype); None where neither is there,
    refuses the shapes or answers differently."""
    if device.type != "cuda":
        return None
    candidates = []
    if dtype in (torch.float16, torch.bfloat16):
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
        if varlen_attn is not None and {"scale", "window_size"} <= set(inspect.signature(varlen_attn).parameters):
            candidates += flash_candidates(varlen_attn)
    efficient = getattr(torch.ops.aten, "_efficient_attention_forward", None)
    if efficient is not None:
        candidates.append(efficient_attend(efficient))
    return checked_attend(candidates, device, dtype, head_dim)


# How GQA's fewer kv heads reach flash attention: by varlen_attn's enable_gqa (torch 2.13 has it); as they are
# (flash attention's kernel takes them; releases before the keyword pass them on unchecked, or refuse);
# as copies of each kv head for its query heads (two copies a layer).
GQA_MODES = ("keyword", "native", "copies")


def checked_attend(candidates: list[Attend], device: torch.device, dtype: torch.dtype, head_dim: int) -> Attend | None:
    """The first candidate that matches SDPA on the device for MHA and GQA shapes."""
    failure = "no variable-length kernel in this torch"
    for attend in candidates:
        try:
            if _matches_reference(attend, device, dtype, head_dim):
                log.info("prefill attention: %s", attend.name)
                return attend
            failure = f"{attend.name} differs from SDPA"
        except Exception as e:  # noqa: BLE001 (any refusal means: not this way)
            failure = f"{attend.name}: {type(e).__name__}: {e}"
    log.warning("no variable-length attention kernel checked out (%s); prefill uses FlexAttention", failure)
    return None


def flash_candidates(varlen_attn: Callable) -> list[Attend]:
    """torch's varlen_attn called each GQA_MODES way this release can take."""
    takes_keyword = "enable_gqa" in inspect.signature(varlen_attn).parameters
    return [flash_attend(varlen_attn, gqa) for gqa in GQA_MODES[0 if takes_keyword else 1:]]


def flash_attend(varlen_attn: Callable, gqa: str) -> Attend:
    """torch's varlen_attn as an Attend, GQA passed the GQA_MODES way (attend.gqa says which)."""
    def attend(q, k, v, cu_q, cu_k, max_q, max_k, causal: bool, scale: float) -> torch.Tensor:
        kwargs = {}
        if k.shape[1] != q.shape[1] and gqa != "native":
            if gqa == "keyword":
                kwargs = {"enable_gqa": True}
            else:
                k, v = _kv_copies(q, k, v)
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale,
                           window_size=(-1, 0) if causal else (-1, -1), **kwargs)
    attend.gqa, attend.name = gqa, f"flash-attention varlen (GQA: {gqa})"
    return attend


# The memory-efficient kernel's masks (CUTLASS's CustomMaskType): none, or causal with the diagonal at the
# bottom right, so a query run shorter than its keys ends where they end.
NO_MASK, CAUSAL_FROM_BOTTOM_RIGHT = 0, 2


def efficient_attend(efficient_attention_forward: Callable) -> Attend:
    """aten::_efficient_attention_forward on one packed batch [1, tokens, heads, dim], sequences delimited by
    the cumulative lengths. It takes as many kv heads as query heads: GQA gets copies."""
    def attend(q, k, v, cu_q, cu_k, max_q, max_k, causal: bool, scale: float) -> torch.Tensor:
        if k.shape[1] != q.shape[1]:
            k, v = _kv_copies(q, k, v)
        out = efficient_attention_forward(q[None], k[None], v[None], None, cu_q, cu_k, max_q, max_k, 0.0,
                                          CAUSAL_FROM_BOTTOM_RIGHT if causal else NO_MASK, False, scale=scale)
        return out[0][0]
    attend.gqa, attend.name = "copies", "memory-efficient varlen (GQA: copies)"
    return attend


def _kv_copies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    group = q.shape[1] // k.shape[1]
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def _matches_reference(attend: Attend, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    gen = torch.Generator(device=device).manual_seed(0)
    q_lens, k_lens = [5, 37, 1], [13, 37, 9]  # chunks after cached context, a whole prompt, one token
    # Views of packed projections, as the models pass them: every token's heads in one row.
    q = torch.randn(sum(q_lens), 6, head_dim, generator=gen, device=device, dtype=dtype)[:, :4]
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
                  for lens in (q_lens, k_lens))
    # Half precision rounds to 8 or 11 bits; float32 must stay float32 (a TF32 kernel would not).
    tol = 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    for kv_heads, causal in itertools.product((4, 2), (True, False)):  # MHA and GQA
        kv = torch.randn(sum(k_lens), 2 * kv_heads + 1, head_dim, generator=gen, device=device, dtype=dtype)
        k, v = kv[:, :kv_heads], kv[:, kv_heads:2 * kv_heads]
        args = (q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), causal, head_dim ** -0.5)
        if not torch.allclose(attend(*args).float(), reference_attend(*args).float(), atol=tol, rtol=tol):
            return False
    return True
