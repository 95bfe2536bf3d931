"""int8 weights (engine.quantization, one scale per output channel) times bf16 activations on the CPU, with AMX: one
C kernel (engine.c_kernels).

torch's int8 x bf16 kernel (`torch._weight_int8pack_mm`) converts every weight again for every row of the input:
its time grows with the rows (SmolLM2's int8 logits head, 49,152 x 576, on a 2-core AMX Xeon: 0.94 ms at one row,
12 ms at 32), and the dequantized product above it first writes the whole bf16 weight (50 ms for that head). Here
a task takes 32 output channels: their int8 weights are widened to bf16 once (exact: |q| <= 128 fits bf16's 8-bit
significand) straight into AMX B tiles (pairs of inputs, by in-register transposes), then every 16 rows of the
input are multiplied against them as tiles (bf16 in, float32 sums), and the output scaled per channel and rounded
to bf16 once. engine.quantization uses it where it checks out, for more rows than torch's kernel is faster at."""
import ctypes
import functools

import torch

from engine.c_kernels import AMX, BF16, I64, INT, PTR, build
from engine.opaque_op import opaque_op

_SOURCE = BF16 + AMX + r"""
#include <stdlib.h>
#if defined(AMX)
int int8_matmul_built(void) { return amx_permitted(); }

/* 16 channels' weights q [16 rows, in] int8 (row stride in) -> B tiles bt [in / 32][16 pairs][16 channels], bf16:
   each row's 32 weights of a tile widened exactly (|q| <= 128 fits bf16's 8-bit significand), then the 16 x 16
   block of pairs transposed so that a tile row holds one pair of inputs for the 16 channels. Rows past `count`
   are zeros. */
INLINE void widen_block(const int8_t *q, int64_t in, int64_t count, uint16_t *bt) {
    for (int64_t k = 0; k < in; k += 32) {
        __m512i r[16];
        for (int64_t j = 0; j < 16; j++) {
            r[j] = _mm512_setzero_si512();
            if (j >= count) continue;
            const int8_t *src = q + j * in + k;
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)src)));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + 16))));
            r[j] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
        }
        transpose_16x16(r);
        for (int64_t p = 0; p < 16; p++) _mm512_store_si512(bt + (k / 32 * 16 + p) * 32, r[p]);
    }
}
#endif

/* Whether the kernel was compiled here and may use the tiles; without them the entry point does nothing. */
#if !defined(AMX)
int int8_matmul_built(void) { return 0; }
#endif

/* out [rows, n] bf16 (row stride so) = (x [rows, in] bf16 . q [n, in] int8) * scale [n] float32, in a multiple of
   32; xp: x copied into [ceil(rows / 16) * 16, in], 64-byte aligned, the missing rows zeros. A task per 32 output
   channels: their weights widened into B tiles once, then every 16 rows of x multiplied by AMX tiles (A: 16 rows x
   32 inputs; two float32 tiles: 16 rows x 16 channels each), scaled per channel and rounded to bf16 once. */
void int8_matmul_bf16(const uint16_t *xp, const int8_t *q, const float *scale, uint16_t *out, int64_t rows,
                      int64_t n, int64_t in, int64_t so, int threads) {
#if defined(AMX)
    const int64_t steps = in / 32, padded = (rows + 15) / 16 * 16;
    #pragma omp parallel num_threads(threads)
    {
        configure_tiles();
        uint16_t *bt = aligned_alloc(64, sizeof(uint16_t) * 2 * 16 * in);  /* two blocks' B tiles */
        float *c = aligned_alloc(64, sizeof(float) * 16 * 32);
        #pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < n; n0 += 32) {
            const int64_t nb = n - n0 < 32 ? n - n0 : 32;
            widen_block(q + n0 * in, in, nb < 16 ? nb : 16, bt);
            widen_block(q + (n0 + 16) * in, in, nb - 16, bt + 16 * in);
            const __mmask16 first = nb >= 16 ? 0xffff : (__mmask16)((1u << nb) - 1);
            const __mmask16 second = nb <= 16 ? 0 : nb >= 32 ? 0xffff : (__mmask16)((1u << (nb - 16)) - 1);
            const __m512 s0 = _mm512_maskz_loadu_ps(first, scale + n0);
            const __m512 s1 = _mm512_maskz_loadu_ps(second, scale + n0 + 16);
            for (int64_t m0 = 0; m0 < padded; m0 += 16) {
                _tile_zero(2);
                _tile_zero(3);
                for (int64_t i = 0; i < steps; i++) {
                    _tile_loadd(0, xp + m0 * in + i * 32, in * 2);
                    _tile_loadd(1, bt + i * 512, 64);
                    _tile_dpbf16ps(2, 0, 1);
                    _tile_loadd(1, bt + 16 * in + i * 512, 64);
                    _tile_dpbf16ps(3, 0, 1);
                }
                _tile_stored(2, c, 128);
                _tile_stored(3, c + 16, 128);
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
#endif
}
"""


def library() -> ctypes.CDLL | None:
    """The compiled kernel where this CPU has AVX512-BF16; None elsewhere."""
    lib = build("cpu_int8", _SOURCE, (("int8_matmul_bf16", (PTR,) * 4 + (I64,) * 4 + (INT,)),
                                      ("int8_matmul_built", (), ctypes.c_int)))
    return lib if lib is not None and lib.int8_matmul_built() else None


def _matmul(rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = qweight.shape
    count = rows.shape[0]
    padded = rows.new_zeros(-(-count // 16) * 16, k)  # whole tiles of rows
    padded[:count] = rows
    out = rows.new_empty(count, n)
    library().int8_matmul_bf16(padded.data_ptr(), qweight.data_ptr(), scale.data_ptr(), out.data_ptr(), count, n, k,
                               out.stride(0), torch.get_num_threads())
    return out


# An opaque op inside a compiled graph.
matmul = opaque_op("cpu_int8_matmul", _matmul,
                   lambda rows, qweight, scale: rows.new_empty(rows.shape[0], qweight.shape[0]))


@functools.cache  # once per process
def checks_out() -> bool:
    """The kernel builds and gives the float product (to bf16's rounding) of 1, 5 and 33 rows, strided ones too,
    with a partial block of channels: else torch's int8 kernel stays."""
    try:
        if library() is None:
            return False
        gen = torch.Generator().manual_seed(0)
        q = torch.randint(-128, 128, (40, 96), generator=gen, dtype=torch.int8)
        scale = torch.rand(40, generator=gen) / 64
        for count in (1, 5, 33):
            x = torch.randn(count, 128, generator=gen).bfloat16()[:, :96]
            want = (x.double() @ q.double().t()) * scale.double()
            if not torch.allclose(matmul(x, q, scale).double(), want, atol=1e-2, rtol=1e-2):
                return False
        return True
    except Exception:  # noqa: BLE001 (any failure to build or run: torch's kernel stays)
        return False
