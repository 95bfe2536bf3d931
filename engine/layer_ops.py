"""A layer's elementwise passes: op by op in PyTorch, or fused (Triton on CUDA, C on the CPU).

Between its matmuls a decoder layer adds each branch to the residual stream and normalizes the sum (twice),
rotates queries and keys (after Qwen3's per-head norm), writes keys and values into the KV cache and gates
its MLP. Op by op that is over a dozen kernels a layer, each a pass over the step's activations: on a GPU
most of a decode step's launches and much of a prefill step's memory traffic. The fused ops run each group
as one kernel that reads its inputs once, computes in float32 and rounds once (what vLLM's
fused_add_rms_norm, rotary, reshape_and_cache and silu_and_mul kernels do).
engine.kernels picks them for CUDA in fp16 / bf16 and the CPU in bf16 where they match the PyTorch ops on the
device at start-up (fused_ops_check_out); float32 keeps Hugging Face's roundings op by op (token for token
parity), and a compiled model traces the PyTorch ops and fuses them itself. An encoder layer's (add + LayerNorm,
the MLP's activation) are fused on the CPU in bf16 (EncoderLayerOps)."""
import torch
import torch.nn.functional as F

from engine import cpu_layer_ops, triton_layer_ops
from engine.attention import CacheWrite, dequantized_kv, write_kv


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim], queries and keys together; cos, sin: RotaryEmbedding.tables. Bit for bit
    Hugging Face's x1*cos - x2*sin, x2*cos + x1*sin in x's dtype (negating a factor is exact), in four kernels."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((x2, x1), dim=-1) * sin


