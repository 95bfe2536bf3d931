"""A decoder layer's elementwise passes as fused C kernels on the CPU, in bf16 (engine.layer_ops' fused ops), and
an encoder layer's (add + LayerNorm, the activation by a table: engine.layer_ops.CPUEncoderLayerOps).

Op by op, a bf16 layer's norms, rotary, KV writes and gated activation are ~40 PyTorch ops on the CPU, most of
them on a decode step's few rows, where each op's dispatch costs more than its arithmetic (torch.profiler,
SmolLM2 at 32 decodes: RMSNorm alone ~110 us a call, 61 calls a step). Here each group is one call, as the Triton
kernels are on CUDA (engine.triton_layer_ops, the same semantics): residual add + RMSNorm, per-head norm + rotary
of queries and keys with the write of keys and values into the paged pool, SiLU (GELU) times up; each reads its
inputs once, computes in float32 and rounds once; rows split over OpenMP threads. Compiled on the machine
(engine.c_kernels); engine.kernels uses them where they match the PyTorch ops at start-up."""
import ctypes
import functools
import sys

import torch

from engine.attention import CacheWrite, in_whole_rows
from engine.c_kernels import BF16, E4M3, F32, I64, INT, PTR, build, pointer

MAX_ROW = sys.maxsize  # rows of any width: add_rms_norm loops over a row, holding none of it

