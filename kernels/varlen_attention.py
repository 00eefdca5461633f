"""Triton kernels for varlen (packed, block-diagonal) attention, and launchers.

Forward: FlashAttention-2 style online softmax over one (query block, head, segment) work item.
Backward: a dK/dV kernel per (key block, head, segment) and a dQ kernel per (query block, head,
segment), both recomputing P from the saved fp32 log-sum-exp, so nothing is accumulated
atomically. Work items are numbered on one grid axis and programs loop over them (see work_grid
in kernels/rope2d.py): any number of segments and any max_seqlen stay within CUDA's grid limits.
Items whose block starts past their segment's end do nothing (the tiles per segment are sized
by max_seqlen, so the launch needs no host sync).

RoPE: q and k are rotated once by the rope2d kernel into scratch buffers in their own dtype
(exactly rope2d's output), and the plain kernels run on those; the backward writes dQ and dK of
the rotated inputs in fp32 and rotates them back (the adjoint: the inverse rotation) in one more
rope2d pass. Rotating inside the attention loops would evaluate sin/cos for every (query block,
key block) pair: benchmarks/README.md, "SASS main loops", has the instruction counts.

Inputs reach the launchers as [T, H, D] views with unit stride on D; lse is float32 [H, T].
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from dinofast._backend import triton_interpreted
from dinofast.kernels import rope2d as _rope2d
from dinofast.kernels.rope2d import work_grid, work_item


@triton.jit
def _load_rows(base, rows, row_mask, stride_t, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Rows `rows` of one head (base points at head h of token 0): [len(rows), D_PAD], zero-padded."""
    d = tl.arange(0, D_PAD)
    ptr = base + rows.to(tl.int64)[:, None] * stride_t + d[None, :]
    return tl.load(ptr, mask=row_mask[:, None] & (d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _load_two(a_ptr, sa_t, sa_h, b_ptr, sb_t, sb_h, h, rows, row_mask, HEAD_DIM: tl.constexpr,
              D_PAD: tl.constexpr):
    """Rows `rows` of head h of two [T, H, D] tensors (q and dO, or k and v)."""
    return (_load_rows(a_ptr + h * sa_h, rows, row_mask, sa_t, HEAD_DIM, D_PAD),
            _load_rows(b_ptr + h * sb_h, rows, row_mask, sb_t, HEAD_DIM, D_PAD))


@triton.jit
def _store_rows(base, rows, row_mask, stride_t, x, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    d = tl.arange(0, D_PAD)
    ptr = base + rows.to(tl.int64)[:, None] * stride_t + d[None, :]
    tl.store(ptr, x.to(base.dtype.element_ty), mask=row_mask[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit
def _dot(a, b, acc, LOW_PRECISION: tl.constexpr, like_ptr):
    """acc + a @ b: tensor cores in like_ptr's element type when LOW_PRECISION, else exact fp32."""
    if LOW_PRECISION:
        out = tl.dot(a.to(like_ptr.dtype.element_ty), b.to(like_ptr.dtype.element_ty), acc)
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return out


@triton.jit
def _item(cu_seqlens_ptr, w, tiles_per_segment, n_heads, BLOCK: tl.constexpr):
    """Work item w -> (first row of its block, head, segment start, segment end)."""
    tile, h, seg = work_item(w, tiles_per_segment, n_heads)
    start = tl.load(cu_seqlens_ptr + seg)
    end = tl.load(cu_seqlens_ptr + seg + 1)
    return start + tile * BLOCK, h, start, end


@triton.jit
def _block(first, end, BLOCK: tl.constexpr):
    """Rows first .. first + BLOCK - 1 and which of them lie before the segment's end."""
    rows = first + tl.arange(0, BLOCK)
    return rows, rows < end


@triton.jit
def _row_stats(lse_ptr, delta_ptr, h, T, rows, row_mask):
    """Natural-log LSE and delta of rows `rows` of head h (both float32 [H, T])."""
    off = h.to(tl.int64) * T + rows
    lse = tl.load(lse_ptr + off, mask=row_mask, other=0.0)
    delta = tl.load(delta_ptr + off, mask=row_mask, other=0.0)
    return lse, delta


@triton.jit
def _probs_and_dscores(q, k, v, g, lse, delta, valid, softmax_scale,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOW_PRECISION: tl.constexpr, like_ptr):
    """Recomputed P = softmax(scale * Q K^T) [BLOCK_M, BLOCK_N] and dS = P * (dO V^T - delta) (fp32).
    Scores are scaled in natural units, as the forward does (see varlen_fwd_kernel)."""
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), LOW_PRECISION, like_ptr)
    p = tl.where(valid, tl.math.exp2((s * softmax_scale - lse[:, None]) * 1.4426950408889634), 0.0)
    dp = _dot(g, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), LOW_PRECISION, like_ptr)
    return p, p * (dp - delta[:, None])


@triton.jit
def varlen_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_seqlens_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
    T, n_heads, tiles_per_segment, n_work, softmax_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LOW_PRECISION: tl.constexpr,
):
    # Scores are scaled in natural units, then exponentiated as exp2((s - m) * log2(e)): folding
    # log2(e) into the scale would overflow fp32 at scores the reference still holds finite.
    for w in range(tl.program_id(0), n_work, tl.num_programs(0)):
        q0, h, start, end = _item(cu_seqlens_ptr, w, tiles_per_segment, n_heads, BLOCK_M)
        if q0 < end:
            rows, row_mask = _block(q0, end, BLOCK_M)
            q = _load_rows(q_ptr + h * sq_h, rows, row_mask, sq_t, HEAD_DIM, D_PAD)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
            for n0 in range(start, end, BLOCK_N):
                cols, col_mask = _block(n0, end, BLOCK_N)
                k = _load_rows(k_ptr + h * sk_h, cols, col_mask, sk_t, HEAD_DIM, D_PAD)
                s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), LOW_PRECISION, q_ptr)
                s = tl.where(col_mask[None, :], s * softmax_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.math.exp2((m_i - m_new) * 1.4426950408889634)
                p = tl.math.exp2((s - m_new[:, None]) * 1.4426950408889634)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = _load_rows(v_ptr + h * sv_h, cols, col_mask, sv_t, HEAD_DIM, D_PAD)
                acc = _dot(p, v, acc * alpha[:, None], LOW_PRECISION, q_ptr)
                m_i = m_new
            _store_rows(out_ptr + h * so_h, rows, row_mask, so_t, acc / l_i[:, None], HEAD_DIM, D_PAD)
            # natural-log LSE of the scaled scores (m_i in natural units, l_i a sum of exp2 terms)
            tl.store(lse_ptr + h.to(tl.int64) * T + rows, m_i + tl.math.log2(l_i) * 0.6931471805599453,
                     mask=row_mask)


@triton.jit
def varlen_bwd_delta_kernel(out_ptr, dout_ptr, delta_ptr, so_t, so_h, sg_t, sg_h, T, n_heads, row_blocks, n_work,
                            HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] (fp32)."""
    for w in range(tl.program_id(0), n_work, tl.num_programs(0)):
        block, h, _ = work_item(w, row_blocks, n_heads)
        rows = block * BLOCK + tl.arange(0, BLOCK)
        row_mask = rows < T
        o, g = _load_two(out_ptr, so_t, so_h, dout_ptr, sg_t, sg_h, h, rows, row_mask, HEAD_DIM, D_PAD)
        tl.store(delta_ptr + h.to(tl.int64) * T + rows, tl.sum(o.to(tl.float32) * g.to(tl.float32), 1),
                 mask=row_mask)


@triton.jit
def varlen_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_seqlens_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t, sg_h, sdk_t, sdk_h, sdv_t, sdv_h,
    T, n_heads, tiles_per_segment, n_work, softmax_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LOW_PRECISION: tl.constexpr,
):
    for w in range(tl.program_id(0), n_work, tl.num_programs(0)):
        n0, h, start, end = _item(cu_seqlens_ptr, w, tiles_per_segment, n_heads, BLOCK_N)
        if n0 < end:
            cols, col_mask = _block(n0, end, BLOCK_N)
            k, v = _load_two(k_ptr, sk_t, sk_h, v_ptr, sv_t, sv_h, h, cols, col_mask, HEAD_DIM, D_PAD)
            dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
            dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
            for m0 in range(start, end, BLOCK_M):
                rows, row_mask = _block(m0, end, BLOCK_M)
                q, g = _load_two(q_ptr, sq_t, sq_h, dout_ptr, sg_t, sg_h, h, rows, row_mask, HEAD_DIM, D_PAD)
                lse, delta = _row_stats(lse_ptr, delta_ptr, h, T, rows, row_mask)
                p, ds = _probs_and_dscores(q, k, v, g, lse, delta, row_mask[:, None] & col_mask[None, :],
                                           softmax_scale, BLOCK_M, BLOCK_N, LOW_PRECISION, q_ptr)
                dv = _dot(tl.trans(p), g, dv, LOW_PRECISION, q_ptr)
                dk = _dot(tl.trans(ds), q, dk, LOW_PRECISION, q_ptr)
            _store_rows(dk_ptr + h * sdk_h, cols, col_mask, sdk_t, dk * softmax_scale, HEAD_DIM, D_PAD)
            _store_rows(dv_ptr + h * sdv_h, cols, col_mask, sdv_t, dv, HEAD_DIM, D_PAD)


@triton.jit
def varlen_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, cu_seqlens_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t, sg_h, sdq_t, sdq_h,
    T, n_heads, tiles_per_segment, n_work, softmax_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LOW_PRECISION: tl.constexpr,
):
    for w in range(tl.program_id(0), n_work, tl.num_programs(0)):
        m0, h, start, end = _item(cu_seqlens_ptr, w, tiles_per_segment, n_heads, BLOCK_M)
        if m0 < end:
            rows, row_mask = _block(m0, end, BLOCK_M)
            q, g = _load_two(q_ptr, sq_t, sq_h, dout_ptr, sg_t, sg_h, h, rows, row_mask, HEAD_DIM, D_PAD)
            lse, delta = _row_stats(lse_ptr, delta_ptr, h, T, rows, row_mask)
            dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
            for n0 in range(start, end, BLOCK_N):
                cols, col_mask = _block(n0, end, BLOCK_N)
                k, v = _load_two(k_ptr, sk_t, sk_h, v_ptr, sv_t, sv_h, h, cols, col_mask, HEAD_DIM, D_PAD)
                _, ds = _probs_and_dscores(q, k, v, g, lse, delta, row_mask[:, None] & col_mask[None, :],
                                           softmax_scale, BLOCK_M, BLOCK_N, LOW_PRECISION, q_ptr)
                dq = _dot(ds, k, dq, LOW_PRECISION, q_ptr)
            _store_rows(dq_ptr + h * sdq_h, rows, row_mask, sdq_t, dq * softmax_scale, HEAD_DIM, D_PAD)


# ---------------------------------------------------------------------------------------------
# Launch configuration and launchers
# ---------------------------------------------------------------------------------------------
def low_precision_dot(dtype: torch.dtype) -> bool:
    """Tensor-core dots in fp16/bf16; fp32 inputs (and bf16 under the interpreter, whose bf16 dot
    is wrong) take exact fp32 dots."""
    if dtype == torch.float16:
        return True
    return dtype == torch.bfloat16 and not triton_interpreted()


# fp32 inputs multiply on CUDA cores (exact fp32 dots): small tiles, or ptxas spills.
FP32_CONFIG = (16, 16, 4, 1)


def forward_config(head_dim: int, dtype: torch.dtype, interpreted: Optional[bool] = None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel (spill-free on sm_80/sm_90:
    tests/test_aot.py)."""
    if triton_interpreted() if interpreted is None else interpreted:
        return 16, 16, 1, 1
    if dtype == torch.float32:
        return FP32_CONFIG
    if head_dim <= 64:
        return 128, 64, 8, 3
    return 128, 32, 8, 1  # 64-key tiles (or 2 stages) spill at D 80 on sm_80


def backward_config(head_dim: int, dtype: torch.dtype, interpreted: Optional[bool] = None):
    """{"dkdv": ..., "dq": ...}: (BLOCK_M, BLOCK_N, num_warps, num_stages) of each backward kernel.
    dK/dV holds two [BLOCK_N, D] fp32 accumulators: 32-row query steps keep it spill-free."""
    if triton_interpreted() if interpreted is None else interpreted:
        return dict(dkdv=(16, 16, 1, 1), dq=(16, 16, 1, 1))
    if dtype == torch.float32:
        return dict(dkdv=FP32_CONFIG, dq=FP32_CONFIG)
    return dict(dkdv=(32, 64, 8, 1), dq=(64, 64, 4, 2) if head_dim <= 64 else (64, 64, 8, 1))


DELTA_BLOCK, DELTA_BLOCK_INTERPRETED = 64, 16


def d_pad(head_dim: int) -> int:
    """Padded head row width: a power of 2, at least 16 (the smallest tl.dot K)."""
    return max(16, triton.next_power_of_2(head_dim))


def _tiles(max_seqlen: int, T: int, block: int) -> int:
    """Blocks per segment: no segment is longer than T, whatever max_seqlen says."""
    return triton.cdiv(max(min(max_seqlen, T), 1), block)


def _rotated(q, k, cu_seqlens, max_seqlen, rope, inverse, dtype):
    """(q, k) rotated by rope (by -angle when inverse) into new [T, H, D] buffers of `dtype`."""
    q_rot = torch.empty(q.shape, dtype=dtype, device=q.device)
    k_rot = torch.empty(k.shape, dtype=dtype, device=k.device)
    _rope2d.rope2d(q.unsqueeze(0), k.unsqueeze(0), q_rot.unsqueeze(0), k_rot.unsqueeze(0), rope.freqs,
                   cu_seqlens, rope.grids, (1, 1), rope.coord_transform, rope.num_prefix_tokens, inverse,
                   min(max_seqlen, q.shape[0]))
    return q_rot, k_rot


def _unrotate_into(dq_rot, dk_rot, dq, dk, cu_seqlens, max_seqlen, rope) -> None:
    """dq, dk = the adjoint (inverse) rotation of fp32 dq_rot, dk_rot, rounded once to dq's dtype."""
    _rope2d.rope2d(dq_rot.unsqueeze(0), dk_rot.unsqueeze(0), dq.unsqueeze(0), dk.unsqueeze(0), rope.freqs,
                   cu_seqlens, rope.grids, (1, 1), rope.coord_transform, rope.num_prefix_tokens, True,
                   min(max_seqlen, dq.shape[0]))


def forward(q, k, v, out, lse, cu_seqlens, max_seqlen, scale, rope) -> None:
    """Write out [T, H, D] and lse float32 [H, T]."""
    T, H, D = q.shape
    if rope is not None:
        q, k = _rotated(q, k, cu_seqlens, max_seqlen, rope, False, q.dtype)
    block_m, block_n, num_warps, num_stages = forward_config(D, q.dtype)
    tiles = _tiles(max_seqlen, T, block_m)
    n_work = tiles * H * (cu_seqlens.numel() - 1)
    varlen_fwd_kernel[work_grid(n_work)](
        q, k, v, out, lse, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        T, H, tiles, n_work, scale,
        HEAD_DIM=D, D_PAD=d_pad(D), BLOCK_M=block_m, BLOCK_N=block_n, LOW_PRECISION=low_precision_dot(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )


def backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, scale, rope) -> None:
    """Write dq, dk, dv ([T, H, D], through the rotation when rope is given)."""
    T, H, D = q.shape
    n = cu_seqlens.numel() - 1
    delta = torch.empty((H, T), dtype=torch.float32, device=q.device)
    block = DELTA_BLOCK_INTERPRETED if triton_interpreted() else DELTA_BLOCK
    row_blocks = triton.cdiv(T, block)
    varlen_bwd_delta_kernel[work_grid(row_blocks * H)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), T, H, row_blocks,
        row_blocks * H, HEAD_DIM=D, D_PAD=d_pad(D), BLOCK=block)
    dq_out, dk_out = dq, dk
    if rope is not None:  # gradients of the rotated q, k in fp32, rotated back once at the end
        q, k = _rotated(q, k, cu_seqlens, max_seqlen, rope, False, q.dtype)
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.empty(k.shape, dtype=torch.float32, device=k.device)
    config = backward_config(D, q.dtype)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               dout.stride(0), dout.stride(1))
    for kernel, (block_m, block_n, num_warps, num_stages), block, grads in (
            (varlen_bwd_dkdv_kernel, config["dkdv"], 1, (dk, dv)), (varlen_bwd_dq_kernel, config["dq"], 0, (dq,))):
        tiles = _tiles(max_seqlen, T, (block_m, block_n)[block])  # dK/dV: key blocks; dQ: query blocks
        n_work = tiles * H * n
        kernel[work_grid(n_work)](
            q, k, v, dout, lse, delta, *grads, cu_seqlens,
            *strides, *(s for g in grads for s in (g.stride(0), g.stride(1))),
            T, H, tiles, n_work, scale,
            HEAD_DIM=D, D_PAD=d_pad(D), BLOCK_M=block_m, BLOCK_N=block_n, LOW_PRECISION=low_precision_dot(q.dtype),
            num_warps=num_warps, num_stages=num_stages)
    if rope is not None:
        _unrotate_into(dq, dk, dq_out, dk_out, cu_seqlens, max_seqlen, rope)
