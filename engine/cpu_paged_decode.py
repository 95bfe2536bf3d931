"""Decode attention read in place from the paged pool on the CPU: a small C kernel, compiled on the machine.

PyTorch has no CPU kernel that reads keys through a block table, so the portable decode (GatherDecode) copies
every decode's whole blocks into a dense batch and runs one masked SDPA over it: at 32 SmolLM2 decodes of ~140
tokens the copies and the padded attention were ~30% of a bf16 step on a 2-core Xeon (README). Here one OpenMP task per
sequence (where sequences are few, per stretch of whole blocks of a context, merged after) walks its context
through the block table: each block's keys are read once from the pool and multiplied with their kv head's query
rows (GQA without copies), then the softmax, then the values are read block by block: no copy, no padding. float32
and bfloat16 pools (the CPU's serving dtypes), products and softmax in float32, the output rounded once; AVX-512
vectors for float32, and for bf16 where the CPU has AVX512-BF16 (head sizes of 32s), portable loops elsewhere. A
float8 pool (kv_cache_dtype fp8) is read a block at a time, widened into the serving dtype in the task's scratch
(the numbers a float pool of its dequantized values holds): the block gather widened the whole batch's contexts
every layer, 5-10x the bf16 pool's step (README).

The C source is compiled on the machine (engine.c_kernels); where no compiler builds it or the kernel does not
match dense attention at start-up, the engine keeps GatherDecode."""
import ctypes
import functools
import itertools
import logging

import torch

from engine.attention import dequantized_kv, in_whole_rows, quantize_kv
from engine.c_kernels import BF16, E4M3, F32, I64, INT, PTR, build, pointer
from engine.context import Context
from engine.opaque_op import opaque_op
from engine.quantization import FP8

log = logging.getLogger(__name__)

