"""float8 e4m3 rounding inside Triton kernels, for kernels that store float8 (activations quantized for fp8
matmuls, keys and values written into an fp8 KV cache): rounded here, to nearest with ties to even and
saturating at the largest value, a float becomes exactly an e4m3 value, so the cast after it is exact. The
hardware's cast rounds the same way; Triton's interpreter (the CPU tests) casts a float that rounds up into
the next power of two to half of it."""
try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the kernels that call it are never built
    triton = None

round_to_e4m3 = quantize_row_halves = None
if triton is not None:
    @triton.jit
    def round_to_e4m3(x):
        # Normal values keep 3 significand bits (float32 keeps 23: round the other 20 away, ties to even);
        # below 2^-6 the subnormals step by 2^-9, float32's ulp at 1.5 * 2^14.
        mag = tl.abs(x)
        bits = mag.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0x7FF00000).to(tl.float32, bitcast=True)
        subnormal = (mag + 24576.0) - 24576.0
        mag = tl.minimum(tl.where(mag < 0.015625, subnormal, normal), 448.0)
        # The sign bit copied as a bit: a negative that rounds to zero stays -0 as the cast keeps it (on an H200
        # `where(x < 0, -mag, mag)` gave +0 there).
        sign = x.to(tl.int32, bitcast=True) & -2147483648
        return (mag.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def quantize_row_halves(x1, x2):
        # Rows held as two halves [rows, half]: each row's scale absmax / 448, divided with correct rounding as
        # engine.quantization._row_scales (Triton's `/` is approximate on a GPU), and its values as e4m3.
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
        amax = tl.maximum(tl.maximum(tl.max(tl.abs(x1), axis=1), tl.max(tl.abs(x2), axis=1)), 1e-12)
        scale = tl.math.div_rn(amax, 448.0)
        return (round_to_e4m3(tl.math.div_rn(x1, scale[:, None])), round_to_e4m3(tl.math.div_rn(x2, scale[:, None])),
                scale)
