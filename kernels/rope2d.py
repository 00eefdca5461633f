"""Triton kernel for fused 2D RoPE (batched and packed), and its launcher.

One work item rotates BLOCK_T tokens of one image for HEADS_PER_PROG heads of q and k; items are
numbered on one grid axis (work_grid), so any number of images launches. The angles
are computed once per program in fp32 registers from the token's (row, col) on its image's grid:
no cos/sin table ever reaches memory. Prefix tokens get the identity rotation, so out-of-place
calls copy them and in-place calls rewrite them unchanged.

Tensors reach the launcher as 4-D strided views [B, N, H, D] with unit stride on D (a packed
[T, H, D] input is the view [1, T, H, D]); any other strides are honoured without a copy.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

# CUDA's limit on gridDim.x. Work items (tiles x heads x images) are numbered along x alone, so
# gridDim.y/z (at most 65,535) never bound the number of packed images; past this limit programs
# loop over several items. Tests lower it to exercise the loop under the interpreter.
MAX_GRID_X = 2**31 - 1


def work_grid(n_work: int) -> tuple:
    """The launch grid for n_work numbered work items: one program each, up to MAX_GRID_X."""
    return (max(1, min(n_work, MAX_GRID_X)),)


@triton.jit
def work_item(w, tiles, n_heads):
    """Work item w -> (tile, head group, image): tiles vary fastest, then heads, then images."""
    rest = w // tiles
    return w - rest * tiles, rest % n_heads, rest // n_heads


@triton.jit
def rope_cos_sin(pos, hp, wp, t_row, inv_freq_ptr,
                 HAS_TRANSFORM: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr):
    """cos, sin [len(pos), HALF_PAD] fp32 for patch indices `pos` on an (hp, wp) grid; identity
    rotation where pos < 0 (prefix tokens). Channel d < D/4 uses y, D/4 <= d < D/2 uses x.
    Shared with the attention kernel, which rotates its Q/K tiles with it."""
    is_patch = pos >= 0
    pos = tl.where(is_patch, pos, 0)
    y = 2.0 * ((pos // wp).to(tl.float32) + 0.5) / hp.to(tl.float32) - 1.0
    x = 2.0 * ((pos % wp).to(tl.float32) + 0.5) / wp.to(tl.float32) - 1.0
    if HAS_TRANSFORM:  # (shift_y, shift_x, scale_y, scale_x) of this image
        y = (y + tl.load(t_row + 0)) * tl.load(t_row + 2)
        x = (x + tl.load(t_row + 1)) * tl.load(t_row + 3)
    QUARTER: tl.constexpr = HEAD_DIM // 4
    d = tl.arange(0, HALF_PAD)
    freq = tl.load(inv_freq_ptr + (d % QUARTER), mask=d < 2 * QUARTER, other=0.0)
    coord = tl.where((d < QUARTER)[None, :], y[:, None], x[:, None])
    angle = (6.283185307179586 * coord) * freq[None, :]
    cos = tl.where(is_patch[:, None], tl.cos(angle), 1.0)
    sin = tl.where(is_patch[:, None], tl.sin(angle), 0.0)
    return cos, sin


@triton.jit
def _rotate_head(src, dst, cos, sin, is_patch, mask, HALF: tl.constexpr):
    """One head of a [BLOCK_T, D] tile: channel d pairs with d + D/2; both are read before either
    is written, so dst may alias src (in-place rope2d_). Rows where is_patch is False (prefix
    tokens) are stored as loaded: no arithmetic, so an Inf stays Inf (Inf * 0 would be NaN)."""
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    keep = is_patch[:, None]  # (the fp32 round trip of a loaded value is exact)
    tl.store(dst, tl.where(keep, x1 * cos - x2 * sin, x1).to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, tl.where(keep, x2 * cos + x1 * sin, x2).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def rope2d_kernel(
    q_in, k_in, q_out, k_out,
    inv_freq_ptr, cu_seqlens_ptr, grids_ptr, coord_transform_ptr,
    sqi_b, sqi_t, sqi_h,
    ski_b, ski_t, ski_h,
    sqo_b, sqo_t, sqo_h,
    sko_b, sko_t, sko_h,
    n_heads, seq_len, Hp, Wp, num_prefix_tokens, transform_stride, tiles, head_groups, n_work,
    PACKED: tl.constexpr, HAS_TRANSFORM: tl.constexpr, INVERSE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_T: tl.constexpr, HEADS_PER_PROG: tl.constexpr,
):
    for w in range(tl.program_id(0), n_work, tl.num_programs(0)):
        pid_t, pid_h, img = work_item(w, tiles, head_groups)
        if PACKED:  # image img owns tokens [cu[img], cu[img+1]) of the single packed row
            start = tl.load(cu_seqlens_ptr + img)
            end = tl.load(cu_seqlens_ptr + img + 1)
            hp = tl.load(grids_ptr + 2 * img)
            wp = tl.load(grids_ptr + 2 * img + 1)
            b = img * 0
        else:  # image img is batch row img
            start = img * 0
            end = start + seq_len
            hp = start + Hp
            wp = start + Wp
            b = img
        b = b.to(tl.int64)

        tok = start + pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        tok_mask = tok < end
        t_row = coord_transform_ptr + img * transform_stride
        cos, sin = rope_cos_sin(tok - start - num_prefix_tokens, hp, wp, t_row, inv_freq_ptr,
                                HAS_TRANSFORM, HEAD_DIM, HALF_PAD)
        if INVERSE:
            sin = -sin

        QUARTER: tl.constexpr = HEAD_DIM // 4
        d = tl.arange(0, HALF_PAD)
        d_mask = d < 2 * QUARTER
        mask = tok_mask[:, None] & d_mask[None, :]
        tok64 = tok.to(tl.int64)[:, None]
        is_patch = tok - start >= num_prefix_tokens
        for hh in range(HEADS_PER_PROG):
            h = pid_h * HEADS_PER_PROG + hh
            hmask = mask & ((d * 0 + h) < n_heads)[None, :]  # vector compare: the interpreter rejects scalar-bool masks
            _rotate_head(q_in + b * sqi_b + tok64 * sqi_t + h * sqi_h + d[None, :],
                         q_out + b * sqo_b + tok64 * sqo_t + h * sqo_h + d[None, :], cos, sin, is_patch, hmask,
                         2 * QUARTER)
            _rotate_head(k_in + b * ski_b + tok64 * ski_t + h * ski_h + d[None, :],
                         k_out + b * sko_b + tok64 * sko_t + h * sko_h + d[None, :], cos, sin, is_patch, hmask,
                         2 * QUARTER)


def launch_config(head_dim: int):
    """(HALF_PAD, BLOCK_T, HEADS_PER_PROG, num_warps): at most 1K fp32 angle elements per program
    over 8 warps (larger tiles, or 4 warps, make ptxas spill a few bytes on some sm_80/sm_90 variants)."""
    half_pad = triton.next_power_of_2(head_dim // 2)
    block_t = max(4, min(16, 1024 // half_pad))
    return half_pad, block_t, 4, 8


def rope2d(
    q: torch.Tensor, k: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor,
    inv_freq: torch.Tensor, cu_seqlens: Optional[torch.Tensor], grids: Optional[torch.Tensor],
    hw: Sequence[int], coord_transform: Optional[torch.Tensor], num_prefix_tokens: int,
    inverse: bool, max_seqlen: int,
) -> None:
    """Write rotated q, k ([B, N, H, D] views) into q_out, k_out (may alias q, k).
    Packed when cu_seqlens is given (then B == 1 and grids is int32 [n, 2] on q's device)."""
    B, N, H, D = q.shape
    packed = cu_seqlens is not None
    n_images = cu_seqlens.numel() - 1 if packed else B
    half_pad, block_t, heads_per_prog, num_warps = launch_config(D)
    tiles = triton.cdiv(max(min(max_seqlen, N), 1), block_t)  # no image is longer than N
    head_groups = triton.cdiv(H, heads_per_prog)
    n_work = tiles * head_groups * n_images
    dummy = inv_freq  # stands in for absent optional pointers; never read
    rope2d_kernel[work_grid(n_work)](
        q, k, q_out, k_out,
        inv_freq, cu_seqlens if packed else dummy, grids if packed else dummy,
        coord_transform if coord_transform is not None else dummy,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        H, N, hw[0], hw[1], num_prefix_tokens,
        4 if (coord_transform is not None and coord_transform.numel() > 4) else 0, tiles, head_groups, n_work,
        PACKED=packed, HAS_TRANSFORM=coord_transform is not None, INVERSE=inverse,
        HEAD_DIM=D, HALF_PAD=half_pad, BLOCK_T=block_t, HEADS_PER_PROG=heads_per_prog,
        num_warps=num_warps,
    )