_SOURCE = BF16 + E4M3 + r"""
#include <math.h>
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
#define WIDE __attribute__((target("prefer-vector-width=512")))  /* gcc's default for this CPU: 256-bit loops */
#else
#define WIDE
#endif

/* rows x n: res_out = bf16(x + residual) (no residual: x itself), out = bf16(res_out * rstd * (w or 1 + w)). */
WIDE void add_rms_norm(const uint16_t *x, const uint16_t *res, const uint16_t *w, uint16_t *out, uint16_t *res_out,
                       int64_t rows, int64_t n, int64_t sx, int64_t sr, int64_t so, int64_t sro, float eps,
                       int plus_one, int threads) {
    #pragma omp parallel for num_threads(threads) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        float sum = 0.0f;
        const uint16_t *src = res ? res_out + r * sro : x + r * sx;
        if (res) {
            #pragma omp simd
            for (int64_t c = 0; c < n; c++)  /* the sum rounded as an add kernel stores it */
                res_out[r * sro + c] = bf16_round(bf16_load(x[r * sx + c]) + bf16_load(res[r * sr + c]));
        }
        #pragma omp simd reduction(+:sum)
        for (int64_t c = 0; c < n; c++) sum += bf16_load(src[c]) * bf16_load(src[c]);
        const float rstd = 1.0f / sqrtf(sum / n + eps), one = plus_one ? 1.0f : 0.0f;
        #pragma omp simd
        for (int64_t c = 0; c < n; c++)
            out[r * so + c] = bf16_round(bf16_load(src[c]) * rstd * (bf16_load(w[c]) + one));
    }
}

/* A head's dim bf16 values -> e4m3 bytes and their scale, absmax / 448 (at least 1e-12 / 448), as
   engine.quantization.quantize_fp8 computes them: each value divided by the scale, clamped to 448, rounded once.
   A row with a NaN gets a NaN scale and NaN bytes, as there. */
INLINE void quantize_e4m3(const uint16_t *x, int64_t dim, uint8_t *dst, float *scale) {
    float amax = 0.0f;
    int64_t d = 0, nan = 0;
#if defined(__AVX512F__)
    __m512 top = _mm512_setzero_ps();
    __mmask16 nans = 0;
    for (; d + 16 <= dim; d += 16) {
        const __m512 v = bf16x16_load(x + d);
        top = _mm512_max_ps(top, _mm512_abs_ps(v));
        nans |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    amax = _mm512_reduce_max_ps(top), nan = nans != 0;
#endif
    for (; d < dim; d++) {  /* not fmaxf: gcc 12's aarch64 vectorizer crashes on that reduction (an ICE) */
        const float v = bf16_load(x[d]), magnitude = fabsf(v);
        amax = magnitude > amax ? magnitude : amax, nan |= v != v;  /* a NaN leaves amax (as fmaxf) and sets nan */
    }
    const float s = fmaxf(amax, 1e-12f) / 448.0f;
    *scale = nan ? NAN : s;
    if (nan) { memset(dst, 0x7f, dim); return; }
    d = 0;
#if defined(__AVX512F__)
    for (const __m512 sv = _mm512_set1_ps(s); d + 16 <= dim; d += 16) {
        const __m512 q = _mm512_div_ps(bf16x16_load(x + d), sv);
        _mm_storeu_si128((__m128i *)(dst + d), e4m3x16_round(_mm512_min_ps(_mm512_max_ps(q, _mm512_set1_ps(-448.0f)),
                                                                             _mm512_set1_ps(448.0f))));
    }
#endif
    for (; d < dim; d++) dst[d] = e4m3_round(fminf(fmaxf(bf16_load(x[d]) / s, -448.0f), 448.0f));
}

/* One token's heads [num_qk, dim] of qkv (strides st, sh): Qwen3's per-head norm where qw (query heads) / kw (key
   heads) are given, rounded as its output is, then rotated with the token's tables (sin signed for the rotated
   halves: x1 cos - x2 sin, x2 cos + x1 sin) into out [tokens, num_qk, dim]; with slots, the rotated keys and the
   values (heads num_qk.. of qkv) also go to the token's slot of the pool [slots, kv heads, dim]: bf16, or float8
   with k_scale, v_scale [slots, kv heads] (quantize_e4m3). */
void rotate_qk(const uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, const uint16_t *qw, const uint16_t *kw,
               uint16_t *out, const int64_t *slots, void *k_cache, void *v_cache, float *k_scale, float *v_scale,
               int64_t tokens, int64_t num_q, int64_t num_qk, int64_t dim, int64_t st, int64_t sh, int64_t sc,
               float eps, int threads) {
    const int64_t half = dim / 2, kv = num_qk - num_q;
    #pragma omp parallel for num_threads(threads) if (tokens > 1)
    for (int64_t t = 0; t < tokens; t++) {
        const uint16_t *c = cos + t * sc, *s = sin + t * sc;
        for (int64_t h = 0; h < num_qk; h++) {
            const uint16_t *src = qkv + t * st + h * sh;
            float x[dim], rstd = 1.0f;
            for (int64_t d = 0; d < dim; d++) x[d] = bf16_load(src[d]);
            if (qw) {
                const uint16_t *w = h < num_q ? qw : kw;
                float sum = 0.0f;
                for (int64_t d = 0; d < dim; d++) sum += x[d] * x[d];
                rstd = 1.0f / sqrtf(sum / dim + eps);
                for (int64_t d = 0; d < dim; d++) x[d] = bf16_load(bf16_round(x[d] * rstd * bf16_load(w[d])));
            }
            uint16_t *dst = out + (t * num_qk + h) * dim;
            for (int64_t d = 0; d < half; d++) {
                dst[d] = bf16_round(x[d] * bf16_load(c[d]) + x[d + half] * bf16_load(s[d]));
                dst[d + half] = bf16_round(x[d + half] * bf16_load(c[d + half]) + x[d] * bf16_load(s[d + half]));
            }
            if (slots && h >= num_q) {
                const int64_t row = slots[t] * kv + h - num_q;
                const uint16_t *value = qkv + t * st + (num_qk + h - num_q) * sh;
                if (k_scale) {
                    quantize_e4m3(dst, dim, (uint8_t *)k_cache + row * dim, k_scale + row);
                    quantize_e4m3(value, dim, (uint8_t *)v_cache + row * dim, v_scale + row);
                } else {
                    memcpy((uint16_t *)k_cache + row * dim, dst, dim * 2);
                    memcpy((uint16_t *)v_cache + row * dim, value, dim * 2);
                }
            }
        }
    }
}

/* rows x [gate | up] (n each, row stride sg) -> bf16(act(gate) * up): SiLU, or tanh-approximated GELU. With
   AVX512-BF16, 16 columns a time by vectors (libm's expf does not vectorize: a SmolLM2 decode step at 32
   sequences spent 11% of its time here). */
void gated_activation(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t n, int64_t sg, int64_t so,
                      int gelu, int threads) {
    #pragma omp parallel for num_threads(threads) if (rows * n > 32768)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = gate_up + r * sg, *u = g + n;
        int64_t c = 0;
#if defined(__AVX512BF16__)
        for (; c + 16 <= n; c += 16) {
            const __m512 x = bf16x16_load(g + c), x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
            const __m512 z = gelu ? _mm512_mul_ps(_mm512_set1_ps(2.0f * 0.7978845608028654f),
                                                  _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x)) : x;
            const __m512 act = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(
                                                 _mm512_setzero_ps(), z))));
            _mm256_storeu_si256((__m256i *)(out + r * so + c),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(act, bf16x16_load(u + c))));
        }
#endif
        for (; c < n; c++) {
            const float x = bf16_load(g[c]);
            const float z = gelu ? 2.0f * 0.7978845608028654f * (x + 0.044715f * x * x * x) : x;
            out[r * so + c] = bf16_round(x / (1.0f + expf(-z)) * bf16_load(u[c]));
        }
    }
}


/* rows x n: out = bf16(LayerNorm(bf16(x + residual)) * w + b), the sum rounded as an add kernel stores it. */
WIDE void add_layer_norm(const uint16_t *x, const uint16_t *res, const uint16_t *w, const uint16_t *b, uint16_t *out,
                    int64_t rows, int64_t n, int64_t sx, int64_t sr, int64_t so, float eps, int threads) {
    #pragma omp parallel for num_threads(threads) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        float v[n], sum = 0.0f, squares = 0.0f;
        #pragma omp simd reduction(+:sum)
        for (int64_t c = 0; c < n; c++) {
            v[c] = bf16_load(bf16_round(bf16_load(x[r * sx + c]) + bf16_load(res[r * sr + c])));
            sum += v[c];
        }
        const float mean = sum / n;
        #pragma omp simd reduction(+:squares)
        for (int64_t c = 0; c < n; c++) squares += (v[c] - mean) * (v[c] - mean);
        const float rstd = 1.0f / sqrtf(squares / n + eps);
        #pragma omp simd
        for (int64_t c = 0; c < n; c++)
            out[r * so + c] = bf16_round((v[c] - mean) * rstd * bf16_load(w[c]) + bf16_load(b[c]));
    }
}

/* out[i] = table[x[i]] over n bf16 words (out may be x): a function of one bf16 number as a table of its 65,536
   results (and one word of padding, read by the 32-bit gathers). */
void lookup_bf16(const uint16_t *x, uint16_t *out, const uint16_t *table, int64_t n, int threads) {
    #pragma omp parallel for num_threads(threads) if (n > 32768)
    for (int64_t i = 0; i < n; i += 16) {
#if defined(__AVX512F__)
        if (i + 16 <= n) {
            const __m512i at = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + i)));
            const __m512i got = _mm512_i32gather_epi32(at, (const void *)table, 2);
            _mm256_storeu_si256((__m256i *)(out + i), _mm512_cvtepi32_epi16(got));
            continue;
        }
#endif
        for (int64_t j = i; j < n && j < i + 16; j++) out[j] = table[x[j]];
    }
}
"""
_SIGNATURES = (("add_rms_norm", (PTR,) * 5 + (I64,) * 6 + (F32, INT, INT)),
               ("rotate_qk", (PTR,) * 11 + (I64,) * 7 + (F32, INT)),
               ("gated_activation", (PTR,) * 2 + (I64,) * 4 + (INT, INT)),
               ("add_layer_norm", (PTR,) * 5 + (I64,) * 5 + (F32, INT)),
               ("lookup_bf16", (PTR,) * 3 + (I64, INT)))


