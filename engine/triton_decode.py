"""Decode attention read in place from the paged pool (CUDA, Triton).

One program per (sequence, kv head): it loads the query rows of the kv head's query heads, walks the
sequence's context a tile of slots at a time, looking each slot's block up in the block table, and
keeps an online softmax. Both products run on the matrix units (`tl.dot`), the query rows padded to
16, their minimum. No dense copy of any context is made, and the shapes depend only on the batch
size, so a CUDA graph can replay it."""
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

    def __init__(self):
        self._paged_decode = _kernel()

    def prepare(self, ctx: Context, block_size: int) -> None:
        return None

    def __call__(self, layer, q, ctx: Context) -> torch.Tensor:
        import triton
        table, lens = ctx.decode_block_table, ctx.decode_context_lens
        out = torch.empty_like(q)
        group = layer.num_heads // layer.num_kv_heads
        k, v = layer.k_cache, layer.v_cache
        self._paged_decode[(q.shape[0], layer.num_kv_heads)](
            q, k, v, out, table, lens, layer.scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1), table.stride(0),
            GROUP=group, ROWS=max(MIN_DOT, triton.next_power_of_2(group)), HEAD_DIM=layer.head_dim,
            DIM_P2=max(MIN_DOT, triton.next_power_of_2(layer.head_dim)), BLOCK_SIZE=layer.block_size, TILE=TILE,
            # float32 keeps float32 products (the matrix units' default would round operands to tf32).
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
        return out
