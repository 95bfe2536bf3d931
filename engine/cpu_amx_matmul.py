"""Quantized weights times activations on the CPU by AMX tiles: one C kernel (engine.c_kernels) for int8 weights
(engine.quantization: one scale per output channel) and int4 ones (engine.int4_linear: llama.cpp's Q4_1 groups of
32 inputs) times bf16 rows, and for w8a8 (int8 weights times rows quantized to int8 per row).

torch's int8 x bf16 and int4 x bf16 kernels convert every weight again for every row of the input: their time
grows with the rows (SmolLM2's int8 logits head, 49,152 x 576, on a 2-core AMX Xeon: 0.94 ms at one row, 12 ms at
32), and the dequantized product above them first writes the whole weight in bf16 (50 ms for that head in int8).
Here a task takes 32 output channels: their weights are widened to bf16 once (int8 exactly: |q| <= 128 fits bf16's
8-bit significand; int4 to the dequantized weights of engine.cpu_int4, bit for bit) straight into AMX B tiles
(pairs of inputs, by in-register transposes), then every 16 rows of the input are multiplied against them as tiles
(bf16 in, float32 sums), and the output (int8: scaled per channel) rounded to bf16 once. w8a8's int8 weights go
into AMX-INT8 tiles as they are (groups of 4 inputs), its rows quantized in the same call; the int32 sums are
exact, so its numbers are torch._int_mm's path's bit for bit (1.1-3.5x faster at 1-8,192 rows there). The
quantized layers use it where it checks out: int8 and int4 for row counts between torch's kernel's and the
dequantized product's, w8a8 at every row count."""
import ctypes
import functools

import torch

from engine.c_kernels import AMX, BF16, I64, INT, PTR, build
from engine.cpu_int4 import GROUP_WORDS  # groups of 32 inputs: a tile's
from engine.opaque_op import opaque_op

