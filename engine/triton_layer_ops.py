"""A decoder layer's elementwise passes as fused Triton kernels (CUDA): residual add + RMSNorm, per-head
norm + rotary of queries and keys with the write of keys and values into the KV cache, gated MLP
activation. Each reads its inputs once, computes in float32 and rounds once. engine.layer_ops calls them;
the portable PyTorch ops there say what each computes."""
import functools

import torch

from engine.attention import CacheWrite
from engine.triton_fp8 import quantize_row_halves

MAX_ROW = 16384  # widest normalized row one program holds (Llama 3.1 405B's hidden size)
ACTIVATION_BLOCK = 1024  # columns of the gated activation per program


@functools.cache  # one set of jit functions per process; Triton specialises them per shape
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def add_rms_norm(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n, eps, stride_x, stride_r, stride_o,
                     stride_ro, HAS_RESIDUAL: tl.constexpr, PLUS_ONE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            # The sum is rounded to the stream's dtype, as an add kernel stores it, and normalized from there.
            x = (x + tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32))
            x = x.to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * stride_ro + cols, x, mask=ok)
            x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        if PLUS_ONE:  # Gemma scales by 1 + w
            w = w + 1.0
        tl.store(out_ptr + row * stride_o + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def rotate_qk(qkv_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, out_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, ks_ptr,
                  vs_ptr, eps, stride_t, stride_h, stride_c, stride_ot, stride_oh, stride_cs, stride_ch, stride_ss,
                  NUM_Q: tl.constexpr,
                  NUM_QK: tl.constexpr, HEADS_P2: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr,
                  QK_NORM: tl.constexpr, STORE_KV: tl.constexpr, KV_P2: tl.constexpr, FP8_CACHE: tl.constexpr):
        # One token: all its query and key heads as a [heads, half] tile per half of the head dimension; with
        # STORE_KV its rotated keys and its values also go to its slot of the cache (FP8_CACHE: a float8 pool,
        # each kv head quantized with its own scale, as engine.attention.quantize_kv does).
        t = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, HEADS_P2)[:, None]
        d = tl.arange(0, HALF_P2)[None, :]
        ok = (h < NUM_QK) & (d < HALF)
        src = qkv_ptr + t * stride_t + h * stride_h + d
        x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
        if QK_NORM:  # Qwen3: each head RMS-normalized with the query or the key weight, rounded as its output is
            rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
            is_q = h < NUM_Q
            d_ok = d < HALF
            w1 = tl.where(is_q, tl.load(qw_ptr + d, mask=d_ok, other=0.0), tl.load(kw_ptr + d, mask=d_ok, other=0.0))
            w2 = tl.where(is_q, tl.load(qw_ptr + HALF + d, mask=d_ok, other=0.0),
                          tl.load(kw_ptr + HALF + d, mask=d_ok, other=0.0))
            x1 = (x1 * rstd * w1.to(tl.float32)).to(out_ptr.dtype.element_ty).to(tl.float32)
            x2 = (x2 * rstd * w2.to(tl.float32)).to(out_ptr.dtype.element_ty).to(tl.float32)
        # The tables' sin is signed for the rotated halves: x1 cos - x2 sin, x2 cos + x1 sin.
        d_ok = d < HALF
        c1 = tl.load(cos_ptr + t * stride_c + d, mask=d_ok, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + t * stride_c + HALF + d, mask=d_ok, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * stride_c + d, mask=d_ok, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t * stride_c + HALF + d, mask=d_ok, other=0.0).to(tl.float32)
        y1 = (x1 * c1 + x2 * s1).to(out_ptr.dtype.element_ty)
        y2 = (x2 * c2 + x1 * s2).to(out_ptr.dtype.element_ty)
        dst = out_ptr + t * stride_ot + h * stride_oh + d
        tl.store(dst, y1, mask=ok)
        tl.store(dst + HALF, y2, mask=ok)
        if STORE_KV:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            is_k = ok & (h >= NUM_Q)
            k1, k2 = y1, y2
            kv = tl.arange(0, KV_P2)[:, None]
            v_ok = (kv < NUM_QK - NUM_Q) & d_ok
            v_src = qkv_ptr + t * stride_t + (NUM_QK + kv) * stride_h + d
            v1, v2 = tl.load(v_src, mask=v_ok, other=0.0), tl.load(v_src + HALF, mask=v_ok, other=0.0)
            kv_head = tl.where(h >= NUM_Q, h - NUM_Q, 0)
            if FP8_CACHE:  # each head's row scaled by its absmax / 448, its values rounded exactly (triton_fp8)
                k1, k2, k_scale = quantize_row_halves(k1, k2)
                rows = tl.arange(0, HEADS_P2)  # the tile's heads, as a vector
                tl.store(ks_ptr + slot * stride_ss + tl.where(rows >= NUM_Q, rows - NUM_Q, 0), k_scale,
                         mask=(rows >= NUM_Q) & (rows < NUM_QK))
                v1, v2, v_scale = quantize_row_halves(v1, v2)
                v_rows = tl.arange(0, KV_P2)
                tl.store(vs_ptr + slot * stride_ss + v_rows, v_scale, mask=v_rows < NUM_QK - NUM_Q)
            k_dst = k_cache_ptr + slot * stride_cs + kv_head * stride_ch + d
            tl.store(k_dst, k1.to(k_cache_ptr.dtype.element_ty), mask=is_k)
            tl.store(k_dst + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=is_k)
            v_dst = v_cache_ptr + slot * stride_cs + kv * stride_ch + d
            tl.store(v_dst, v1.to(v_cache_ptr.dtype.element_ty), mask=v_ok)
            tl.store(v_dst + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=v_ok)

    @triton.jit
    def gated_activation(gate_up_ptr, out_ptr, n, stride_g, stride_o, GELU: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        gate = tl.load(gate_up_ptr + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * stride_g + n + cols, mask=ok, other=0.0).to(tl.float32)
        if GELU:  # tanh approximation (Gemma's): 0.5 g (1 + tanh(y)) = g sigmoid(2y)
            act = gate * tl.sigmoid(2.0 * 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate))
        else:
            act = gate * tl.sigmoid(gate)
        tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=ok)

    return add_rms_norm, rotate_qk, gated_activation


