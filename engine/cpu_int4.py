"""4-bit weights (engine.int4_linear) dequantized on the CPU by one C pass (engine.c_kernels).

PyTorch's ops take five passes over the weights to unpack the two codes of each byte, subtract 8, scale and add
the zero point, what every prefill step of an int4 model pays; here a group's bytes are read once and its weights
written once, rows split over OpenMP threads (SmolLM2's projections on a 2-core Xeon: bf16 86 -> 52 ms, float32
70 -> 27), a group's 32 bf16 weights by AVX-512 (BF16) vectors where the CPU has them (3,072 x 576 on an AMX Xeon:
682 -> 152 us; 120 us with each group's 16 possible weights computed once and looked up). The result is PyTorch's:
in bf16 the same two roundings (after the scale, after the zero point), bit for bit; in float32 the same up to the
compiler fusing the multiply-add (an ulp). engine.int4_linear uses it where it checks out."""
import ctypes
import functools

import torch

from engine.c_kernels import BF16, I64, INT, PTR, build

GROUP = 32  # input channels a scale and zero point cover: the C code's constant

# A group's weights in bf16 as vectors: shared with the AMX products of int4 weights (engine.cpu_amx_matmul).
GROUP_WORDS = r"""
#if defined(__AVX512BF16__)
/* A group's 32 bf16 weights from its 16 bytes, in channel order, as the scalar code rounds them (RNE after the scale
   and after the zero point): the group's 16 possible weights computed once, then looked up by each nibble (the even
   channel's the low one of its byte). */
INLINE __m512i group_words(const uint8_t *c, float scale, float zero) {
    const __m512 q = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512 scaled = bf16_to_f32((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(q, _mm512_set1_ps(scale))));
    const __m512i weights = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(
        _mm512_add_ps(scaled, _mm512_set1_ps(zero))));
    /* byte b -> the 16-bit pair (b & 15, b >> 4): the two channels' indices into the 16 weights */
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)c));
    const __m512i index = _mm512_or_si512(_mm512_and_si512(bytes, _mm512_set1_epi32(15)),
                                          _mm512_slli_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0xf0)), 12));
    return _mm512_permutexvar_epi16(index, weights);
}
#endif
"""

_SOURCE = BF16 + GROUP_WORDS + r"""

/* codes [rows, in / 2] (low nibble: the even channel), scales [rows, in / GROUP, 2] float32 (scale, zero) ->
   out [rows, in]: (q - 8) * scale + zero, rounded to bf16 after each step as PyTorch's bf16 ops round, or float32.
   A group's 16 bytes at a time: its 32 weights. */
#define GROUP 32
void dequantize_int4(const uint8_t *codes, const float *scales, void *out, int64_t rows, int64_t in, int is_bf16,
                     int threads) {
    #pragma omp parallel for num_threads(threads)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < in / GROUP; g++) {
            const uint8_t *c = codes + r * (in / 2) + g * (GROUP / 2);
            float scale = scales[(r * (in / GROUP) + g) * 2], zero = scales[(r * (in / GROUP) + g) * 2 + 1];
            float w[GROUP];
#if defined(__AVX512BF16__)
            if (is_bf16) {
                _mm512_storeu_si512((uint16_t *)out + r * in + g * GROUP,
                                    group_words(c, bf16_load(bf16_round(scale)), bf16_load(bf16_round(zero))));
                continue;
            }
#endif
            if (is_bf16) {
                scale = bf16_load(bf16_round(scale)), zero = bf16_load(bf16_round(zero));
                for (int x = 0; x < GROUP / 2; x++) {
                    w[2 * x] = bf16_load(bf16_round(((c[x] & 15) - 8) * scale)) + zero;
                    w[2 * x + 1] = bf16_load(bf16_round(((c[x] >> 4) - 8) * scale)) + zero;
                }
                uint16_t *o = (uint16_t *)out + r * in + g * GROUP;
                for (int x = 0; x < GROUP; x++) o[x] = bf16_round(w[x]);
            } else {
                for (int x = 0; x < GROUP / 2; x++) {
                    w[2 * x] = ((c[x] & 15) - 8) * scale + zero;
                    w[2 * x + 1] = ((c[x] >> 4) - 8) * scale + zero;
                }
                memcpy((float *)out + r * in + g * GROUP, w, sizeof w);
            }
        }
}
"""


def library() -> ctypes.CDLL | None:
    return build("cpu_int4", _SOURCE, (("dequantize_int4", (PTR,) * 3 + (I64,) * 2 + (INT, INT)),))


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """engine.int4_linear.dequantize_int4's weights [rows, in] in dtype (float32 or bfloat16), groups of GROUP."""
    codes, scales = codes.contiguous(), scales.to(torch.float32).contiguous()
    out = torch.empty(codes.shape[0], codes.shape[1] * 2, dtype=dtype)
    library().dequantize_int4(codes.data_ptr(), scales.data_ptr(), out.data_ptr(), codes.shape[0], out.shape[1],
                              dtype == torch.bfloat16, torch.get_num_threads())
    return out


@functools.cache
def checks_out(group: int) -> bool:
    """The C pass gives PyTorch's weights for groups of that size: bf16 bit for bit, float32 to an ulp."""
    from engine.int4_linear import dequantize_int4_by_ops, pack_codes, quantize_int4
    if group != GROUP or library() is None:
        return False
    q, scales = quantize_int4(torch.randn(40, 4 * group, generator=torch.Generator().manual_seed(0)))
    codes = pack_codes(q)
    for dtype, tol in ((torch.bfloat16, 0.0), (torch.float32, 1e-6)):
        want = dequantize_int4_by_ops(codes, scales, dtype)
        if not torch.allclose(dequantize(codes, scales, dtype), want, rtol=tol, atol=tol):
            return False
    return True