_SOURCE = BF16 + AMX + GROUP_WORDS + r"""
#include <stdlib.h>
#if defined(AMX)
int amx_matmul_built(void) { return amx_permitted(); }

/* 32 int8 weights -> 32 bf16, exactly. */
INLINE __m512i int8_words(const int8_t *src) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)src)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + 16))));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/* Output channels [first, first + count) (count <= 16; the rest zeros) -> B tiles at bt, tile i's row p at
   bt + (i * 16 + p) * 64 (rows of two blocks' tiles side by side): [16 pairs][16 channels] bf16, each channel's 32
   weights of a tile widened (int4: w its codes [n, in / 2], groups its (scale, zero) [n, in / 32, 2]; int8: w [n,
   in]), then the 16 x 16 block of pairs transposed so that a tile row holds one pair of inputs for the 16
   channels. */
INLINE void widen(const void *w, const float *groups, int64_t first, int64_t count, int64_t in, uint16_t *bt,
                  const int int4) {
    for (int64_t k = 0; k < in; k += 32) {
        __m512i r[16];
        for (int64_t j = 0; j < 16; j++) {
            const int64_t c = first + j;
            if (j >= count) r[j] = _mm512_setzero_si512();
            else if (int4) {
                const float *g = groups + (c * (in / 32) + k / 32) * 2;
                r[j] = group_words((const uint8_t *)w + c * (in / 2) + k / 2, bf16_load(bf16_round(g[0])),
                                   bf16_load(bf16_round(g[1])));
            } else r[j] = int8_words((const int8_t *)w + c * in + k);
        }
        transpose_16x16(r);
        for (int64_t p = 0; p < 16; p++) _mm512_store_si512(bt + (k / 32 * 16 + p) * 64, r[p]);
    }
}

/* out [rows, n] bf16 (row stride so) = x [rows, in] bf16 . the weights (int8: times scale [n] float32), in a
   multiple of 32; xp: x copied into [ceil(rows / 16) * 16, in], the missing rows zeros. A task per 32 output
   channels: their B tiles once, then every 16 rows of x by AMX (A: 16 rows x 32 inputs; two float32 tiles of 16
   rows x 16 channels). */
INLINE void amx_matmul(const uint16_t *xp, const void *w, const float *scale, uint16_t *out, int64_t rows, int64_t n,
                       int64_t in, int64_t so, int threads, const int int4) {
    const int64_t steps = in / 32, padded = (rows + 15) / 16 * 16;
    #pragma omp parallel num_threads(threads)
    {
        configure_tiles();
        uint16_t *bt = aligned_alloc(64, sizeof(uint16_t) * 2 * 16 * in);  /* two blocks' B tiles, side by side */
        float *c = aligned_alloc(64, sizeof(float) * 16 * 32);
        #pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < n; n0 += 32) {
            const int64_t nb = n - n0 < 32 ? n - n0 : 32;
            widen(w, scale, n0, nb < 16 ? nb : 16, in, bt, int4);
            widen(w, scale, n0 + 16, nb - 16, in, bt + 32, int4);
            const __mmask16 first = first_lanes(nb), second = first_lanes(nb - 16);
            const __m512 one = _mm512_set1_ps(1.0f);
            const __m512 s0 = int4 ? one : _mm512_maskz_loadu_ps(first, scale + n0);
            const __m512 s1 = int4 ? one : _mm512_maskz_loadu_ps(second, scale + n0 + 16);
            for (int64_t m0 = 0; m0 < padded; m0 += 16) {
                products((const char *)(xp + m0 * in), 64, in * 2, (const char *)bt, 2048, 128, steps, c, 128, 0);
                for (int64_t r = 0; r < 16 && m0 + r < rows; r++) {
                    uint16_t *o = out + (m0 + r) * so + n0;
                    _mm256_mask_storeu_epi16(o, first, (__m256i)_mm512_cvtneps_pbh(
                        _mm512_mul_ps(_mm512_load_ps(c + r * 32), s0)));
                    _mm256_mask_storeu_epi16(o + 16, second, (__m256i)_mm512_cvtneps_pbh(
                        _mm512_mul_ps(_mm512_load_ps(c + r * 32 + 16), s1)));
                }
            }
        }
        free(bt);
        free(c);
        _tile_release();
    }
}

/* w8a8: each row of x [rows, in] (bf16, or float32) quantized to int8 by its own scale (absmax / 127, as
   engine.quantization.quantize_int8: the quotient correctly rounded, then to nearest even) into xq [ceil(rows / 16)
   * 16, in] (the missing rows zeros) and xscale [rows]; then int8 tiles (AMX-INT8, int32 sums, exact) against q [n,
   in] int8 (64 inputs a tile: 16 groups of 4 per channel, by the same transposes, no widening), and out [rows, n]
   float32 = float(sum) * scale[n] * xscale[m], in that order. in: a multiple of 64. */
INLINE __m512 load16(const void *x, int64_t i, int is_bf16) {  /* float32, exactly (a bf16 widened) */
    return is_bf16 ? bf16x16_load((const uint16_t *)x + i) : _mm512_loadu_ps((const float *)x + i);
}

INLINE void quantize_rows(const void *x, int is_bf16, int64_t rows, int64_t in, int8_t *xq, float *xscale) {
    for (int64_t m = 0; m < rows; m++) {
        __m512 top = _mm512_setzero_ps();
        for (int64_t k = 0; k < in; k += 16) top = _mm512_max_ps(top, _mm512_abs_ps(load16(x, m * in + k, is_bf16)));
        const float amax = _mm512_reduce_max_ps(top), scale = (amax > 1e-12f ? amax : 1e-12f) / 127.0f;
        const __m512 s = _mm512_set1_ps(scale);
        for (int64_t k = 0; k < in; k += 16) {
            const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(load16(x, m * in + k, is_bf16), s),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm_storeu_si128((__m128i *)(xq + m * in + k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q)));
        }
        xscale[m] = scale;
    }
}

void w8a8_matmul(const void *x, int is_bf16, int8_t *xq, float *xscale, const int8_t *q, const float *scale,
                 float *out, int64_t rows, int64_t n, int64_t in, int threads) {
    const int64_t steps = in / 64, padded = (rows + 15) / 16 * 16;
    quantize_rows(x, is_bf16, rows, in, xq, xscale);
    #pragma omp parallel num_threads(threads)
    {
        configure_tiles();
        int8_t *bt = aligned_alloc(64, 2 * 16 * in);  /* two blocks' B tiles, side by side (as widen's) */
        int32_t *c = aligned_alloc(64, sizeof(int32_t) * 16 * 32);
        #pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < n; n0 += 32) {
            const int64_t nb = n - n0 < 32 ? n - n0 : 32;
            for (int64_t half = 0; half < 2; half++)
                for (int64_t k = 0; k < in; k += 64) {
                    __m512i r[16];
                    for (int64_t j = 0; j < 16; j++)
                        r[j] = half * 16 + j < nb ? _mm512_loadu_si512(q + (n0 + half * 16 + j) * in + k)
                                                  : _mm512_setzero_si512();
                    transpose_16x16(r);
                    for (int64_t g = 0; g < 16; g++)
                        _mm512_store_si512(bt + (k / 64 * 16 + g) * 128 + half * 64, r[g]);
                }
            const __mmask16 first = first_lanes(nb), second = first_lanes(nb - 16);
            const __m512 s0 = _mm512_maskz_loadu_ps(first, scale + n0);
            const __m512 s1 = _mm512_maskz_loadu_ps(second, scale + n0 + 16);
            for (int64_t m0 = 0; m0 < padded; m0 += 16) {
                products((const char *)(xq + m0 * in), 64, in, (const char *)bt, 2048, 128, steps, c, 128, 1);
                for (int64_t r = 0; r < 16 && m0 + r < rows; r++) {
                    const __m512 xs = _mm512_set1_ps(xscale[m0 + r]);
                    float *o = out + (m0 + r) * n + n0;
                    _mm512_mask_storeu_ps(o, first, _mm512_mul_ps(_mm512_mul_ps(
                        _mm512_cvtepi32_ps(_mm512_load_si512(c + r * 32)), s0), xs));
                    _mm512_mask_storeu_ps(o + 16, second, _mm512_mul_ps(_mm512_mul_ps(
                        _mm512_cvtepi32_ps(_mm512_load_si512(c + r * 32 + 16)), s1), xs));
                }
            }
        }
        free(bt);
        free(c);
        _tile_release();
    }
}
#else
int amx_matmul_built(void) { return 0; }  /* not compiled here: the entry points do nothing */
#define amx_matmul(...) ((void)0)
void w8a8_matmul(const void *x, int is_bf16, int8_t *xq, float *xscale, const int8_t *q, const float *scale,
                 float *out, int64_t rows, int64_t n, int64_t in, int threads) {}
#endif

/* int8: q [n, in], scale [n] float32. */
void int8_matmul_bf16(const uint16_t *xp, const int8_t *q, const float *scale, uint16_t *out, int64_t rows,
                      int64_t n, int64_t in, int64_t so, int threads) {
    amx_matmul(xp, q, scale, out, rows, n, in, so, threads, 0);
}

/* int4: codes [n, in / 2] (low nibble: the even input), groups [n, in / 32, 2] float32 (scale, zero). */
void int4_matmul_bf16(const uint16_t *xp, const uint8_t *codes, const float *groups, uint16_t *out, int64_t rows,
                      int64_t n, int64_t in, int64_t so, int threads) {
    amx_matmul(xp, codes, groups, out, rows, n, in, so, threads, 1);
}
"""
_SIGNATURE = (PTR,) * 4 + (I64,) * 4 + (INT,)


