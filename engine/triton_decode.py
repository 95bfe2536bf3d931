"""Decode attention read in place from the paged pool (CUDA, Triton).

One program per (sequence, kv head): it loads the query rows of the kv head's query heads, walks the
sequence's context a tile of slots at a time, looking each slot's block up in the block table, and
keeps an online softmax. Both products run on the matrix units (`tl.dot`), the query rows padded to
16, their minimum. No dense copy of any context is made, and the shapes depend only on the batch
size, so a CUDA graph can replay it."""
import functools

import torch

from engine.context import Context

TILE = 64  # context slots per loop iteration
MIN_DOT = 16  # tl.dot's smallest M, N and K


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache  # one jit function per process; Triton specialises it per shape
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode(q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, lens_ptr, scale,
                     stride_q, stride_qh, stride_k, stride_kh, stride_o, stride_oh, stride_table,
                     GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr):
        seq, kv_head = tl.program_id(0), tl.program_id(1)
        length = tl.load(lens_ptr + seq)
        g, d, t = tl.arange(0, ROWS), tl.arange(0, DIM_P2), tl.arange(0, TILE)
        g_ok, d_ok = g < GROUP, d < HEAD_DIM
        heads = kv_head * GROUP + g
        q = tl.load(q_ptr + seq * stride_q + heads[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        m = tl.full([ROWS], float("-inf"), tl.float32)
        l = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DIM_P2], tl.float32)
        for start in range(0, length, TILE):
            pos = start + t
            t_ok = pos < length
            block = tl.load(table_ptr + seq * stride_table + pos // BLOCK_SIZE, mask=t_ok, other=0)
            slots = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
            kv_mask = t_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + slots[:, None] * stride_k + kv_head * stride_kh + d[None, :], mask=kv_mask,
                        other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [ROWS, TILE]
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(v_ptr + slots[:, None] * stride_k + kv_head * stride_kh + d[None, :], mask=kv_mask,
                        other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
        out = acc / tl.where(l > 0, l, 1.0)[:, None]  # a padding row (length 0) writes zeros
        tl.store(out_ptr + seq * stride_o + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])

    return paged_decode


class TritonPagedDecode:
    graphable = True

    def prepare(self, ctx: Context, block_size: int) -> None:
        return None

    def __call__(self, layer, q, ctx: Context) -> torch.Tensor:
        args = (q, layer.k_cache, layer.v_cache, ctx.decode_block_table, ctx.decode_context_lens, layer.scale,
                layer.num_kv_heads, layer.block_size)
        # Inside a compiled model (torch_compile) the launch is one opaque op, so inductor fuses the ops around
        # it and a CUDA graph captures both; eager, the direct launch skips the op's dispatch.
        return _paged_decode_op(*args) if torch.compiler.is_compiling() else _paged_decode(*args)


def _paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, lens: torch.Tensor,
                  scale: float, num_kv_heads: int, block_size: int) -> torch.Tensor:
    import triton
    out = q.new_empty(q.shape)
    group, head_dim = q.shape[1] // num_kv_heads, q.shape[2]
    _kernel()[(q.shape[0], num_kv_heads)](
        q, k, v, out, table, lens, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1), table.stride(0),
        GROUP=group, ROWS=max(MIN_DOT, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        DIM_P2=max(MIN_DOT, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size, TILE=TILE,
        # float32 keeps float32 products (the matrix units' default would round operands to tf32).
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return out


_paged_decode_op = torch.library.custom_op("servecluster::paged_decode", _paged_decode, mutates_args=())
_paged_decode_op.register_fake(lambda q, k, v, table, lens, scale, num_kv_heads, block_size: q.new_empty(q.shape))