def library() -> ctypes.CDLL | None:
    return build("cpu_layer_ops", _SOURCE, _SIGNATURES)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 plus_one: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual) over bf16 rows [tokens, hidden]; without a residual, x is the sum."""
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    rows, n = x.shape
    if x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("add_rms_norm takes rows with contiguous columns")
    weight = weight.to(x.dtype).contiguous()  # the C code reads bf16 words
    library().add_rms_norm(x.data_ptr(), pointer(residual), weight.data_ptr(), out.data_ptr(),
                           res_out.data_ptr(), rows, n, x.stride(0), residual.stride(0) if residual is not None else 0,
                           out.stride(0), res_out.stride(0), eps, plus_one, torch.get_num_threads())
    return out, res_out


def rotate_qk(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
              q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
              cache: CacheWrite | None) -> torch.Tensor:
    """qkv [tokens, heads + 2 kv heads, dim] -> rotated queries and keys [tokens, heads + kv heads, dim]; cos, sin
    [tokens, 1, dim]; with a cache (a bf16 pool, or a float8 one with its scales), keys and values written to its
    slots too."""
    t, _, dim = qkv.shape
    num_qk = num_heads + num_kv_heads
    out = torch.empty((t, num_qk, dim), dtype=qkv.dtype)
    # The C code reads bf16 words: tables and head norms in the activations' dtype (a no-op as the model passes them).
    cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)
    q_weight, k_weight = (None if w is None else w.to(qkv.dtype).contiguous() for w in (q_weight, k_weight))
    if qkv.stride(2) != 1 or cos.stride() != sin.stride() or cos.stride(2) != 1:
        raise ValueError("rotate_qk takes heads and tables with contiguous dims")
    pool = (cache.k_cache, cache.v_cache, cache.k_scale, cache.v_scale) if cache is not None else (None,) * 4
    if cache is not None and not in_whole_rows(pool, qkv.dtype):
        raise ValueError("rotate_qk writes whole rows of a contiguous pool in the activations' dtype, or of a float8 "
                         "one with float32 scales")
    slots = cache.slots.to(torch.int64).contiguous() if cache is not None else None
    library().rotate_qk(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), pointer(q_weight), pointer(k_weight),
                        out.data_ptr(), pointer(slots), *map(pointer, pool), t,
                        num_heads, num_qk, dim, qkv.stride(0), qkv.stride(1), cos.stride(0), eps,
                        torch.get_num_threads())
    return out


def gated_activation(gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """[tokens, 2 n] bf16 (gate, up) -> act(gate) * up [tokens, n]."""
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    if gate_up.stride(1) != 1:
        raise ValueError("gated_activation takes rows with contiguous columns")
    out = torch.empty((rows, n), dtype=gate_up.dtype)
    library().gated_activation(gate_up.data_ptr(), out.data_ptr(), rows, n, gate_up.stride(0), out.stride(0), gelu,
                               torch.get_num_threads())
    return out


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """LayerNorm(x + residual) over bf16 rows [tokens, hidden], the sum rounded to bf16 first as PyTorch's add
    stores it."""
    rows, n = x.shape
    if x.stride(1) != 1 or residual.stride(1) != 1:
        raise ValueError("add_layer_norm takes rows with contiguous columns")
    out = torch.empty_like(x)
    weight, bias = (t.to(x.dtype).contiguous() for t in (weight, bias))  # the C code reads bf16 words
    library().add_layer_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(),
                             rows, n, x.stride(0), residual.stride(0), out.stride(0), eps, torch.get_num_threads())
    return out


@functools.cache  # once per function and process
def bf16_table(fn) -> torch.Tensor:
    """fn (elementwise) at every bf16 number, in bit order, as PyTorch computes it, and a word of padding."""
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return torch.cat([fn(every), every.new_zeros(1)])


def apply_elementwise(x: torch.Tensor, fn) -> torch.Tensor:
    """fn(x) for a contiguous bf16 x by a table of fn's results (bf16_table): bit for bit fn's, written over x."""
    if x.dtype != torch.bfloat16 or not x.is_contiguous():
        raise ValueError("apply_elementwise takes a contiguous bf16 tensor")
    library().lookup_bf16(x.data_ptr(), x.data_ptr(), bf16_table(fn).data_ptr(), x.numel(), torch.get_num_threads())
    return x