class LayerOps:
    """Op by op in PyTorch, rounding where Hugging Face rounds: every device."""
    name = "PyTorch"

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); the first layer has no residual yet: x is the stream."""
        if residual is not None:
            x = x + residual
        return norm(x), x

    def attention_inputs(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
                         rotary: tuple[torch.Tensor, torch.Tensor], q_norm=None, k_norm=None, *,
                         cache: CacheWrite | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv [tokens, heads + 2 kv heads, dim] -> queries, keys and values for attention: queries and keys
        rotated (after q_norm / k_norm, Qwen3's per-head RMSNorms) together, keys and values written into the
        cache where there is one. Views: the kernels take strided heads."""
        if q_norm is not None:
            q, k = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads]
            qk = torch.cat((q_norm(q), k_norm(k)), dim=1)
        else:
            qk = qkv[:, :num_heads + num_kv_heads]
        q, k = apply_rotary(qk, *rotary).split((num_heads, num_kv_heads), dim=1)
        v = qkv[:, num_heads + num_kv_heads:]
        if cache is not None:
            write_kv(cache, k, v)
        return q, k, v

    def gated_activation(self, gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
        """[tokens, 2 n] (gate, up) -> act(gate) * up, act SiLU or (Gemma) tanh-approximated GELU."""
        gate, up = gate_up.chunk(2, dim=-1)
        return (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up


class FusedLayerOps(LayerOps):
    """One kernel per group: Triton's on CUDA (engine.triton_layer_ops); PyTorch where a compiled model traces them."""
    name = "fused (Triton)"
    kernels = triton_layer_ops  # a module of the three ops, and MAX_ROW: the widest row its add_rms_norm holds

    def add_rms_norm(self, x, residual, norm):
        if torch.compiler.is_compiling() or x.shape[-1] > self.kernels.MAX_ROW:
            return super().add_rms_norm(x, residual, norm)
        return self.kernels.add_rms_norm(x, residual, norm.weight, norm.eps, norm.gemma)

    def attention_inputs(self, qkv, num_heads, num_kv_heads, rotary, q_norm=None, k_norm=None, *, cache=None):
        if torch.compiler.is_compiling():
            return super().attention_inputs(qkv, num_heads, num_kv_heads, rotary, q_norm, k_norm, cache=cache)
        norms = (None, None, 0.0) if q_norm is None else (q_norm.weight, k_norm.weight, q_norm.eps)
        qk = self.kernels.rotate_qk(qkv, num_heads, num_kv_heads, *rotary, *norms, cache)
        return *qk.split((num_heads, num_kv_heads), dim=1), qkv[:, num_heads + num_kv_heads:]

    def gated_activation(self, gate_up, gelu):
        if torch.compiler.is_compiling():
            return super().gated_activation(gate_up, gelu)
        return self.kernels.gated_activation(gate_up, gelu)


class CPUFusedLayerOps(FusedLayerOps):
    """The same groups as C kernels on the CPU, bf16 (engine.cpu_layer_ops)."""
    name = "fused (C)"
    kernels = cpu_layer_ops


class EncoderLayerOps:
    """An encoder layer's elementwise passes op by op in PyTorch (every device): the residual add and LayerNorm
    after attention and after the MLP, and the MLP's activation."""
    name = "PyTorch"

    def add_layer_norm(self, x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
        return norm(x + residual)

    def activation(self, x: torch.Tensor, fn) -> torch.Tensor:
        """fn(x), fn elementwise; x, a product's output that nothing else reads, may be written over."""
        return fn(x)


class CPUEncoderLayerOps(EncoderLayerOps):
    """C kernels on the CPU in bf16 (engine.cpu_layer_ops): add + LayerNorm in one pass, and the activation by a
    table of PyTorch's own results at every bf16 number (bit for bit), in place. In all-MiniLM-L6-v2's bf16
    steps on a 2-core AMX Xeon, PyTorch's exact GELU took ~3.2 ms per 8,192 x 1,536 call (the erf, not memory)
    against ~1.35 ms looked up, and its add then LayerNorm 1.5 against 1.0-1.3 ms fused."""
    name = "fused (C)"

    def add_layer_norm(self, x, residual, norm):
        if torch.compiler.is_compiling():
            return super().add_layer_norm(x, residual, norm)
        return cpu_layer_ops.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)

    def activation(self, x, fn):
        if torch.compiler.is_compiling() or not x.is_contiguous():
            return super().activation(x, fn)
        return cpu_layer_ops.apply_elementwise(x, fn)


def encoder_ops_check_out(ops: EncoderLayerOps, hidden: int, fn, eps: float) -> bool:
    """ops give the PyTorch ops' results on the CPU in bf16 (to bf16's rounding) at the model's width, LayerNorm
    epsilon and activation: kernels that fail to build or answer differently leave the PyTorch ops in place."""
    gen = torch.Generator().manual_seed(0)
    norm = torch.nn.LayerNorm(hidden, eps).to(torch.bfloat16)
    x, residual, weight, bias, h = (torch.randn(*shape, generator=gen).bfloat16()
                                    for shape in ((5, hidden), (5, hidden), (hidden,), (hidden,), (5, 4 * hidden)))
    norm.weight.data, norm.bias.data = weight, bias
    try:
        pairs = [(ops.add_layer_norm(x, residual, norm), EncoderLayerOps().add_layer_norm(x, residual, norm)),
                 (ops.activation(h.clone(), fn), fn(h))]
        return all(torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2) for got, want in pairs)
    except Exception:  # noqa: BLE001 (any failure to build or run: the PyTorch ops stay)
        return False


def fused_ops_check_out(device: torch.device, dtype: torch.dtype, spec, kv_dtype: torch.dtype | None = None,
                        fused: FusedLayerOps | None = None) -> bool:
    """The fused ops (default: Triton's) give the PyTorch ops' results (to the dtype's rounding) for the model's
    shapes (spec: a DecoderSpec) and KV cache dtype (None: dtype) on the device: kernels that fail to build or
    answer differently leave the PyTorch ops in place. Also builds the kernels before a CUDA graph captures them."""
    fused = fused or FusedLayerOps()
    from engine.models.decoder import RMSNorm
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    hidden, heads, kv, dim = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    norm, head_norm = RMSNorm(hidden, spec.eps, spec.gemma), RMSNorm(dim, spec.eps, False)
    for n in (norm, head_norm):
        n.to(device)
        n.weight.data = randn(n.weight.shape[0])
    t, slots = 5, torch.randperm(16, generator=gen, device=device)[:5]  # scattered slots of a small pool
    qkv, tables = randn(t, heads + 2 * kv, dim), (randn(t, 1, dim), randn(t, 1, dim))
    x, residual, gate_up = randn(t, hidden), randn(t, hidden), randn(t, 2 * spec.intermediate_size)
    head_norms = (head_norm, head_norm) if spec.qk_norm else ()

    pool_dtype = kv_dtype or dtype
    fp8_pool = pool_dtype.itemsize == 1

    def rotate_and_write(ops: LayerOps) -> tuple[torch.Tensor, ...]:
        scales = [torch.zeros(16, kv, device=device) for _ in range(2)] if fp8_pool else [None, None]
        cache = CacheWrite(torch.zeros(16, kv, dim, device=device, dtype=pool_dtype),
                           torch.zeros(16, kv, dim, device=device, dtype=pool_dtype), slots, *scales)
        ops.attention_inputs(qkv, heads, kv, tables, *head_norms, cache=cache)
        return dequantized_kv(cache.k_cache, cache.k_scale, torch.float32), \
            dequantized_kv(cache.v_cache, cache.v_scale, torch.float32)
    # A float8 pool's values are compared dequantized, within one rounding step (1/8 of a value): the fused write
    # divides as the PyTorch one does (correctly rounded), but a conversion on some device may round otherwise.
    cases = [(lambda ops: ops.add_rms_norm(x, residual, norm), 2e-2),
             (lambda ops: ops.add_rms_norm(x, None, norm), 2e-2),
             (lambda ops: ops.attention_inputs(qkv, heads, kv, tables, *head_norms), 2e-2),
             (rotate_and_write, 0.13 if fp8_pool else 2e-2),
             (lambda ops: (ops.gated_activation(gate_up, spec.gelu),), 2e-2)]
    try:
        for case, tol in cases:
            for got, want in zip(case(fused), case(LayerOps()), strict=True):
                if not torch.allclose(got.float(), want.float(), atol=tol, rtol=tol):
                    return False
    except Exception:  # noqa: BLE001 (any failure to build or run: the PyTorch ops stay)
        return False
    return True
