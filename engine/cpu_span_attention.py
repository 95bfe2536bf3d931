"""A step's prefill attention over all its spans in one call on the CPU, with AMX: a C kernel compiled on the
machine (engine.c_kernels).

The portable prefill runs one SDPA call per span (engine.attention_backends.PerSequencePrefill): for an
all-MiniLM-L6-v2 embedding step on a 2-core AMX Xeon those calls were ~30% of the step in bf16 (README). Here one
OpenMP task per (span, kv head) lays the span's keys out as the products' B tiles (pairs of dimensions) and its
values as pairs of keys, once, then takes each of its query heads 16 rows at a time: the scores are AMX tile
products (bf16 in, float32 sums), the softmax in float32 with a vector exp2, the weights rounded to bf16 once (as
flash attention's bf16 kernels do) and multiplied with the values as tiles again, the output normalized and
rounded once. bf16 queries, keys and values with head sizes of 32s, causal or not; a span after cached context (a
chunk, a prefix-cache hit) attends to its context gathered from the pool, its own keys last. Elsewhere (no
AMX-BF16, no compiler, float32) and where the start-up check against float64 attention fails, the per-span SDPA
runs."""
import ctypes
import functools
import logging

import torch

from engine.attention import dequantized_kv, quantize_kv
from engine.c_kernels import AMX, BF16, E4M3, F32, I64, INT, PTR, build, pointer
from engine.context import Context
from engine.quantization import FP8

log = logging.getLogger(__name__)