def library() -> ctypes.CDLL | None:
    """The compiled kernel where this CPU has AMX-BF16 and the process may use it; None elsewhere."""
    lib = build("cpu_amx_matmul", _SOURCE, (("int8_matmul_bf16", _SIGNATURE), ("int4_matmul_bf16", _SIGNATURE),
                                            ("w8a8_matmul", (PTR, INT) + (PTR,) * 5 + (I64,) * 3 + (INT,)),
                                            ("amx_matmul_built", (), ctypes.c_int)))
    return lib if lib is not None and lib.amx_matmul_built() else None


def _launch(entry: str, rows: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, out_features: int,
            in_features: int) -> torch.Tensor:
    count = rows.shape[0]
    padded = rows.new_zeros(-(-count // 16) * 16, in_features, dtype=torch.bfloat16)  # whole tiles of bf16 rows
    padded[:count] = rows
    out = padded.new_empty(count, out_features)
    getattr(library(), entry)(padded.data_ptr(), weights.data_ptr(), scales.data_ptr(), out.data_ptr(), count,
                              out_features, in_features, out.stride(0), torch.get_num_threads())
    return out.to(rows.dtype)


def _int8_matmul(rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _launch("int8_matmul_bf16", rows, qweight, scale, *qweight.shape)


def _w8a8_matmul(rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The rows quantized per row to int8 and multiplied by int8 tiles: float32 [count, n]."""
    count, (n, k) = rows.shape[0], qweight.shape
    x = (rows if rows.dtype == torch.bfloat16 else rows.float()).contiguous()  # read as they are: bf16 or float32
    xq = torch.zeros(-(-count // 16) * 16, k, dtype=torch.int8)  # whole tiles of rows
    xscale, out = torch.empty(count), torch.empty(count, n)
    library().w8a8_matmul(x.data_ptr(), x.dtype == torch.bfloat16, xq.data_ptr(), xscale.data_ptr(),
                          qweight.data_ptr(), scale.data_ptr(), out.data_ptr(), count, n, k, torch.get_num_threads())
    return out


def _int4_matmul(rows: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return _launch("int4_matmul_bf16", rows, codes, scales, codes.shape[0], codes.shape[1] * 2)


# Opaque ops inside a compiled graph. rows: [count, in] (taken in bf16; the output in their dtype); int8: qweight
# [n, in], scale [n] float32; int4: codes [n, in / 2] uint8, scales [n, in / 32, 2] float32 (engine.int4_linear's,
# contiguous).
int8_matmul = opaque_op("cpu_amx_int8_matmul", _int8_matmul,
                        lambda rows, qweight, scale: rows.new_empty(rows.shape[0], qweight.shape[0]))
w8a8_matmul = opaque_op("cpu_amx_w8a8_matmul", _w8a8_matmul,
                        lambda rows, qweight, scale: rows.new_empty(rows.shape[0], qweight.shape[0],
                                                                    dtype=torch.float32))
int4_matmul = opaque_op("cpu_amx_int4_matmul", _int4_matmul,
                        lambda rows, codes, scales: rows.new_empty(rows.shape[0], codes.shape[0]))


@functools.cache  # once per process
def checks_out() -> bool:
    """The kernel builds and gives the float products (to bf16's rounding) of 1, 5 and 33 rows, strided ones too,
    with a partial block of channels, for int8 and int4 weights, and w8a8's integer products exactly: else torch's
    kernels stay."""
    from engine.int4_linear import dequantize_int4, pack_codes, quantize_int4
    from engine.quantization import quantize_int8
    try:
        if library() is None:
            return False
        gen = torch.Generator().manual_seed(0)
        q = torch.randint(-128, 128, (40, 96), generator=gen, dtype=torch.int8)
        scale = torch.rand(40, generator=gen) / 64
        codes, groups = quantize_int4(torch.randn(40, 96, generator=gen))
        codes = pack_codes(codes)
        int4_weights = dequantize_int4(codes, groups, torch.bfloat16).double()
        for count in (1, 5, 33):
            x = torch.randn(count, 128, generator=gen).bfloat16()[:, :96]
            for got, want in ((int8_matmul(x, q, scale), (x.double() @ q.double().t()) * scale.double()),
                              (int4_matmul(x, codes, groups), x.double() @ int4_weights.t())):
                if not torch.allclose(got.double(), want, atol=1e-2, rtol=1e-2):
                    return False
            xq, xscale = quantize_int8(x[:, :64])  # w8a8: exact integer sums, then the same float32 rescaling
            if not torch.equal(w8a8_matmul(x[:, :64], q[:, :64].contiguous(), scale),
                               (xq.double() @ q[:, :64].double().t()).float() * scale * xscale):
                return False
        return True
    except Exception:  # noqa: BLE001 (any failure to build or run: torch's kernels stay)
        return False