def _warps(elements: int) -> int:
    return 4 if elements <= 2048 else 8 if elements <= 8192 else 16


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 plus_one: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual) over rows [tokens, hidden]; without a residual, x is the sum."""
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    rows, n = x.shape
    if rows:
        import triton
        block = triton.next_power_of_2(n)
        _kernels()[0][(rows,)](x, residual if residual is not None else x, weight, out, res_out, n, eps,
                               x.stride(0), (residual if residual is not None else x).stride(0), out.stride(0),
                               res_out.stride(0), HAS_RESIDUAL=residual is not None, PLUS_ONE=plus_one,
                               BLOCK=block, num_warps=_warps(block))
    return out, res_out


def rotate_qk(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
              q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
              cache: CacheWrite | None) -> torch.Tensor:
    """qkv [tokens, heads + 2 kv heads, dim] -> rotated queries and keys [tokens, heads + kv heads, dim];
    cos, sin [tokens, 1, dim] (the rotary tables), q_weight / k_weight: Qwen3's per-head norms; with a cache,
    the rotated keys and the values also go to their slots there (vLLM's reshape_and_cache, in the same pass)."""
    t, _, dim = qkv.shape
    num_qk = num_heads + num_kv_heads
    out = torch.empty((t, num_qk, dim), dtype=qkv.dtype, device=qkv.device)
    if t:
        half = dim // 2
        qk_norm = q_weight is not None
        import triton
        heads_p2, half_p2 = triton.next_power_of_2(num_qk), triton.next_power_of_2(half)
        k_cache, v_cache, slots, k_scale, v_scale = cache if cache is not None else (out, out, out, None, None)
        assert k_cache.stride() == v_cache.stride() and k_cache.stride(2) == 1
        fp8 = k_scale is not None
        _kernels()[1][(t,)](qkv, cos, sin, q_weight if qk_norm else cos, k_weight if qk_norm else cos, out, slots,
                            k_cache, v_cache, k_scale if fp8 else out, v_scale if fp8 else out, eps, qkv.stride(0),
                            qkv.stride(1), cos.stride(0), out.stride(0), out.stride(1), k_cache.stride(0),
                            k_cache.stride(1), k_scale.stride(0) if fp8 else 0, NUM_Q=num_heads, NUM_QK=num_qk,
                            HEADS_P2=heads_p2, HALF=half, HALF_P2=half_p2, QK_NORM=qk_norm,
                            STORE_KV=cache is not None, KV_P2=triton.next_power_of_2(num_kv_heads),
                            FP8_CACHE=fp8,
                            num_warps=_warps(heads_p2 * half_p2))
    return out


def gated_activation(gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """[tokens, 2 n] (gate, up) -> act(gate) * up [tokens, n]."""
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        _kernels()[2][(rows, -(-n // ACTIVATION_BLOCK))](gate_up, out, n, gate_up.stride(0), out.stride(0), GELU=gelu,
                                                          BLOCK=ACTIVATION_BLOCK, num_warps=4)
    return out