_SOURCE = BF16 + E4M3 + AMX + r"""
#include <math.h>
#include <stdlib.h>

#if defined(AMX)
#define ROWS 16  /* a tile's rows: the query rows a task takes at a time */
#define TASKS_A_THREAD 8  /* no task holds more than 1/8 of a thread's share of a step's work (span_attention_bf16) */

int span_attention_built(void) { return amx_permitted(); }

/* 2^y for y <= 0: a cubic for 2^f, f = y - floor(y) in [0, 1) (one vreduceps: the softmax's op count is the span
   kernel's cost at 32-wide heads; rounding then subtracting was 8-13% slower there), times 2^floor(y) by scalef
   (0 below the smallest float): relative error 7.5e-5, where the weights are then rounded to bf16 (3.9e-3). */
INLINE __m512 exp2_ps(__m512 y) {
    const __m512 f = _mm512_reduce_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.0780233447f), f, _mm512_set1_ps(0.2260664223f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6958351187f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999249175f));
    return _mm512_scalef_ps(p, y);  /* scalef takes 2^floor of its second operand */
}

/* The largest of a row's first `valid` scores. */
INLINE float row_max(const float *sx, int64_t valid) {
    const int64_t full = valid & ~(int64_t)15;
    __m512 top = _mm512_set1_ps(-INFINITY), top1 = top, top2 = top, top3 = top;  /* 4 chains: a max waits 4 cycles */
    int64_t j = 0;
    for (; j + 64 <= full; j += 64) {
        top = _mm512_max_ps(top, _mm512_load_ps(sx + j));
        top1 = _mm512_max_ps(top1, _mm512_load_ps(sx + j + 16));
        top2 = _mm512_max_ps(top2, _mm512_load_ps(sx + j + 32));
        top3 = _mm512_max_ps(top3, _mm512_load_ps(sx + j + 48));
    }
    for (; j < full; j += 16) top = _mm512_max_ps(top, _mm512_load_ps(sx + j));
    top = _mm512_max_ps(_mm512_max_ps(top, top1), _mm512_max_ps(top2, top3));
    if (full < valid) top = _mm512_mask_max_ps(top, first_lanes(valid - full), top, _mm512_load_ps(sx + full));
    return _mm512_reduce_max_ps(top);
}

/* A row's scores sx (unscaled, span of them) to bf16 weights exp(scale * (s - top)) over its first `valid` keys
   in wx, the later ones 0, top their largest; returns the weights' float32 sum. */
INLINE float softmax_row(const float *sx, uint16_t *wx, int64_t span, int64_t valid, float scale, float top) {
    __m512 sum = _mm512_setzero_ps();
    const float log2e = 1.44269504088896341f;
    const __m512 a = _mm512_set1_ps(scale * log2e), b = _mm512_set1_ps(top * scale * log2e);
    for (int64_t j = 0; j < span; j += 32) {
        __m512 lo = exp2_ps(_mm512_fmsub_ps(_mm512_load_ps(sx + j), a, b));
        __m512 hi = exp2_ps(_mm512_fmsub_ps(_mm512_load_ps(sx + j + 16), a, b));
        if (j + 32 > valid) {
            lo = _mm512_maskz_mov_ps(first_lanes(valid - j), lo);
            hi = _mm512_maskz_mov_ps(first_lanes(valid - j - 16), hi);
        }
        sum = _mm512_add_ps(sum, _mm512_add_ps(lo, hi));
        _mm512_store_si512(wx + j, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    return _mm512_reduce_add_ps(sum);
}

/* 32 values from column `at` of row `row` of keys or values x (token stride t) in bf16: as stored, or a float8
   pool's (scales [rows, kv_heads], else NULL) times the row's scale of kv head g, rounded once, as
   engine.attention.dequantized_kv rounds them (no subnormal products: a scale is at least 1e-12 / 448). */
INLINE __m512i row32(const void *x, const float *scales, int64_t row, int64_t t, int64_t kv_heads, int64_t g,
                     int64_t at) {
    if (!scales) return _mm512_loadu_si512((const uint16_t *)x + row * t + at);
    __m512 lo, hi;
    e4m3x32_widen((const uint8_t *)x + row * t + at, scales[row * kv_heads + g], &lo, &hi);
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/* Where a step's keys and values are: k, v with token strides k_t, v_t (bf16, or float8 with k_scale, v_scale);
   rows: each key's row of them (a paged pool's slots), or NULL: key j is row j. */
typedef struct {
    const void *k, *v;
    const float *k_scale, *v_scale;
    const int64_t *rows;
    int64_t k_t, v_t, kv_heads;
} Keys;

/* Head `head` (dim values) of row `row` of x (token stride t; float8 where scales, else bf16) into L2. */
INLINE void prefetch_head(const void *x, const float *scales, int64_t row, int64_t t, int64_t head, int64_t dim) {
    const int64_t bytes = scales ? 1 : 2;
    const char *p = (const char *)x + (row * t + head * dim) * bytes;
    for (int64_t b = 0; b < dim * bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
}

/* One span's keys and values of kv head g (klen of them from key kfirst) laid out for the tile products: kt
   [dim/2][padded] key pairs per dimension pair (the B tiles of the scores), vp [padded/2][dim] value pairs per key
   pair (the B tiles of the outputs); padded = klen rounded up to 32, the keys past klen zeros. The rows 32 keys on
   are prefetched (keys and values): a short span's task reads a few scattered rows each and the hardware's
   prefetchers never catch up (Qwen3-0.6B's shape, 32 spans of 120-256 tokens: a quarter of the kernel's time). */
static void lay_out_keys(const Keys *in, int64_t kfirst, int64_t klen, int64_t g, int64_t dim, uint32_t *kt,
                         uint32_t *vp) {
#define KEY_ROW(j) (in->rows ? in->rows[kfirst + (j)] : kfirst + (j))
    const int64_t padded = (klen + 31) & ~(int64_t)31, pairs = dim / 2;
    for (int64_t j = 0; j < padded; j += 16) {  /* 16 keys' 16 dimension pairs at a time */
        for (int64_t x = j + 32; x < j + 48 && x < klen; x++) {
            prefetch_head(in->k, in->k_scale, KEY_ROW(x), in->k_t, g, dim);
            prefetch_head(in->v, in->v_scale, KEY_ROW(x), in->v_t, g, dim);
        }
        for (int64_t r = 0; r < pairs; r += 16) {
            __m512i block[16];
            for (int64_t x = 0; x < 16; x++)
                block[x] = j + x < klen ? row32(in->k, in->k_scale, KEY_ROW(j + x), in->k_t, in->kv_heads, g,
                                                g * dim + 2 * r)
                                        : _mm512_setzero_si512();
            transpose_16x16(block);
            for (int64_t x = 0; x < 16; x++) _mm512_store_si512(kt + (r + x) * padded + j, block[x]);
        }
    }
    /* Two keys' values interleaved: (a[0], b[0], a[1], b[1], ...) for 16 columns at a time. */
    const __m512i first16 = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                             6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i next16 = _mm512_add_epi16(first16, _mm512_set1_epi16(16));
    for (int64_t j = 0; j < padded; j += 2)
        for (int64_t c = 0; c < dim; c += 32) {
            const __m512i a = j < klen ? row32(in->v, in->v_scale, KEY_ROW(j), in->v_t, in->kv_heads, g, g * dim + c)
                                       : _mm512_setzero_si512();
            const __m512i b = j + 1 < klen ? row32(in->v, in->v_scale, KEY_ROW(j + 1), in->v_t, in->kv_heads, g,
                                                   g * dim + c)
                                           : _mm512_setzero_si512();
            _mm512_storeu_si512(vp + j / 2 * dim + c, _mm512_permutex2var_epi16(a, first16, b));
            _mm512_storeu_si512(vp + j / 2 * dim + c + 16, _mm512_permutex2var_epi16(a, next16, b));
        }
#undef KEY_ROW
}

/* Query head h's rows i0.. (up to ROWS) of a span (len queries from row `first`, klen keys: its context, its own
   keys last), the keys they see laid out in kt, vp (padded: their count rounded up to 32); causal: query i sees
   keys up to klen - len + i. Scratch: qb [ROWS][dim] the rows' queries, s [ROWS][padded] scores, w [ROWS][padded]
   bf16 weights, o [ROWS][dim] float32 outputs. The next rows' queries are prefetched. */
static void attend_rows(const uint16_t *q, uint16_t *out, int64_t first, int64_t len, int64_t klen, int64_t i0,
                        int64_t h, int64_t heads, int64_t dim, int64_t q_t, float scale, int causal,
                        const uint32_t *kt, const uint32_t *vp, int64_t padded, uint16_t *qb, float *s, uint16_t *w,
                        float *o) {
    const int64_t before = klen - len;
    const int64_t rows = len - i0 < ROWS ? len - i0 : ROWS, keys = causal ? before + i0 + rows : klen;
    const int64_t span = (keys + 31) & ~(int64_t)31;
    for (int64_t x = 0; x < ROWS; x++) {  /* a short block's missing rows are zeros, their results unused */
        if (x < rows) memcpy(qb + x * dim, q + (first + i0 + x) * q_t + h * dim, dim * 2);
        else memset(qb + x * dim, 0, dim * 2);
    }
    for (int64_t x = i0 + ROWS; x < i0 + 2 * ROWS && x < len; x++) prefetch_head(q, NULL, first + x, q_t, h, dim);
    for (int64_t j = 0; j < span; j += 32)  /* scores of keys j to j + 32 */
        products((const char *)qb, 64, dim * 2, (const char *)(kt + j), 64 * padded, padded * 4, dim / 32, s + j,
                 padded * 4, 0);
    /* All rows' maxima first: a row's weights wait on its maximum's chain of loads and reductions, and taken row
       by row those chains were ~15% of the kernel's time (MiniLM's shape). */
    float top[ROWS], total[ROWS];
    for (int64_t x = 0; x < rows; x++) top[x] = row_max(s + x * padded, causal ? before + i0 + x + 1 : klen);
    for (int64_t x = 0; x < rows; x++)
        total[x] = softmax_row(s + x * padded, w + x * padded, span, causal ? before + i0 + x + 1 : klen, scale,
                               top[x]);
    for (int64_t x = rows; x < ROWS; x++) memset(w + x * padded, 0, span * 2);
    for (int64_t c = 0; c < dim; c += 32)  /* outputs of columns c to c + 32 */
        products((const char *)w, 64, padded * 2, (const char *)(vp + c), 64 * dim, dim * 4, span / 32, o + c,
                 dim * 4, 0);
    for (int64_t x = 0; x < rows; x++) {
        const __m512 norm = _mm512_set1_ps(1.0f / total[x]);
        uint16_t *dst = out + ((first + i0 + x) * heads + h) * dim;
        for (int64_t c = 0; c < dim; c += 16) {
            const __m512 value = _mm512_mul_ps(_mm512_loadu_ps(o + x * dim + c), norm);
            _mm256_storeu_si256((__m256i *)(dst + c), (__m256i)_mm512_cvtneps_pbh(value));
        }
    }
}

/* The work of a span's first `rows` rows (products per kv head): causal, row i attends to the `before` keys of
   context and the span's keys up to its own; else to all klen keys. */
INLINE double rows_work(int64_t rows, int64_t before, int64_t klen, int causal) {
    return causal ? (double)rows * before + 0.5 * (double)rows * rows : (double)rows * klen;
}

/* Rows [*from, *to) of a span's len (whole row blocks of ROWS), its part-th of parts with equal work. */
INLINE void part_rows(int64_t len, int64_t klen, int causal, int64_t part, int64_t parts, int64_t *from, int64_t *to) {
    const double total = rows_work(len, klen - len, klen, causal);
    int64_t b = 0, edge[2];
    for (int64_t e = 0; e < 2; e++) {  /* the first block boundary at or past each share of the work */
        const double share = total * (part + e) / parts;
        while (b < len && rows_work(b, klen - len, klen, causal) < share) b += ROWS;
        edge[e] = b < len ? b : len;
    }
    *from = edge[0], *to = edge[1];
}
#else
int span_attention_built(void) { return 0; }
#endif

/* q [tokens, heads, dim], k and v [keys, kv_heads, dim], bf16, each token's heads contiguous (token strides
   q_t, k_t, v_t; k and v bf16, or float8 with k_scale, v_scale [rows, kv_heads], else NULL); starts [spans + 1]
   the spans' first queries and the end, key_starts the same for their keys (rows of k and v, or of key_rows,
   which names each key's row: a paged pool's slots); out [tokens, heads, dim] contiguous. dim: a multiple of
   32. A task per (span, kv head, part of the span's rows) lays out the keys and values its rows see, then takes
   its query heads' rows (the keys stay in its core's caches). A span's rows are cut into parts of equal work where
   a (span, kv head) would hold more than 1 / TASKS_A_THREAD of a thread's share of the step's work: a task per
   (span, kv head) left a thread of two idle a third of the time on one long span with 3 kv heads (SmolLM2, 2,600
   tokens: 10.5 -> 7.3 ms a layer). */
void span_attention_bf16(const uint16_t *q, const void *k, const void *v, const float *k_scale, const float *v_scale,
                         const int64_t *key_rows, uint16_t *out, const int64_t *starts, const int64_t *key_starts,
                         int64_t spans, int64_t heads, int64_t kv_heads, int64_t dim, int64_t q_t, int64_t k_t,
                         int64_t v_t, float scale, int causal, int threads) {
#if defined(AMX)
    const int64_t group = heads / kv_heads;
    const Keys in = {k, v, k_scale, v_scale, key_rows, k_t, v_t, kv_heads};
    int64_t *parts = malloc(sizeof(int64_t) * spans), *first_task = malloc(sizeof(int64_t) * (spans + 1));
    double *work = malloc(sizeof(double) * spans), total = 0.0;
    for (int64_t sp = 0; sp < spans; sp++) {
        const int64_t len = starts[sp + 1] - starts[sp], klen = key_starts[sp + 1] - key_starts[sp];
        total += work[sp] = rows_work(len, klen - len, klen, causal);
    }
    first_task[0] = 0;
    for (int64_t sp = 0; sp < spans; sp++) {
        const int64_t blocks = (starts[sp + 1] - starts[sp] + ROWS - 1) / ROWS;  /* a part: whole row blocks */
        const double cut = ceil(work[sp] * TASKS_A_THREAD * threads / (kv_heads * total));
        parts[sp] = blocks <= 0 ? 0 : cut < 1 ? 1 : cut > blocks ? blocks : (int64_t)cut;
        first_task[sp + 1] = first_task[sp] + kv_heads * parts[sp];
    }
    #pragma omp parallel num_threads(threads)
    {
        configure_tiles();
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < first_task[spans]; task++) {
            int64_t sp = 0, high = spans;  /* the span whose tasks hold this one: the last first_task <= task */
            while (high - sp > 1) {
                const int64_t mid = (sp + high) / 2;
                if (first_task[mid] <= task) sp = mid; else high = mid;
            }
            const int64_t g = (task - first_task[sp]) / parts[sp], first = starts[sp];
            const int64_t len = starts[sp + 1] - first, klen = key_starts[sp + 1] - key_starts[sp];
            int64_t from, to;
            part_rows(len, klen, causal, (task - first_task[sp]) % parts[sp], parts[sp], &from, &to);
            if (from >= to) continue;
            const int64_t seen = causal ? klen - len + to : klen, padded = (seen + 31) & ~(int64_t)31;
            uint32_t *kt = aligned_alloc(64, sizeof(uint32_t) * padded * dim);  /* kt, then vp: dim / 2 * padded each */
            uint16_t *qb = aligned_alloc(64, sizeof(uint16_t) * ROWS * (dim + padded));  /* qb, then w */
            float *s = aligned_alloc(64, sizeof(float) * ROWS * (padded + dim));  /* s, then o */
            lay_out_keys(&in, key_starts[sp], seen, g, dim, kt, kt + dim / 2 * padded);
            for (int64_t h = g * group; h < (g + 1) * group; h++)
                for (int64_t i0 = from; i0 < to; i0 += ROWS)
                    attend_rows(q, out, first, len, klen, i0, h, heads, dim, q_t, scale, causal, kt,
                                kt + dim / 2 * padded, padded, qb, s, qb + ROWS * dim, s + ROWS * padded);
            free(kt);
            free(qb);
            free(s);
        }
        _tile_release();
    }
    free(parts);
    free(first_task);
    free(work);
#endif
}
"""
_SIGNATURE = (PTR,) * 9 + (I64,) * 7 + (F32, INT, INT)


