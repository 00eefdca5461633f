"""Triton kernels for varlen (packed, block-diagonal) attention with fused 2D RoPE, and launchers.

Forward: FlashAttention-2 style online softmax, one program per (query block, head, segment);
programs whose block starts past their segment's end exit at once (the grid is sized by
max_seqlen). Backward: a dK/dV kernel per (key block, head, segment) and a dQ kernel per
(query block, head, segment), both recomputing P from the saved fp32 log-sum-exp, so nothing is
accumulated atomically.

RoPE: rotate-half pairs channel d with d + D/2, so every head row is handled as two halves
[.., HALF_PAD] (HALF_PAD = next power of 2 of D/2; D = 80 runs through masked loads). Q and K
tiles are rotated in fp32 registers as they are loaded (cos/sin from rope_cos_sin in
kernels/rope2d.py), and Q K^T = Q1 K1^T + Q2 K2^T. dQ and dK are rotated back (the adjoint) before
they are stored. No rotated copy of q or k ever reaches memory.

Inputs reach the launchers as [T, H, D] views with unit stride on D; lse is float32 [H, T].
"""
from __future__ import annotations

import math

from typing import Optional

import torch
import triton
import triton.language as tl

from dinofast._backend import triton_interpreted
from dinofast.kernels.rope2d import rope_cos_sin

LOG2E = 1.4426950408889634


