"""Decode attention read in place from the paged pool (CUDA, Triton).

One program per (sequence, kv head): it loads the query rows of the kv head's query heads, walks the
sequence's context a tile of slots at a time, looking each slot's block up in the block table, and
keeps an online softmax. Both products run on the matrix units (`tl.dot`), the query rows padded to
16, their minimum. No dense copy of any context is made, and the shapes depend only on the batch
size and the block table's width, so a CUDA graph can replay it.

Few sequences over long contexts would leave most of the GPU idle, each program walking thousands of
slots alone (one chat at 32k tokens: a program per kv head, 8 of 132 SMs). There the context is split
into partitions of PARTITION slots, one program each, and a second kernel merges the partitions'
softmax states (flash-decoding; vLLM's paged attention v2)."""
import functools
from typing import Optional

import torch

from engine.context import Context
from engine.opaque_op import opaque_op

TILE = 64  # context slots per loop iteration
MIN_DOT = 16  # tl.dot's smallest M, N and K
PARTITION = 512  # context slots per program where contexts are split (any size computes the same; TILE divides it)


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
    def paged_decode(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, out_ptr, m_ptr, l_ptr, table_ptr, lens_ptr, scale,
                     stride_q, stride_qh, stride_k, stride_kh, stride_s, stride_o, stride_oh, stride_os, stride_m,
                     stride_mh, stride_table,
                     GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, PARTITION: tl.constexpr, SPLIT: tl.constexpr,
                     SCALED: tl.constexpr, PRECISION: tl.constexpr):
        # SPLIT: this program's partition of the context, its unnormalized output and softmax state (m, l) kept
        # for the merge; else the whole context, normalized. SCALED: a float8 pool, one scale per (slot, kv head).
        seq, kv_head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        length = tl.load(lens_ptr + seq)
        g, d, t = tl.arange(0, ROWS), tl.arange(0, DIM_P2), tl.arange(0, TILE)
        g_ok, d_ok = g < GROUP, d < HEAD_DIM
        heads = kv_head * GROUP + g
        q = tl.load(q_ptr + seq * stride_q + heads[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        m = tl.full([ROWS], float("-inf"), tl.float32)
        l = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DIM_P2], tl.float32)
        first, end = 0, length
        if SPLIT:
            first = part * PARTITION
            end = tl.minimum(length, first + PARTITION)
        for start in range(first, end, TILE):
            pos = start + t
            t_ok = pos < end
            block = tl.load(table_ptr + seq * stride_table + pos // BLOCK_SIZE, mask=t_ok, other=0)
            slots = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
            kv_mask = t_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + slots[:, None] * stride_k + kv_head * stride_kh + d[None, :], mask=kv_mask,
                        other=0.0)
            if SCALED:  # a float8 pool's keys and values in the queries' dtype, as engine.attention.read_kv
                k = k.to(tl.float32) * tl.load(ks_ptr + slots * stride_s + kv_head, mask=t_ok, other=0.0)[:, None]
            k = k.to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [ROWS, TILE]
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(v_ptr + slots[:, None] * stride_k + kv_head * stride_kh + d[None, :], mask=kv_mask,
                        other=0.0)
            if SCALED:
                v = v.to(tl.float32) * tl.load(vs_ptr + slots * stride_s + kv_head, mask=t_ok, other=0.0)[:, None]
            v = v.to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
        row_ok = g_ok[:, None] & d_ok[None, :]
        if SPLIT:  # a partition past the context keeps m = -inf, l = 0: the merge weighs it 0
            dst = out_ptr + seq * stride_o + heads[:, None] * stride_oh + part * stride_os + d[None, :]
            tl.store(dst, acc, mask=row_ok)
            state = seq * stride_m + heads * stride_mh + part
            tl.store(m_ptr + state, m, mask=g_ok)
            tl.store(l_ptr + state, l, mask=g_ok)
        else:
            out = acc / tl.where(l > 0, l, 1.0)[:, None]  # a padding row (length 0) writes zeros
            tl.store(out_ptr + seq * stride_o + heads[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def merge_partitions(part_ptr, m_ptr, l_ptr, out_ptr, stride_p, stride_ph, stride_ps, stride_m, stride_mh,
                         stride_o, stride_oh, PARTS: tl.constexpr, PARTS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                         DIM_P2: tl.constexpr):
        seq, head = tl.program_id(0), tl.program_id(1)
        j, d = tl.arange(0, PARTS_P2), tl.arange(0, DIM_P2)
        j_ok, d_ok = j < PARTS, d < HEAD_DIM
        m = tl.load(m_ptr + seq * stride_m + head * stride_mh + j, mask=j_ok, other=float("-inf"))
        l = tl.load(l_ptr + seq * stride_m + head * stride_mh + j, mask=j_ok, other=0.0)
        top = tl.max(m, axis=0)
        weight = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)  # partitions past the context: 0
        acc = tl.load(part_ptr + seq * stride_p + head * stride_ph + j[:, None] * stride_ps + d[None, :],
                      mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        total = tl.sum(l * weight, axis=0)
        out = tl.sum(acc * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + seq * stride_o + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)

    return paged_decode, merge_partitions


class TritonPagedDecode:
    graphable = True

    def __init__(self, min_programs: int = 1, partition: int = PARTITION):
        # min_programs: programs a step should launch before contexts are split (engine.kernels: two per SM);
        # 1 never splits.
        self.min_programs, self.partition = min_programs, partition

    def prepare(self, ctx: Context, block_size: int) -> None:
        return None

    def __call__(self, layer, q, ctx: Context) -> torch.Tensor:
        args = (q, layer.k_cache, layer.v_cache, layer.k_scale, layer.v_scale, ctx.decode_block_table,
                ctx.decode_context_lens, layer.scale, layer.num_kv_heads, layer.block_size, self.min_programs,
                self.partition)
        # Inside a compiled model (torch_compile) the launch is one opaque op, so inductor fuses the ops around
        # it, a CUDA graph captures both, and the split is decided from the op's concrete shapes, never traced.
        return _paged_decode_op(*args)


def num_partitions(programs: int, max_context: int, min_programs: int, partition: int = PARTITION) -> int:
    """Partitions each context is split into: 1 where the batch's (sequence, kv head) programs fill the device,
    else enough to, but no more than the longest context the block table holds needs. It depends only on the
    batch size and the table's width, never on the contexts' lengths, so a captured graph stays valid."""
    if programs >= min_programs:
        return 1
    return max(1, min(-(-min_programs // programs), -(-max_context // partition)))


def _paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale: Optional[torch.Tensor],
                  v_scale: Optional[torch.Tensor], table: torch.Tensor, lens: torch.Tensor, scale: float,
                  num_kv_heads: int, block_size: int, min_programs: int, partition: int) -> torch.Tensor:
    import triton
    decode, merge = _kernel()
    b, heads, head_dim = q.shape
    parts = num_partitions(b * num_kv_heads, table.shape[1] * block_size, min_programs, partition)
    out = q.new_empty(q.shape)
    split = parts > 1
    if split:  # each partition's unnormalized output and softmax state, merged below
        part_out = torch.empty((b, heads, parts, head_dim), dtype=torch.float32, device=q.device)
        m, l = (torch.empty((b, heads, parts), dtype=torch.float32, device=q.device) for _ in range(2))
        dst, dst_strides = part_out, part_out.stride()[:3]
    else:
        m = l = out  # unused
        dst, dst_strides = out, (*out.stride()[:2], 0)
    group = heads // num_kv_heads
    dim_p2 = max(MIN_DOT, triton.next_power_of_2(head_dim))
    scaled = k_scale is not None
    decode[(b, num_kv_heads, parts)](
        q, k, v, k_scale if scaled else k, v_scale if scaled else v, dst, m, l, table, lens, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k_scale.stride(0) if scaled else 0, *dst_strides,
        m.stride(0), m.stride(1), table.stride(0),
        GROUP=group, ROWS=max(MIN_DOT, triton.next_power_of_2(group)), HEAD_DIM=head_dim, DIM_P2=dim_p2,
        BLOCK_SIZE=block_size, TILE=TILE, PARTITION=partition, SPLIT=split, SCALED=scaled,
        # float32 keeps float32 products (the matrix units' default would round operands to tf32).
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    if split:
        merge[(b, heads)](part_out, m, l, out, *part_out.stride()[:3], m.stride(0), m.stride(1), out.stride(0),
                          out.stride(1), PARTS=parts, PARTS_P2=triton.next_power_of_2(parts), HEAD_DIM=head_dim,
                          DIM_P2=dim_p2)
    return out


_paged_decode_op = opaque_op("paged_decode", _paged_decode,
                             lambda q, k, v, k_scale, v_scale, table, lens, scale, num_kv_heads, block_size,
                             min_programs, partition: q.new_empty(q.shape))
