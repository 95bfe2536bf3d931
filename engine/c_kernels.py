"""C kernels for the CPU, compiled on the machine that runs them (as inductor compiles its CPU kernels).

Each source is compiled once per machine with the system's C compiler for that CPU (-march=native, OpenMP from
the same libgomp torch loads) into a cache directory keyed by the source, the compiler, the flags and the CPU,
and loaded through ctypes. Where no compiler builds it, build() gives None and the caller keeps its PyTorch ops.
Every kernel is also checked against its reference at start-up by its module before the engine uses it."""
import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC")
I64, PTR, F32, INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int


def pointer(tensor) -> int | None:
    """A tensor's data as a PTR argument; NULL (None) for no tensor."""
    return None if tensor is None else tensor.data_ptr()

# Shared by the sources: bf16 words to float32 and back (to nearest even, as torch rounds; NaN stays NaN), and
# with AVX-512 sixteen at a time to float32, a vector exp, lane masks, 16 vectors' sums at once and a 16 x 16
# transpose.
BF16 = r"""
#include <stdint.h>
#include <string.h>
#define INLINE static inline __attribute__((always_inline))
INLINE float bf16_load(uint16_t x) { uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f; }
INLINE uint16_t bf16_round(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    u = (u & 0x7fffffffu) > 0x7f800000u ? u | 0x400000u : u + 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
#if defined(__AVX512F__)
#include <immintrin.h>
/* 16 bf16 words to float32: a bf16 is the high half of its float32. */
INLINE __m512 bf16_to_f32(__m256i words) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(words), 16));
}

INLINE __m512 bf16x16_load(const uint16_t *p) { return bf16_to_f32(_mm256_loadu_si256((const __m256i *)p)); }

/* e^x: 2^n by scalef (0 below float32's range, inf above) times a degree-5 polynomial for 2^f, f in [-1/2, 1/2]
   (relative error ~2e-7, float32's own; libm's expf does not vectorize). */
INLINE __m512 exp_ps(__m512 x) {
    const __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(y, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.33335581e-3f), f, _mm512_set1_ps(9.61812911e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.55041087e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40226507e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.93147182e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* The first n of 16 lanes (none for n <= 0, all from 16). */
INLINE __mmask16 first_lanes(int64_t n) { return n <= 0 ? 0 : n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1); }

/* Lane j: the sum of v[SUM16_SLOT[j]]'s lanes. Halves of 512, then 256 bits added across pairs of vectors, then
   pairs of lanes, then lanes: ~45 vector ops for 16 sums, where one sum alone takes ~8. */
static const int SUM16_SLOT[16] __attribute__((unused)) = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
INLINE __m512 sum16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xee));
    for (int i = 0; i < 4; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], 0x88), _mm512_shuffle_f32x4(a[i], a[i + 4], 0xdd));
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[i], b[i + 2]), _mm512_unpackhi_ps(b[i], b[i + 2]));
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]))),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]))));
}

/* A 16 x 16 block of 32-bit words transposed in registers: 4 x 4 blocks within each 128-bit lane, then the lanes. */
INLINE void transpose_16x16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  /* r[i + c], lane L: column 4 L + c of rows i to i + 3 */
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int c = 0; c < 4; c++) {  /* row 4 L + c: lane L of r[c], r[4 + c], r[8 + c], r[12 + c] */
        const __m512i ab_lo = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44);
        const __m512i ab_hi = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xee);
        const __m512i cd_lo = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
        const __m512i cd_hi = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xee);
        t[c] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0x88);
        t[4 + c] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0xdd);
        t[8 + c] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0x88);
        t[12 + c] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0xdd);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}
#endif
"""

# For sources with AMX tile products (after BF16): AMX is compiled where the CPU has AMX-BF16 and AVX512-BF16 (on
# Linux, which lends the tiles), and every tile is 16 rows of 64 bytes.
AMX = r"""
#if defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define AMX 1
#include <sys/syscall.h>
#include <unistd.h>

/* Linux lends the AMX tile registers to a process that asks (torch's oneDNN asks too; asking again is free). */
INLINE int amx_permitted(void) { return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) == 0; }

/* Every tile 16 rows of 64 bytes: 16 x 32 bf16, 16 x 16 bf16 pairs or 16 x 16 float32. */
typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } TileConfig;

INLINE void configure_tiles(void) {  /* per thread: the tile configuration is a thread's state */
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) { c.colsb[t] = 64; c.rows[t] = 16; }
    _tile_loadconfig(&c);
}

/* c and c + 64 bytes (16 x 16 float32, or int32 where int8; rows c_stride bytes apart) = the sum over `steps` of A
   times B and A times B': A the 16-row tile at a + i * a_step (32 bf16 or 64 int8 a row), B and B' the tiles at
   b + i * b_step and 64 bytes on (16 pairs of bf16, or 16 groups of 4 int8, a row). */
INLINE void products(const char *a, int64_t a_step, int64_t a_stride, const char *b, int64_t b_step, int64_t b_stride,
                     int64_t steps, void *c, int64_t c_stride, const int int8) {
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t i = 0; i < steps; i++) {
        _tile_loadd(0, a + i * a_step, a_stride);
        _tile_loadd(1, b + i * b_step, b_stride);
        if (int8) _tile_dpbssd(2, 0, 1); else _tile_dpbf16ps(2, 0, 1);
        _tile_loadd(1, b + i * b_step + 64, b_stride);
        if (int8) _tile_dpbssd(3, 0, 1); else _tile_dpbf16ps(3, 0, 1);
    }
    _tile_stored(2, c, c_stride);
    _tile_stored(3, (char *)c + 64, c_stride);
}
#endif
"""