_SOURCE = BF16 + E4M3 + r"""
#include <math.h>
#include <stdlib.h>

/* Rows of the serving dtype to float32 and back: bf16 (is_bf16, 16-bit words) or float32. */
INLINE void load_row(const void *src, int64_t i, float *dst, int64_t n, int is_bf16) {
    if (is_bf16) {
        const uint16_t *s = (const uint16_t *)src + i;
        #pragma omp simd
        for (int64_t x = 0; x < n; x++) dst[x] = bf16_load(s[x]);
    } else {
        memcpy(dst, (const float *)src + i, sizeof(float) * n);
    }
}

INLINE void store_row(void *dst, int64_t i, const float *src, int64_t n, float times, int is_bf16) {
    for (int64_t x = 0; x < n; x++) {
        if (is_bf16) ((uint16_t *)dst)[i + x] = bf16_round(src[x] * times);
        else ((float *)dst)[i + x] = src[x] * times;
    }
}

INLINE void prefetch_block(const void *start, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char *)start + b);
}

/* rows float8 rows of dim (src), each times its scale -> the serving dtype (dst): the product in float32, rounded
   once, as engine.attention.dequantized_kv computes it, so the kernel reads the numbers a float pool would hold. */
INLINE void widen_rows(const uint8_t *src, const float *scales, int64_t rows, int64_t dim, void *dst, int is_bf16) {
#if defined(__AVX512BF16__)
    const int vectors = 1;
#elif defined(__AVX512F__)
    const int vectors = !is_bf16;  /* bf16 rounding by vector needs AVX512-BF16 (and so does the bf16 decode) */
#endif
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *x = src + r * dim;
        int64_t d = 0;
#if defined(__AVX512F__)
        for (; vectors && d + 32 <= dim; d += 32) {
            __m512 lo, hi;
            e4m3x32_widen(x + d, scales[r], &lo, &hi);
#if defined(__AVX512BF16__)
            if (is_bf16) {  /* no subnormal products: a scale is at least 1e-12 / 448 */
                _mm512_storeu_si512((uint16_t *)dst + r * dim + d, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
                continue;
            }
#endif
            _mm512_storeu_ps((float *)dst + r * dim + d, lo);
            _mm512_storeu_ps((float *)dst + r * dim + d + 16, hi);
        }
#endif
        for (; d < dim; d++) {
            const float f = e4m3_value(x[d]) * scales[r];
            if (is_bf16) ((uint16_t *)dst)[r * dim + d] = bf16_round(f);
            else ((float *)dst)[r * dim + d] = f;
        }
    }
}

/* A task: a stretch of one sequence's context (len slots from the first of its blocks), all its kv heads and
   their query heads (group each), rows of them; p [rows, len] the scores, then the softmax weights; acc [rows,
   dim] the weighted values. A task reads whole blocks: each is one contiguous run of the pool. A float8 pool
   (k_scale, v_scale: a float32 scale per slot and kv head; else NULL) is read a block at a time, widened into
   the task's scratch block of the serving dtype (widened). */
typedef struct {
    const void *q, *k, *v;
    const float *k_scale, *v_scale;
    const int64_t *blocks;
    int64_t q_row, q_h, len, block_size, slot_stride, kv_heads, group, rows, bytes;
    float scale, *p, *acc;
    void *widened;
} Task;

/* The block holding context slot start as rows of the serving dtype (the pool's own, or a float8 block widened),
   and how many of its slots hold context (n); the next block prefetched: blocks are scattered through the pool, so
   the hardware's stride prefetchers lose the stream at each block's end. */
INLINE const char *block_at(const Task *t, const void *pool, const float *scales, int64_t start, int64_t *n) {
    const int64_t block = start / t->block_size, elements = t->block_size * t->slot_stride;
    const int64_t bytes = scales ? 1 : t->bytes, slots = t->block_size * t->kv_heads;
    *n = t->len - start < t->block_size ? t->len - start : t->block_size;
    if (start + t->block_size < t->len) {
        prefetch_block((const char *)pool + t->blocks[block + 1] * elements * bytes, elements * bytes);
        if (scales) prefetch_block(scales + t->blocks[block + 1] * slots, sizeof(float) * slots);
    }
    const char *rows = (const char *)pool + t->blocks[block] * elements * bytes;
    if (!scales) return rows;
    widen_rows((const uint8_t *)rows, scales + t->blocks[block] * slots, *n * t->kv_heads,
               t->slot_stride / t->kv_heads, t->widened, t->bytes == 2);
    return t->widened;
}

/* Each block of the task's stretch: src its first slot's row in the serving dtype, n its slots of context. */
#define FOR_EACH_BLOCK(pool, scales)                                                                           \
    for (int64_t start = 0, n; start < len && (src = block_at(t, pool, scales, start, &n)); start += block_size)

#define TASK_FIELDS(t)                                                                                          \
    const int64_t len = t->len, block_size = t->block_size, slot_stride = t->slot_stride, rows = t->rows;      \
    const int64_t group = t->group;                                                                             \
    const char *src;                                                                                            \
    float *p = t->p, *acc = t->acc

/* Portable: rows converted to float32 (slot: a slot's kv heads, kv_heads * dim scratch), then products. */
INLINE void scores(const Task *t, const int64_t dim, int is_bf16, float *qf, float *slot) {
    TASK_FIELDS(t);
    for (int64_t r = 0; r < rows; r++) {
        load_row(t->q, t->q_row + r * t->q_h, qf + r * dim, dim, is_bf16);
        for (int64_t d = 0; d < dim; d++) qf[r * dim + d] *= t->scale;
    }
    FOR_EACH_BLOCK(t->k, t->k_scale)
        for (int64_t i = 0; i < n; i++) {
            load_row(src, i * slot_stride, slot, slot_stride, is_bf16);
            for (int64_t r = 0; r < rows; r++) {
                const float *key = slot + r / group * dim, *qr = qf + r * dim;
                float dot = 0.0f;
                #pragma omp simd reduction(+:dot)
                for (int64_t d = 0; d < dim; d++) dot += qr[d] * key[d];
                p[r * len + start + i] = dot;
            }
        }
}

INLINE void weighted_values(const Task *t, const int64_t dim, int is_bf16, float *slot) {
    TASK_FIELDS(t);
    memset(acc, 0, sizeof(float) * rows * dim);
    FOR_EACH_BLOCK(t->v, t->v_scale)
        for (int64_t i = 0; i < n; i++) {
            load_row(src, i * slot_stride, slot, slot_stride, is_bf16);
            for (int64_t r = 0; r < rows; r++) {
                const float w = p[r * len + start + i], *value = slot + r / group * dim;
                float *ar = acc + r * dim;
                #pragma omp simd
                for (int64_t d = 0; d < dim; d++) ar[d] += w * value[d];
            }
        }
}

#if defined(__AVX512F__)
/* A query row's products with one key row: bf16 pairs summed in float32 by AVX512-BF16 (keys never converted),
   or float32 by fused multiply-adds; dim a multiple of 32. */
INLINE __m512 dot_avx512(const void *q, const void *k, const int64_t dim, int is_bf16) {
    __m512 sum = _mm512_setzero_ps();
#if defined(__AVX512BF16__)
    if (is_bf16) {
        for (int64_t d = 0; d < dim; d += 32)
            sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512((const uint16_t *)q + d),
                                   (__m512bh)_mm512_loadu_si512((const uint16_t *)k + d));
        return sum;
    }
#endif
    for (int64_t d = 0; d < dim; d += 16)
        sum = _mm512_fmadd_ps(_mm512_loadu_ps((const float *)q + d), _mm512_loadu_ps((const float *)k + d), sum);
    return sum;
}

/* 32 columns of a value row in float32: bf16 widened, or float32 as it is. */
INLINE void value_avx512(const void *v, int64_t i, int is_bf16, __m512 *lo, __m512 *hi) {
    if (is_bf16) {
        const __m512i words = _mm512_loadu_si512((const uint16_t *)v + i);
        *lo = bf16_to_f32(_mm512_castsi512_si256(words));
        *hi = bf16_to_f32(_mm512_extracti64x4_epi64(words, 1));
    } else {
        *lo = _mm512_loadu_ps((const float *)v + i);
        *hi = _mm512_loadu_ps((const float *)v + i + 16);
    }
}

/* AVX-512 (bf16 pools with AVX512-BF16 only), dim a multiple of 32: 16 slots' scores at a time for each query
   row, their sums added across lanes together (sum16). */
INLINE void scores_avx512(const Task *t, const int64_t dim, int is_bf16) {
    TASK_FIELDS(t);
    FOR_EACH_BLOCK(t->k, t->k_scale)
        for (int64_t i0 = 0; i0 < n; i0 += 16) {
            const int64_t m = n - i0 < 16 ? n - i0 : 16;
            for (int64_t r = 0; r < rows; r++) {
                const char *qr = (const char *)t->q + (t->q_row + r * t->q_h) * t->bytes;
                const char *kr = src + (i0 * slot_stride + r / group * dim) * t->bytes;
                __m512 dots[16];
                for (int j = 0; j < 16; j++)
                    dots[SUM16_SLOT[j]] = j < m ? dot_avx512(qr, kr + j * slot_stride * t->bytes, dim, is_bf16)
                                                : _mm512_setzero_ps();
                _mm512_mask_storeu_ps(p + r * len + start + i0, first_lanes(m),
                                      _mm512_mul_ps(sum16(dots), _mm512_set1_ps(t->scale)));
            }
        }
}

/* Each row's scores -> e^(score - the row's max), 16 at a time; top[r]: the max, total[r]: their sum. */
INLINE void exp_rows_avx512(float *p, int64_t rows, int64_t len, float *top_out, float *total) {
    for (int64_t r = 0; r < rows; r++) {
        float *pr = p + r * len;
        __m512 top = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int64_t i = 0; i < len; i += 16)
            top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, first_lanes(len - i), pr + i));
        top_out[r] = _mm512_reduce_max_ps(top);
        const __m512 max = _mm512_set1_ps(top_out[r]);
        for (int64_t i = 0; i < len; i += 16) {
            const __mmask16 lanes = first_lanes(len - i);
            const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, pr + i), max));
            _mm512_mask_storeu_ps(pr + i, lanes, e);
            sum = _mm512_mask_add_ps(sum, lanes, sum, e);
        }
        total[r] = _mm512_reduce_add_ps(sum);
    }
}

INLINE void weighted_values_avx512(const Task *t, const int64_t dim, int is_bf16) {
    TASK_FIELDS(t);
    memset(acc, 0, sizeof(float) * rows * dim);
    /* Blocks outermost: each is read from memory once (a walk of the whole stretch per kv head and 32 columns
       read it from memory as often where the stretch outgrew the caches). */
    FOR_EACH_BLOCK(t->v, t->v_scale)
        for (int64_t r0 = 0, nr; r0 < rows; r0 += nr) {  /* up to 4 query rows of one kv head at a time */
            const int64_t kv = r0 / group;
            nr = (kv + 1) * group - r0 < 4 ? (kv + 1) * group - r0 : 4;
            for (int64_t c = 0; c < dim; c += 32) {
                __m512 lo[4], hi[4];
                for (int64_t j = 0; j < nr; j++) {
                    lo[j] = _mm512_loadu_ps(acc + (r0 + j) * dim + c);
                    hi[j] = _mm512_loadu_ps(acc + (r0 + j) * dim + c + 16);
                }
                for (int64_t i = 0; i < n; i++) {
                    __m512 a, b;
                    value_avx512(src, i * slot_stride + kv * dim + c, is_bf16, &a, &b);
                    for (int64_t j = 0; j < nr; j++) {
                        const __m512 w = _mm512_set1_ps(p[(r0 + j) * len + start + i]);
                        lo[j] = _mm512_fmadd_ps(w, a, lo[j]);
                        hi[j] = _mm512_fmadd_ps(w, b, hi[j]);
                    }
                }
                for (int64_t j = 0; j < nr; j++) {
                    _mm512_storeu_ps(acc + (r0 + j) * dim + c, lo[j]);
                    _mm512_storeu_ps(acc + (r0 + j) * dim + c + 16, hi[j]);
                }
            }
        }
}
#endif

/* Each row's scores -> e^(score - the row's max); top[r]: the max, total[r]: their sum. */
INLINE void exp_rows(float *p, int64_t rows, int64_t len, float *top, float *total) {
    for (int64_t r = 0; r < rows; r++) {
        float *pr = p + r * len;
        top[r] = -INFINITY, total[r] = 0.0f;
        for (int64_t i = 0; i < len; i++) top[r] = fmaxf(top[r], pr[i]);
        for (int64_t i = 0; i < len; i++) total[r] += pr[i] = expf(pr[i] - top[r]);
    }
}

/* The task's rows of attention, not yet normalized: acc (set here, in work), and each row's top score and sum of
   e^(score - top). dim is a constant where the caller names one, so the head loops unroll into whole vectors.
   work: scratch, rows * (2 * dim + len + 2) + kv_heads * dim floats. */
INLINE void attend(Task *t, const int64_t dim, int is_bf16, float *work, float *top, float *total) {
    const int64_t rows = t->rows, len = t->len;
    float *qf = work, *slot = qf + rows * dim;
    t->acc = slot + t->kv_heads * dim;
    t->p = t->acc + rows * dim;
#if defined(__AVX512BF16__)
    const int fast = dim % 32 == 0;
#elif defined(__AVX512F__)
    const int fast = !is_bf16 && dim % 32 == 0;
#else
    const int fast = 0;  /* no vector paths compiled: their calls below are never taken, and must not be undeclared */
#define scores_avx512(t, dim, is_bf16) ((void)0)
#define exp_rows_avx512(p, rows, len, top, total) ((void)0)
#define weighted_values_avx512(t, dim, is_bf16) ((void)0)
#endif
    if (fast) scores_avx512(t, dim, is_bf16); else scores(t, dim, is_bf16, qf, slot);
    if (fast) exp_rows_avx512(t->p, rows, len, top, total); else exp_rows(t->p, rows, len, top, total);
    if (fast) weighted_values_avx512(t, dim, is_bf16); else weighted_values(t, dim, is_bf16, slot);
}

/* q [batch, heads, dim] (strides q_b, q_h; dim contiguous); k, v: the pool [slots, kv_heads, dim] contiguous,
   in the queries' dtype, or float8 with k_scale, v_scale [slots, kv_heads] (else NULL); table [batch,
   table_stride] int64 blocks; lens [batch] int32 context lengths; out [batch, heads, dim] contiguous. Each
   sequence's context in `splits` stretches of whole blocks, a task each (more than one where sequences are too
   few to keep the threads busy), their rows merged after by their tops: a task reads whole blocks (a task per kv
   head read 1/kv_heads of each slot, scattered: 3-5x slower from DRAM). */
INLINE void paged_decode(const void *q, const void *k, const void *v, const float *k_scale, const float *v_scale,
                         const int64_t *table, const int32_t *lens, void *out, int64_t batch, int64_t heads,
                         int64_t kv_heads, int64_t dim, int64_t block_size, int64_t q_b, int64_t q_h,
                         int64_t table_stride, float scale, int64_t splits, int threads, int is_bf16) {
    /* Where contexts are split, each task's rows to merge: acc [heads, dim], then top [heads] and total [heads]. */
    const int64_t part = heads * (dim + 2);
    float *parts = splits > 1 ? malloc(sizeof(float) * batch * splits * part) : NULL;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < batch * splits; task++) {
            const int64_t s = task / splits, len = lens[s];
            const int64_t stretch = ((len + splits - 1) / splits + block_size - 1) / block_size * block_size;
            const int64_t from = task % splits * stretch, n = len - from < stretch ? len - from : stretch;
            float *rows = parts ? parts + task * part : NULL;
            if (n <= 0) {  /* a stretch past a short context (split contexts only): nothing in the merge */
                memset(rows, 0, sizeof(float) * part);  /* acc and total 0 */
                for (int64_t r = 0; r < heads; r++) rows[heads * dim + r] = -INFINITY;  /* top */
                continue;
            }
            const int64_t widened = k_scale ? block_size * kv_heads * dim : 0;  /* floats: room for either dtype */
            float *work = malloc(sizeof(float) * (heads * (2 * dim + n + 2) + kv_heads * dim + widened));
            float *top = work + heads * (2 * dim + n) + kv_heads * dim, *total = top + heads;  /* after attend's */
            Task t = {q, k, v, k_scale, v_scale, table + s * table_stride + from / block_size, s * q_b, q_h, n,
                      block_size, kv_heads * dim, kv_heads, heads / kv_heads, heads, is_bf16 ? 2 : 4, scale, NULL,
                      NULL, total + heads};
            if (dim == 64) attend(&t, 64, is_bf16, work, top, total);
            else if (dim == 128) attend(&t, 128, is_bf16, work, top, total);
            else attend(&t, dim, is_bf16, work, top, total);
            if (rows) {
                memcpy(rows, t.acc, sizeof(float) * heads * dim);
                memcpy(rows + heads * dim, top, sizeof(float) * 2 * heads);  /* top, then total */
            } else {  /* the whole context: normalized here */
                for (int64_t r = 0; r < heads; r++)
                    store_row(out, (s * heads + r) * dim, t.acc + r * dim, dim, 1.0f / total[r], is_bf16);
            }
            free(work);
        }
        if (parts) {
            #pragma omp for
            for (int64_t row = 0; row < batch * heads; row++) {  /* a sequence's stretches: rescaled to one top */
                const int64_t s = row / heads, r = row % heads;
                const float *first = parts + s * splits * part;
                float top = -INFINITY, total = 0.0f, acc[dim];
                for (int64_t i = 0; i < splits; i++) top = fmaxf(top, first[i * part + heads * dim + r]);
                memset(acc, 0, sizeof(float) * dim);
                for (int64_t i = 0; i < splits; i++) {
                    const float *rows = first + i * part, w = expf(rows[heads * dim + r] - top);
                    total += w * rows[heads * dim + heads + r];
                    for (int64_t d = 0; d < dim; d++) acc[d] += w * rows[r * dim + d];
                }
                store_row(out, row * dim, acc, dim, 1.0f / total, is_bf16);
            }
        }
    }
    free(parts);
}

#define ENTRY(NAME, IS_BF16)                                                                                    \
    void NAME(const void *q, const void *k, const void *v, const float *k_scale, const float *v_scale,        \
              const int64_t *table, const int32_t *lens, void *out, int64_t batch, int64_t heads,              \
              int64_t kv_heads, int64_t dim, int64_t block_size, int64_t q_b, int64_t q_h, int64_t table_stride, \
              float scale, int64_t splits, int threads) {                                                       \
        paged_decode(q, k, v, k_scale, v_scale, table, lens, out, batch, heads, kv_heads, dim, block_size, q_b, q_h, \
                     table_stride, scale, splits, threads, IS_BF16);                                           \
    }
ENTRY(paged_decode_f32, 0)
ENTRY(paged_decode_bf16, 1)
"""
_ENTRY = {torch.float32: "paged_decode_f32", torch.bfloat16: "paged_decode_bf16"}
_SIGNATURE = (PTR,) * 8 + (I64,) * 8 + (F32, I64, INT)


