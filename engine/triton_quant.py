"""Per-token quantization of activations as one Triton kernel (CUDA): what engine.quantization's quantize_fp8
and quantize_int8 compute op by op (eight kernels each: cast, abs, amax, clamp, two divisions, clamp or round,
cast), in one pass over each row for its scale and one for its values. fp8 and w8a8 layers quantize their
input before every matmul, so op by op that is most of a decode step's launches. engine.kernels picks it
where it checks out."""
import functools

import torch

from engine.quantization import FP8, FP8_MAX, quantize_fp8, quantize_int8
from engine.triton_fp8 import round_to_e4m3

BLOCK = 4096  # columns per loop iteration; wider rows take several
INT8_MAX = 127.0
# float32's ulp at 1.5 * 2^23 is 1: adding and subtracting it rounds to an integer, ties to even.
INTEGER_ROUNDER = 12582912.0


@functools.cache  # one jit function per process; Triton specialises it per shape
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows(x_ptr, q_ptr, scale_ptr, n, stride_x, stride_q, INT8: tl.constexpr, LARGEST: tl.constexpr,
                      INTEGER_ROUNDER: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            x = tl.load(x_ptr + row * stride_x + start + cols, mask=start + cols < n, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), LARGEST)  # as quantization._row_scales
        for start in range(0, n, BLOCK):
            ok = start + cols < n
            x = tl.load(x_ptr + row * stride_x + start + cols, mask=ok, other=0.0).to(tl.float32)
            q = tl.math.div_rn(x, scale)
            # Rounded here (to nearest, ties to even), so the cast below is exact (engine.triton_fp8).
            if INT8:
                q = (q + INTEGER_ROUNDER) - INTEGER_ROUNDER
            else:
                q = round_to_e4m3(q)
            tl.store(q_ptr + row * stride_q + start + cols, q.to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(scale_ptr + row, scale)

    return quantize_rows


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, n] (rows contiguous) -> dtype (float8 e4m3 or int8) rows and float32 scales [rows, 1], as
    quantize_fp8 / quantize_int8."""
    rows, n = x.shape
    assert x.stride(1) == 1, "the kernel reads each row's values contiguously"
    q = torch.empty((rows, n), dtype=dtype, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        import triton
        block = min(BLOCK, triton.next_power_of_2(n))
        int8 = dtype == torch.int8
        _kernel()[(rows,)](x, q, scale, n, x.stride(0), q.stride(0), INT8=int8, LARGEST=INT8_MAX if int8 else FP8_MAX,
                           INTEGER_ROUNDER=INTEGER_ROUNDER, BLOCK=block,
                           num_warps=4 if block <= 2048 else 8)
    return q, scale


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows(x, FP8)


def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows(x, torch.int8)


@functools.cache
def checks_out(device: torch.device, dtype: torch.dtype) -> bool:
    """The kernel gives the PyTorch quantizer's scales and values bit for bit on the device (both divide with
    correct rounding: the kernel by div_rn, since Triton's `/` on a GPU is approximate; see
    quantization._row_scales), for a narrow row and one wider than a block; a Triton that fails to build or
    lacks the dtype there leaves the PyTorch ops in place."""
    reference = quantize_int8 if dtype == torch.int8 else quantize_fp8
    gen = torch.Generator(device=device).manual_seed(0)
    try:
        for n in (64, BLOCK + 576):
            x = torch.randn(7, n, generator=gen, device=device) * torch.logspace(-3, 3, 7, device=device)[:, None]
            x = x.to(torch.bfloat16)
            (q, scale), (want_q, want_scale) = quantize_rows(x, dtype), reference(x)
            if not (torch.equal(scale, want_scale) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))):
                return False
    except Exception:  # noqa: BLE001 (any failure to build or run: the PyTorch ops stay)
        return False
    return True