# For sources that read or write a float8 KV pool (after BF16): e4m3 bytes (kv_cache_dtype fp8) to float32 and back.
E4M3 = r"""
#include <math.h>
INLINE float e4m3_value(uint8_t b) {
    const int e = (b >> 3) & 15, m = b & 7;
    const float magnitude = e ? ldexpf(8 + m, e - 10) : ldexpf(m, -9);
    return b & 0x80 ? -magnitude : magnitude;
}

/* x (|x| <= 448) to the nearest e4m3, ties to even, as torch's cast rounds: below 2^-6 the multiples of 2^-9,
   else three bits of mantissa (a carry into the exponent is the next power of two). */
INLINE uint8_t e4m3_round(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    const uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    u &= 0x7fffffffu;
    if (u < (121u << 23)) return sign | (uint8_t)nearbyintf(fabsf(x) * 512.0f);
    u += 0x7ffffu + ((u >> 20) & 1u);
    return sign | (uint8_t)((u >> 20) - (120u << 3));
}
#if defined(__AVX512F__)
/* 32 e4m3 bytes times scale in float32, exactly (lo: the first 16): each sign-extended to 16 bits and shifted under
   fp16's (s eeeee mmmmmmmmmm, the exponent's top bit cleared) is 2^-8 of its value, subnormals too, widened by
   vcvtph2ps; the 2^8 goes into the scale (a power of two: the product is still rounded once). */
INLINE void e4m3x32_widen(const uint8_t *x, float scale, __m512 *lo, __m512 *hi) {
    const __m512i half = _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(_mm256_loadu_si256(
        (const __m256i *)x)), 7), _mm512_set1_epi16((short)0xbf80));
    const __m512 times = _mm512_set1_ps(scale * 256.0f);
    *lo = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(half)), times);
    *hi = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(half, 1)), times);
}

/* e4m3_round of 16 lanes (the small ones by vcvtps2dq: to nearest even under the default rounding mode). */
INLINE __m128i e4m3x16_round(__m512 x) {
    const __m512i u = _mm512_castps_si512(x), a = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(a, 20), _mm512_set1_epi32(1));
    const __m512i normal = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(a, odd),
        _mm512_set1_epi32(0x7ffff)), 20), _mm512_set1_epi32(120 << 3));
    const __m512i small = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(512.0f)));
    const __m512i bits = _mm512_mask_blend_epi32(_mm512_cmplt_epi32_mask(a, _mm512_set1_epi32(121 << 23)), normal,
                                                 small);
    return _mm512_cvtepi32_epi8(_mm512_or_si512(bits, _mm512_srli_epi32(_mm512_andnot_si512(a, u), 24)));
}
#endif
"""

@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (avx512_bf16, amx_bf16, ...); none where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU's model and flags."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        return platform.processor()


def _cache_dirs() -> list[str]:
    """Where built libraries are kept: the user's cache, else (a read-only home) a directory of the temp dir."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    user = getattr(os, "getuid", lambda: "user")()
    return [os.path.join(root, "servecluster", "kernels"),
            os.path.join(tempfile.gettempdir(), f"servecluster-kernels-{user}")]


def _compile(source: str, compiler: str, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        src, lib = os.path.join(tmp, "kernel.c"), os.path.join(tmp, "kernel.so")
        with open(src, "w") as f:
            f.write(source)
        subprocess.run([compiler, *FLAGS, src, "-o", lib, "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(lib, path)  # atomic: replicas compiling at once each install a whole file


@functools.cache  # compiled and loaded once per process
def build(stem: str, source: str, signatures: tuple[tuple, ...]) -> ctypes.CDLL | None:
    """The library of source (its functions' types set from signatures: (name, argument types[, result type]),
    void where none is named); None
    where it does not build or load, with a warning naming what it costs."""
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256("\n".join([source, compiler, *FLAGS, _cpu_identity()]).encode()).hexdigest()[:16]
    errors = []
    for directory in _cache_dirs():
        path = os.path.join(directory, f"{stem}_{key}.so")
        try:
            if not os.path.exists(path):
                _compile(source, compiler, path)
            lib = ctypes.CDLL(path)
        except (OSError, subprocess.SubprocessError) as e:
            detail = (getattr(e, "stderr", b"") or b"").decode(errors="replace")[-500:]
            errors.append(f"{path}: {e} {detail}".strip())
            continue
        for name, argtypes, *restype in signatures:
            getattr(lib, name).argtypes, getattr(lib, name).restype = list(argtypes), (restype or [None])[0]
        return lib
    log.warning("the CPU kernels %s did not build (%s): the slower PyTorch ops run instead; a C compiler with "
                "OpenMP (gcc; CC names another) builds them", stem, "; ".join(errors))
    return None