def library() -> ctypes.CDLL | None:
    """The compiled kernel (engine.c_kernels); None where it does not build."""
    return build("cpu_paged_decode", _SOURCE, tuple((name, _SIGNATURE) for name in _ENTRY.values()))


def _paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                  v_scale: torch.Tensor | None, table: torch.Tensor, lens: torch.Tensor, scale: float,
                  block_size: int) -> torch.Tensor:
    """q [batch, heads, dim]; the pool's views [slots, kv_heads, dim] (a float8 pool's scales [slots, kv_heads],
    else None); table [batch, width] int64 blocks; lens [batch] int32 -> [batch, heads, dim]. A task per sequence;
    with fewer sequences than two per thread, each context in stretches, a task each, to keep the threads busy."""
    threads, batch = torch.get_num_threads(), q.shape[0]
    return launch(q, k_cache, v_cache, table, lens, scale, block_size, -(-2 * threads // batch), threads,
                  k_scale, v_scale)


def launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, lens: torch.Tensor,
           scale: float, block_size: int, splits: int, threads: int, k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel with its tasks (splits: stretches of each context) and thread count named."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    # The C code reads raw memory: indices in the widths it declares, the pool as whole rows.
    table, lens = table.to(torch.int64).contiguous(), lens.to(torch.int32).contiguous()
    if not in_whole_rows((k_cache, v_cache, k_scale, v_scale), q.dtype):
        raise ValueError("the paged decode kernel takes contiguous pools in the queries' dtype, or float8 ones with "
                         "float32 scales")
    b, heads, dim = q.shape
    out = q.new_empty(q.shape)
    getattr(library(), _ENTRY[q.dtype])(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), pointer(k_scale), pointer(v_scale),
        table.data_ptr(), lens.data_ptr(), out.data_ptr(), b, heads, k_cache.shape[1], dim, block_size, q.stride(0),
        q.stride(1), table.stride(0), scale, splits, threads)
    return out