@triton.jit
def _load_halves(base, rows, row_mask, stride_t, seg_start, num_prefix_tokens, hp, wp, t_row, inv_freq_ptr,
                 ROPE: tl.constexpr, HAS_TRANSFORM: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HALF_PAD: tl.constexpr):
    """Rows `rows` of one head (base points at head h of token 0) as two fp32 halves
    [len(rows), HALF_PAD]; rotated by the 2D RoPE of their segment when ROPE."""
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HALF_PAD)
    mask = row_mask[:, None] & (d < HALF)[None, :]
    ptr = base + rows.to(tl.int64)[:, None] * stride_t + d[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    if ROPE:
        cos, sin = rope_cos_sin(rows - seg_start - num_prefix_tokens, hp, wp, t_row, inv_freq_ptr,
                                HAS_TRANSFORM, HEAD_DIM, HALF_PAD)
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        # rounded to the input dtype, as rope2d's output would be: fused == rope2d + attention
        # (returned in that dtype: the tensor-core dots take it as is)
        x1 = x1.to(base.dtype.element_ty)
        x2 = x2.to(base.dtype.element_ty)
    return x1, x2


@triton.jit
def _store_halves(base, rows, row_mask, stride_t, x1, x2, seg_start, num_prefix_tokens, hp, wp, t_row,
                  inv_freq_ptr, UNROTATE: tl.constexpr, HAS_TRANSFORM: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HALF_PAD: tl.constexpr):
    """Store fp32 halves into rows of one head, first rotating them back (by -angle) when UNROTATE."""
    HALF: tl.constexpr = HEAD_DIM // 2
    if UNROTATE:
        cos, sin = rope_cos_sin(rows - seg_start - num_prefix_tokens, hp, wp, t_row, inv_freq_ptr,
                                HAS_TRANSFORM, HEAD_DIM, HALF_PAD)
        x1, x2 = x1 * cos + x2 * sin, x2 * cos - x1 * sin
    d = tl.arange(0, HALF_PAD)
    mask = row_mask[:, None] & (d < HALF)[None, :]
    ptr = base + rows.to(tl.int64)[:, None] * stride_t + d[None, :]
    tl.store(ptr, x1.to(base.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, x2.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, acc, LOW_PRECISION: tl.constexpr, like_ptr):
    """acc + a @ b: tensor cores in like_ptr's element type when LOW_PRECISION, else exact fp32."""
    if LOW_PRECISION:
        out = tl.dot(a.to(like_ptr.dtype.element_ty), b.to(like_ptr.dtype.element_ty), acc)
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return out


@triton.jit
def _segment(cu_seqlens_ptr, grids_ptr, coord_transform_ptr, seg, transform_stride, ROPE: tl.constexpr):
    start = tl.load(cu_seqlens_ptr + seg)
    end = tl.load(cu_seqlens_ptr + seg + 1)
    if ROPE:
        hp = tl.load(grids_ptr + 2 * seg)
        wp = tl.load(grids_ptr + 2 * seg + 1)
    else:
        hp = start * 0 + 1
        wp = start * 0 + 1
    t_row = coord_transform_ptr + seg * transform_stride
    return start, end, hp, wp, t_row


@triton.jit
def varlen_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_seqlens_ptr, inv_freq_ptr, grids_ptr, coord_transform_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
    T, num_prefix_tokens, transform_stride, qk_scale_log2,
    ROPE: tl.constexpr, HAS_TRANSFORM: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOW_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    seg = tl.program_id(2)
    start, end, hp, wp, t_row = _segment(cu_seqlens_ptr, grids_ptr, coord_transform_ptr, seg,
                                         transform_stride, ROPE)
    q0 = start + pid_m * BLOCK_M
    if q0 >= end:
        return
    rows = q0 + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    q1, q2 = _load_halves(q_ptr + h * sq_h, rows, row_mask, sq_t, start, num_prefix_tokens, hp, wp, t_row,
                          inv_freq_ptr, ROPE, HAS_TRANSFORM, HEAD_DIM, HALF_PAD)
    if LOW_PRECISION:  # loaded once, used by every dot
        q1 = q1.to(q_ptr.dtype.element_ty)
        q2 = q2.to(q_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    acc2 = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < end
        k1, k2 = _load_halves(k_ptr + h * sk_h, cols, col_mask, sk_t, start, num_prefix_tokens, hp, wp, t_row,
                              inv_freq_ptr, ROPE, HAS_TRANSFORM, HEAD_DIM, HALF_PAD)
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        s = _dot(q1, tl.trans(k1), s, LOW_PRECISION, q_ptr)
        s = _dot(q2, tl.trans(k2), s, LOW_PRECISION, q_ptr)
        s = tl.where(col_mask[None, :], s * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v1, v2 = _load_halves(v_ptr + h * sv_h, cols, col_mask, sv_t, start, 0, hp, wp, t_row, inv_freq_ptr,
                              False, False, HEAD_DIM, HALF_PAD)
        acc1 = _dot(p, v1, acc1 * alpha[:, None], LOW_PRECISION, q_ptr)
        acc2 = _dot(p, v2, acc2 * alpha[:, None], LOW_PRECISION, q_ptr)
        m_i = m_new
    inv_l = 1.0 / l_i
    _store_halves(out_ptr + h * so_h, rows, row_mask, so_t, acc1 * inv_l[:, None], acc2 * inv_l[:, None],
                  start, 0, hp, wp, t_row, inv_freq_ptr, False, False, HEAD_DIM, HALF_PAD)
    # natural-log LSE of the scaled scores (m_i, log2 l_i are in log2 units)
    tl.store(lse_ptr + h * T + rows, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=row_mask)


@triton.jit
def varlen_bwd_delta_kernel(out_ptr, dout_ptr, delta_ptr, so_t, so_h, sg_t, sg_h, T,
                            HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] (fp32)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    h = tl.program_id(1)
    d = tl.arange(0, D_PAD)
    mask = (rows < T)[:, None] & (d < HEAD_DIM)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    o = tl.load(out_ptr + h * so_h + r64 * so_t + d[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dout_ptr + h * sg_h + r64 * sg_t + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + h * T + rows, tl.sum(o * g, 1), mask=rows < T)


@triton.jit
def varlen_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    cu_seqlens_ptr, inv_freq_ptr, grids_ptr, coord_transform_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t, sg_h, sdk_t, sdk_h, sdv_t, sdv_h,
    T, num_prefix_tokens, transform_stride, softmax_scale, qk_scale_log2,
    ROPE: tl.constexpr, HAS_TRANSFORM: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOW_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    seg = tl.program_id(2)
    start, end, hp, wp, t_row = _segment(cu_seqlens_ptr, grids_ptr, coord_transform_ptr, seg,
                                         transform_stride, ROPE)
    n0 = start + pid_n * BLOCK_N
    if n0 >= end:
        return
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < end
    k1, k2 = _load_halves(k_ptr + h * sk_h, cols, col_mask, sk_t, start, num_prefix_tokens, hp, wp, t_row,
                          inv_freq_ptr, ROPE, HAS_TRANSFORM, HEAD_DIM, HALF_PAD)
    v1, v2 = _load_halves(v_ptr + h * sv_h, cols, col_mask, sv_t, start, 0, hp, wp, t_row, inv_freq_ptr,
                          False, False, HEAD_DIM, HALF_PAD)
    dk1 = tl.zeros([BLOCK_N, HALF_PAD], tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF_PAD], tl.float32)
    dv1 = tl.zeros([BLOCK_N, HALF_PAD], tl.float32)
    dv2 = tl.zeros([BLOCK_N, HALF_PAD], tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        q1, q2 = _load_halves(q_ptr + h * sq_h, rows, row_mask, sq_t, start, num_prefix_tokens, hp, wp, t_row,
                              inv_freq_ptr, ROPE, HAS_TRANSFORM, HEAD_DIM, HALF_PAD)
        g1, g2 = _load_halves(dout_ptr + h * sg_h, rows, row_mask, sg_t, start, 0, hp, wp, t_row, inv_freq_ptr,
                              False, False, HEAD_DIM, HALF_PAD)
        lse2 = tl.load(lse_ptr + h * T + rows, mask=row_mask, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + h * T + rows, mask=row_mask, other=0.0)
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        s = _dot(q1, tl.trans(k1), s, LOW_PRECISION, q_ptr)
        s = _dot(q2, tl.trans(k2), s, LOW_PRECISION, q_ptr)
        valid = row_mask[:, None] & col_mask[None, :]
        p = tl.where(valid, tl.math.exp2(s * qk_scale_log2 - lse2[:, None]), 0.0)
        pt = tl.trans(p)
        dv1 = _dot(pt, g1, dv1, LOW_PRECISION, q_ptr)
        dv2 = _dot(pt, g2, dv2, LOW_PRECISION, q_ptr)
        dp = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        dp = _dot(g1, tl.trans(v1), dp, LOW_PRECISION, q_ptr)
        dp = _dot(g2, tl.trans(v2), dp, LOW_PRECISION, q_ptr)
        dst = tl.trans(p * (dp - delta[:, None]))
        dk1 = _dot(dst, q1, dk1, LOW_PRECISION, q_ptr)
        dk2 = _dot(dst, q2, dk2, LOW_PRECISION, q_ptr)
    _store_halves(dk_ptr + h * sdk_h, cols, col_mask, sdk_t, dk1 * softmax_scale, dk2 * softmax_scale, start,
                  num_prefix_tokens, hp, wp, t_row, inv_freq_ptr, ROPE, HAS_TRANSFORM, HEAD_DIM, HALF_PAD)
    _store_halves(dv_ptr + h * sdv_h, cols, col_mask, sdv_t, dv1, dv2, start, 0, hp, wp, t_row, inv_freq_ptr,
                  False, False, HEAD_DIM, HALF_PAD)


@triton.jit
def varlen_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    cu_seqlens_ptr, inv_freq_ptr, grids_ptr, coord_transform_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t, sg_h, sdq_t, sdq_h,
    T, num_prefix_tokens, transform_stride, softmax_scale, qk_scale_log2,
    ROPE: tl.constexpr, HAS_TRANSFORM: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOW_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    seg = tl.program_id(2)
    start, end, hp, wp, t_row = _segment(cu_seqlens_ptr, grids_ptr, coord_transform_ptr, seg,
                                         transform_stride, ROPE)
    m0 = start + pid_m * BLOCK_M
    if m0 >= end:
        return
    rows = m0 + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    q1, q2 = _load_halves(q_ptr + h * sq_h, rows, row_mask, sq_t, start, num_prefix_tokens, hp, wp, t_row,
                          inv_freq_ptr, ROPE, HAS_TRANSFORM, HEAD_DIM, HALF_PAD)
    g1, g2 = _load_halves(dout_ptr + h * sg_h, rows, row_mask, sg_t, start, 0, hp, wp, t_row, inv_freq_ptr,
                          False, False, HEAD_DIM, HALF_PAD)
    lse2 = tl.load(lse_ptr + h * T + rows, mask=row_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + h * T + rows, mask=row_mask, other=0.0)
    dq1 = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < end
        k1, k2 = _load_halves(k_ptr + h * sk_h, cols, col_mask, sk_t, start, num_prefix_tokens, hp, wp, t_row,
                              inv_freq_ptr, ROPE, HAS_TRANSFORM, HEAD_DIM, HALF_PAD)
        v1, v2 = _load_halves(v_ptr + h * sv_h, cols, col_mask, sv_t, start, 0, hp, wp, t_row, inv_freq_ptr,
                              False, False, HEAD_DIM, HALF_PAD)
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        s = _dot(q1, tl.trans(k1), s, LOW_PRECISION, q_ptr)
        s = _dot(q2, tl.trans(k2), s, LOW_PRECISION, q_ptr)
        valid = row_mask[:, None] & col_mask[None, :]
        p = tl.where(valid, tl.math.exp2(s * qk_scale_log2 - lse2[:, None]), 0.0)
        dp = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        dp = _dot(g1, tl.trans(v1), dp, LOW_PRECISION, q_ptr)
        dp = _dot(g2, tl.trans(v2), dp, LOW_PRECISION, q_ptr)
        ds = p * (dp - delta[:, None])
        dq1 = _dot(ds, k1, dq1, LOW_PRECISION, q_ptr)
        dq2 = _dot(ds, k2, dq2, LOW_PRECISION, q_ptr)
    _store_halves(dq_ptr + h * sdq_h, rows, row_mask, sdq_t, dq1 * softmax_scale, dq2 * softmax_scale, start,
                  num_prefix_tokens, hp, wp, t_row, inv_freq_ptr, ROPE, HAS_TRANSFORM, HEAD_DIM, HALF_PAD)


# ---------------------------------------------------------------------------------------------
# Launch configuration and launchers
# ---------------------------------------------------------------------------------------------
def low_precision_dot(dtype: torch.dtype) -> bool:
    """Tensor-core dots in fp16/bf16; fp32 inputs (and bf16 under the interpreter, whose bf16 dot
    is wrong) take exact fp32 dots."""
    if dtype == torch.float16:
        return True
    return dtype == torch.bfloat16 and not triton_interpreted()


def forward_config(head_dim: int, interpreted: Optional[bool] = None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel."""
    if triton_interpreted() if interpreted is None else interpreted:  # AOT builds pass False
        return 16, 16, 1, 1
    # BLOCK_M 64 per 4-warp group: with the fused RoPE prologue, 128-row tiles spill (ptxas, sm_80/90)
    if head_dim <= 64:
        return 64, 64, 4, 3
    return 64, 64, 8, 2


def backward_config(head_dim: int, interpreted: Optional[bool] = None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the dK/dV and dQ kernels."""
    if triton_interpreted() if interpreted is None else interpreted:  # AOT builds pass False
        return 16, 16, 1, 1
    if head_dim <= 64:
        return 64, 64, 4, 2
    return 64, 64, 8, 1


def half_pad(head_dim: int) -> int:
    """Padded width of a half head row: a power of 2, at least 16 (the smallest tl.dot K)."""
    return max(16, triton.next_power_of_2(head_dim // 2))


def _rope_args(rope, dummy):
    if rope is None:
        return dummy, dummy, dummy, 0, 0, False, False
    ct = rope.coord_transform
    stride = 4 if (ct is not None and ct.numel() > 4) else 0
    return (rope.freqs, rope.grids, ct if ct is not None else dummy, rope.num_prefix_tokens, stride, True,
            ct is not None)


def forward(q, k, v, out, lse, cu_seqlens, max_seqlen, scale, rope) -> None:
    """Write out [T, H, D] and lse float32 [H, T]."""
    T, H, D = q.shape
    n = cu_seqlens.numel() - 1
    block_m, block_n, num_warps, num_stages = forward_config(D)
    freqs, grids, ct, P, t_stride, has_rope, has_t = _rope_args(rope, lse)
    grid = (triton.cdiv(max(max_seqlen, 1), block_m), H, n)
    varlen_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens, freqs, grids, ct,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        T, P, t_stride, scale * LOG2E,
        ROPE=has_rope, HAS_TRANSFORM=has_t, HEAD_DIM=D, HALF_PAD=half_pad(D),
        BLOCK_M=block_m, BLOCK_N=block_n, LOW_PRECISION=low_precision_dot(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )


def backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, scale, rope) -> None:
    """Write dq, dk, dv ([T, H, D], through the rotation when rope is given)."""
    T, H, D = q.shape
    n = cu_seqlens.numel() - 1
    delta = torch.empty((H, T), dtype=torch.float32, device=q.device)
    block = 64 if not triton_interpreted() else 16
    varlen_bwd_delta_kernel[(triton.cdiv(T, block), H)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), T,
        HEAD_DIM=D, D_PAD=triton.next_power_of_2(D), BLOCK=block)
    block_m, block_n, num_warps, num_stages = backward_config(D)
    freqs, grids, ct, P, t_stride, has_rope, has_t = _rope_args(rope, lse)
    common = dict(ROPE=has_rope, HAS_TRANSFORM=has_t, HEAD_DIM=D, HALF_PAD=half_pad(D),
                  BLOCK_M=block_m, BLOCK_N=block_n, LOW_PRECISION=low_precision_dot(q.dtype),
                  num_warps=num_warps, num_stages=num_stages)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               dout.stride(0), dout.stride(1))
    varlen_bwd_dkdv_kernel[(triton.cdiv(max(max_seqlen, 1), block_n), H, n)](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens, freqs, grids, ct,
        *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        T, P, t_stride, scale, scale * LOG2E, **common)
    varlen_bwd_dq_kernel[(triton.cdiv(max(max_seqlen, 1), block_m), H, n)](
        q, k, v, dout, lse, delta, dq, cu_seqlens, freqs, grids, ct,
        *strides, dq.stride(0), dq.stride(1),
        T, P, t_stride, scale, scale * LOG2E, **common)