@functools.cache  # its start asks Linux for the tile registers once
def library() -> ctypes.CDLL | None:
    """The compiled kernel where this CPU has AMX-BF16 and the process may use it; None elsewhere."""
    lib = build("cpu_span_attention", _SOURCE,
                (("span_attention_bf16", _SIGNATURE), ("span_attention_built", (), ctypes.c_int)))
    return lib if lib is not None and lib.span_attention_built() else None


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, key_starts: torch.Tensor,
           scale: float, causal: bool, threads: int, key_rows: torch.Tensor | None = None,
           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q [tokens, heads, dim], k and v [keys, kv_heads, dim] in bf16 (or float8 with their scales [keys, kv_heads]:
    a float8 pool's); starts and key_starts [spans + 1] int64, where each span's queries and keys begin (a span's
    keys: its context, its own last) -> [tokens, heads, dim]; with key_rows, k and v's row of each key (k and v a
    paged pool, key_rows slots). Strided token rows are read in place (q, k and v as views of one projection)."""
    q, k, v = (x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous() for x in (q, k, v))
    scales = () if k_scale is None else (k_scale.contiguous(), v_scale.contiguous())
    if not (q.dtype == torch.bfloat16 and k.dtype == v.dtype == (FP8 if scales else torch.bfloat16)
            and all(x.dtype == torch.float32 for x in scales)):
        raise ValueError("the span attention kernel takes bf16 queries, and bf16 keys and values or float8 ones "
                         "with float32 scales")
    starts, key_starts = starts.to(torch.int64).contiguous(), key_starts.to(torch.int64).contiguous()
    if key_rows is not None:
        key_rows = key_rows.to(torch.int64).contiguous()
        if key_rows.shape[0] < key_starts[-1] or (key_rows.numel() and not (
                int(key_rows.min()) >= 0 and int(key_rows.max()) < k.shape[0])):
            raise ValueError("key_rows must name a row of k and v for every key")
    heads, dim = q.shape[1:]
    out = q.new_empty(q.shape)
    library().span_attention_bf16(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), *map(pointer, scales or (None, None)), pointer(key_rows),
        out.data_ptr(), starts.data_ptr(),
        key_starts.data_ptr(), starts.shape[0] - 1, heads, k.shape[1], dim, q.stride(0), k.stride(0), v.stride(0),
        scale, causal, threads)
    return out


class CPUSpanPrefill:
    """The prefill half of the CPU's attention backend where the kernel checks out (engine.kernels): one call for a
    step's spans; where a span reads cached context (a chunk, a prefix-cache hit), every span's keys are read in
    place from the pool through their slots (a float8 pool's widened as they are read): gathering each span's
    context and concatenating the step's keys every layer was a quarter of a step of 16 prompts of 2,600 cached
    and 100 new tokens (a float8 pool's dequantized gather two thirds)."""
    name = "C span attention (AMX)"

    def prepare(self, ctx: Context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Where each span's queries and keys begin, and the end; the slots of every span's keys where any span reads
        context from the pool (else None: the step's own keys)."""
        keys = [span.context_len if span.context_slots is not None else span.end - span.start for span in ctx.prefills]
        starts = torch.tensor([span.start for span in ctx.prefills] + [ctx.prefills[-1].end], dtype=torch.int64)
        key_slots = ctx.prefill_key_slots()
        return starts, torch.tensor([0] + keys, dtype=torch.int64).cumsum(0), \
            None if key_slots is None else key_slots.to(torch.int64)

    def __call__(self, q, k, v, pool, scale: float, ctx: Context) -> torch.Tensor:
        starts, key_starts, key_slots = ctx.prefill_meta
        threads = torch.get_num_threads()
        if key_slots is None:
            return launch(q, k, v, starts, key_starts, scale, ctx.causal, threads)
        k_cache, v_cache, k_scale, v_scale = pool
        return launch(q, k_cache, v_cache, starts, key_starts, scale, ctx.causal, threads, key_slots, k_scale, v_scale)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """One span's attention in float64, the reference: q [n, heads, dim], k and v [keys, kv_heads, dim] (its context,
    its own keys last)."""
    n, group, dim = q.shape[0], q.shape[1] // k.shape[1], q.shape[2]
    keys, values = (x.double().repeat_interleave(group, 1).transpose(0, 1) for x in (k, v))
    scores = q.double().transpose(0, 1) @ keys.transpose(1, 2) * dim ** -0.5
    if causal:
        scores = scores.masked_fill(torch.ones(n, k.shape[0], dtype=torch.bool).triu(k.shape[0] - n + 1), -torch.inf)
    return (torch.softmax(scores, -1) @ values).transpose(0, 1)


@functools.cache  # once per head size, pool dtype and process
def checks_out(head_dim: int, kv_dtype: torch.dtype | None = None) -> bool:
    """The kernel builds for this CPU and, on ragged spans (one shorter than a block of rows, one longer than 32
    keys) with grouped query heads, not causal on their own keys, and causal after cached context read in place
    from a pool (bf16, or float8 where kv_dtype is), matches attention computed densely in float64 (over the pool's
    dequantized values) within bf16's rounding of the weights and the output."""
    if head_dim % 32 or kv_dtype not in (None, torch.bfloat16, FP8) or library() is None:
        return False
    gen = torch.Generator().manual_seed(0)
    lens, context, kv_heads, group = [3, 37, 70, 1], [0, 5, 0, 40], 2, 3
    starts = torch.tensor([0] + lens).cumsum(0)
    key_starts = torch.tensor([0] + [n + c for n, c in zip(lens, context)]).cumsum(0)
    q = torch.randn((starts[-1], kv_heads * group, head_dim), generator=gen).bfloat16()
    k, v = (torch.randn((key_starts[-1], kv_heads, head_dim), generator=gen).bfloat16() for _ in range(2))
    slots = torch.randperm(len(k) + 7, generator=gen)[:len(k)]  # the keys' rows of a pool, others between
    pool = [torch.zeros((len(k) + 7, kv_heads, head_dim), dtype=torch.bfloat16) for _ in range(2)]
    pool[0][slots], pool[1][slots] = k, v
    if kv_dtype == FP8:
        (kq, k_scale), (vq, v_scale) = quantize_kv(pool[0]), quantize_kv(pool[1])
        pool = [kq, vq, slots, k_scale, v_scale]
        k, v = dequantized_kv(kq, k_scale, torch.bfloat16)[slots], dequantized_kv(vq, v_scale, torch.bfloat16)[slots]
    else:
        pool.append(slots)
    for causal, keys_at, read in ((False, starts, (k, v)), (True, key_starts, pool)):
        got = launch(q, *read[:2], starts, keys_at, head_dim ** -0.5, causal, 2, *read[2:])
        for i in range(len(lens)):
            (a, b), (ka, kb) = starts[i:i + 2].tolist(), keys_at[i:i + 2].tolist()
            want = dense_attention(q[a:b], k[ka:kb], v[ka:kb], causal)
            if not ((got[a:b].double() - want).abs() <= 1e-2 + 2 ** -7 * want.abs()).all():
                log.warning("the CPU span attention kernel differs from dense attention at head size %d (a %s pool); "
                            "prefill runs an SDPA call per span", head_dim, kv_dtype or "bf16")
                return False
    return True