# An opaque op inside a compiled decode graph; the pool's views are arguments, so it runs after the step's writes.
_paged_decode_op = opaque_op("cpu_paged_decode", _paged_decode, lambda q, *pool_and_table: q.new_empty(q.shape))


class CPUPagedDecode:
    """The decode half of the CPU's attention backend where the kernel checks out (engine.kernels)."""

    def prepare(self, ctx: Context, block_size: int) -> None:
        return None

    def __call__(self, layer, q: torch.Tensor, ctx: Context) -> torch.Tensor:
        return _paged_decode_op(q, layer.k_cache, layer.v_cache, layer.k_scale, layer.v_scale, ctx.decode_block_table,
                                ctx.decode_context_lens, layer.scale, layer.block_size)


@functools.cache  # once per dtype, head size, pool dtype and process
def checks_out(dtype: torch.dtype, head_dim: int, kv_dtype: torch.dtype | None = None) -> bool:
    """The kernel compiles and, on a small ragged batch over shuffled blocks with grouped query heads, each context
    whole and in 3 stretches, matches attention computed densely in float64 (over a float8 pool's dequantized
    values; kv_dtype None: the queries' dtype): to float32's accuracy, or within one bfloat16 step of the output."""
    if dtype not in _ENTRY or (kv_dtype or dtype) not in (dtype, FP8) or library() is None:
        return False
    gen = torch.Generator().manual_seed(0)
    block_size, kv_heads, group, dim, lens = 4, 2, 3, head_dim, [1, 7, 12, 5]
    width = max(-(-n // block_size) for n in lens)
    blocks = torch.randperm(len(lens) * width + 3, generator=gen)
    table = blocks[:len(lens) * width].view(len(lens), width)
    k, v = (torch.randn((len(blocks) * block_size, kv_heads, dim), generator=gen).to(dtype) for _ in range(2))
    q = torch.randn((len(lens), kv_heads * group, dim), generator=gen).to(dtype)
    lengths = torch.tensor(lens, dtype=torch.int32)
    pool = (k, v)
    if kv_dtype == FP8:
        (kq, k_scale), (vq, v_scale) = quantize_kv(k), quantize_kv(v)
        pool, k, v = (kq, vq, k_scale, v_scale), dequantized_kv(kq, k_scale, dtype), dequantized_kv(vq, v_scale, dtype)
    runs = [launch(q, *pool[:2], table, lengths, dim ** -0.5, block_size, splits, 2, *pool[2:]) for splits in (1, 3)]
    for (s, n), got in itertools.product(enumerate(lens), runs):
        slots = (table[s, :, None] * block_size + torch.arange(block_size)).flatten()[:n]
        keys, values = (x[slots].double().repeat_interleave(group, 1).transpose(0, 1) for x in (k, v))
        want = (torch.softmax(q[s].double()[:, None] @ keys.transpose(1, 2) * dim ** -0.5, -1) @ values)[:, 0]
        tolerance = 1e-5 + (2 ** -7 if dtype == torch.bfloat16 else 1e-5) * want.abs()  # one bf16 step
        if not ((got[s].double() - want).abs() <= tolerance).all():
            log.warning("the CPU paged decode kernel differs from dense attention in %s at head size %d over a %s "
                        "pool; decode copies the context's blocks", dtype, head_dim, kv_dtype or dtype)
            return False
    return True
