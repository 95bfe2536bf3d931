"""Per-token float8 quantization of activations as one Triton kernel (CUDA): what engine.quantization's
quantize_fp8 computes op by op (eight kernels: cast, abs, amax, clamp, two divisions, clamp, cast), in one
pass over each row for its scale and one for its values. fp8 layers quantize their input before every
matmul, so op by op that is most of a decode step's launches. engine.kernels picks it where it checks out."""
import functools

import torch

from engine.quantization import FP8, FP8_MAX, dequantize, quantize_fp8

BLOCK = 4096  # columns per loop iteration; wider rows take several
# float32's ulp at 1.5 * 2^14 is 2^-9, e4m3's subnormal step: adding and subtracting it rounds to that step.
SUBNORMAL_ROUNDER = 24576.0


@functools.cache  # one jit function per process; Triton specialises it per shape
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows(x_ptr, q_ptr, scale_ptr, n, stride_x, stride_q, LARGEST: tl.constexpr,
                      SUBNORMAL_ROUNDER: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            x = tl.load(x_ptr + row * stride_x + start + cols, mask=start + cols < n, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / LARGEST
        for start in range(0, n, BLOCK):
            ok = start + cols < n
            x = tl.load(x_ptr + row * stride_x + start + cols, mask=ok, other=0.0).to(tl.float32)
            q = x / scale
            # Rounded to e4m3's grid here (to nearest, ties to even), so the cast below is exact: Triton's
            # interpreter casts values that round up into the next power of two to half of it.
            mag = tl.abs(q)
            bits = mag.to(tl.int32, bitcast=True)
            normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0x7FF00000).to(tl.float32, bitcast=True)
            subnormal = (mag + SUBNORMAL_ROUNDER) - SUBNORMAL_ROUNDER  # multiples of 2^-9
            mag = tl.minimum(tl.where(mag < 0.015625, subnormal, normal), LARGEST)
            tl.store(q_ptr + row * stride_q + start + cols, tl.where(q < 0, -mag, mag).to(q_ptr.dtype.element_ty),
                     mask=ok)
        tl.store(scale_ptr + row, scale)

    return quantize_rows


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, n] (rows contiguous) -> float8 e4m3 rows and float32 scales [rows, 1], as quantize_fp8."""
    rows, n = x.shape
    q = torch.empty((rows, n), dtype=FP8, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        import triton
        block = min(BLOCK, triton.next_power_of_2(n))
        _kernel()[(rows,)](x, q, scale, n, x.stride(0), q.stride(0), LARGEST=FP8_MAX,
                           SUBNORMAL_ROUNDER=SUBNORMAL_ROUNDER, BLOCK=block,
                           num_warps=4 if block <= 2048 else 8)
    return q, scale


@functools.cache
def checks_out(device: torch.device) -> bool:
    """The kernel gives quantize_fp8's scales and, to within one float8 rounding, its values on the device (a
    division or a cast may round a quotient at a boundary the other way), for a narrow row and one wider than
    a block; a Triton that fails to build or has no float8 there leaves the PyTorch ops in place."""
    gen = torch.Generator(device=device).manual_seed(0)
    try:
        for n in (64, BLOCK + 576):
            x = torch.randn(7, n, generator=gen, device=device) * torch.logspace(-3, 3, 7, device=device)[:, None]
            got, want = quantize_fp8_rows(x.to(torch.bfloat16)), quantize_fp8(x.to(torch.bfloat16))
            if not torch.allclose(got[1], want[1], rtol=1e-6, atol=0):
                return False
            step = dequantize(want[0], want[1], torch.float32).abs() / 8 + want[1] * 2.0 ** -9
            if not torch.all((dequantize(got[0], got[1], torch.float32) - dequantize(*want, torch.float32)).abs()
                             <= step):
                return False
    except Exception:  # noqa: BLE001 (any failure to build or run: the PyTorch ops stay)
        return False
    return True
