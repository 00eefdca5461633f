"""Triton kernels for fused pixel shuffle + projection (forward, grad_x, grad_weight) and launchers.

All three are GEMMs over the shuffled matrix A [M, K = D*s*s] that is never built: the tile
loader turns (output row m, column k) into an x address,
    k = slot*D + d, slot = dy*s + dx,   row m -> (batch b, token tok of slot (0, 0), image width Wp),
    A[m, k] = x[b, tok + dy*Wp + dx, d]
(nanoVLM's pixel shuffle, as dinofast/reference/pixel_shuffle_project.py writes it). The K loop
walks one slot at a time in BLOCK_K chunks of d, so every A tile is BLOCK_M rows of BLOCK_K
contiguous channels. Accumulation is fp32; the bias is added in the forward epilogue; fp32 inputs
are multiplied in full precision (no TF32).
  forward       y[m, n]  = sum_k A[m, k] W[n, k] + bias[n]
  grad_x        dA[m, k] = sum_n dy[m, n] W[n, k], stored straight to x's row of (m, slot)
                (a permutation: every non-prefix x row is written exactly once)
  grad_weight   dW[n, k] = sum_m dy[m, n] A[m, k]
Packed inputs find each row's image by a binary search over out_cu_seqlens.

Filling the GPU at small M (split-K). A VLM batch may have M = 150..1200 rows for K = 12288 and
N = 960: 128x128 tiles give 16..80 programs on a 132-SM GPU. When a forward config's tile grid is
smaller than one wave (the device's SM count), the launcher splits the K loop into `split` chunks
(grid axis 1; `split_k` below): each program writes its fp32 partial sum to its own slice of a
workspace [split, M, N], and a second pass sums the slices in a fixed order (torch.sum over axis
0) and adds the bias. The result is deterministic, run to run, at the cost of the workspace
(split * M * N * 4 bytes, a few MB at these shapes) and one extra read of it. Atomics into one
fp32 buffer would save that pass but make the rounding depend on the order programs finish in.
grad_x and grad_weight need no split: their grids (M tiles x K tiles, N tiles x K tiles) already
hold hundreds of programs at these shapes.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from dinofast._backend import triton_interpreted


@triton.jit
def _image_tokens(r, start, wp, s, P):
    """x token of slot (0, 0) for rows r (local to an image whose tokens start at `start`)."""
    gw = wp // s
    i = r // gw
    return start + P + i * s * wp + (r - i * gw) * s


@triton.jit
def _row_sources(rows, cu_ptr, grids_ptr, out_cu_ptr, n_images, search_steps, s, P, G, Wp,
                 PACKED: tl.constexpr):
    """For output rows `rows`: (b, tok, wp) = batch index, x token of slot (0, 0), image width."""
    if PACKED:
        # last image i with out_cu[i] <= row; `search_steps` = ceil(log2(n_images)) halvings
        lo = rows * 0
        hi = lo + (n_images - 1)
        for _ in range(search_steps):
            mid = (lo + hi + 1) // 2
            go = tl.load(out_cu_ptr + mid) <= rows
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid - 1)
        wp = tl.load(grids_ptr + 2 * lo + 1)
        tok = _image_tokens(rows - tl.load(out_cu_ptr + lo), tl.load(cu_ptr + lo), wp, s, P)
        b = rows * 0
    else:
        b = rows // G
        wp = rows * 0 + Wp
        tok = _image_tokens(rows - b * G, 0, wp, s, P)
    return b, tok, wp


@triton.jit
def _slot_of(kt, k_tiles, s, BLOCK_K: tl.constexpr):
    """K tile kt -> (dy, dx, first channel d0): tiles never straddle two slots."""
    slot = kt // k_tiles
    d0 = (kt - slot * k_tiles) * BLOCK_K
    dy = slot // s
    return slot, dy, slot - dy * s, d0


@triton.jit
def pixel_shuffle_project_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, ws_ptr, cu_ptr, grids_ptr, out_cu_ptr,
    M, N_OUT, D, s, P, G, Wp, n_images, search_steps, M_BUCKET,
    stride_xb, stride_xt, stride_wn, stride_ym,
    PACKED: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Program (pid, split): output tile pid over K chunk `split` of tl.num_programs(1). One chunk:
    # the whole K loop, bias added and y written here. Several: the fp32 partial goes to the
    # workspace ws [splits, M, N_OUT] (contiguous) and the launcher sums the splits.
    # M_BUCKET only keys the autotuner (next power of two of M, capped).
    # grouped launch order: GROUP_M row tiles share each weight tile while it is in L2
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N_OUT, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N_OUT
    b, tok, wp = _row_sources(rm, cu_ptr, grids_ptr, out_cu_ptr, n_images, search_steps, s, P, G, Wp, PACKED)
    row_ptr = x_ptr + b.to(tl.int64) * stride_xb + tok.to(tl.int64) * stride_xt
    wp_stride = wp.to(tl.int64) * stride_xt
    w_col_ptr = w_ptr + rn.to(tl.int64) * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_tiles = tl.cdiv(D, BLOCK_K)
    k_iters = s * s * k_tiles
    chunk = tl.cdiv(k_iters, n_splits)
    for kt in range(split * chunk, min(k_iters, (split + 1) * chunk)):
        slot, dy, dx, d0 = _slot_of(kt, k_tiles, s, BLOCK_K)
        d = d0 + rk
        d_mask = d < D
        a = tl.load((row_ptr + dy * wp_stride + dx * stride_xt)[:, None] + d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_col_ptr[None, :] + (slot * D + d)[:, None],
                    mask=d_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong: multiply in fp32 there
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    out_mask = m_mask[:, None] & n_mask[None, :]
    if n_splits == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        ws_rows = (split * M + rm).to(tl.int64) * N_OUT
        tl.store(ws_ptr + ws_rows[:, None] + rn[None, :], acc, mask=out_mask)


@triton.jit
def pixel_shuffle_project_bwd_dx_kernel(
    dy_ptr, w_ptr, dx_ptr, cu_ptr, grids_ptr, out_cu_ptr,
    M, N_OUT, D, s, P, G, Wp, n_images, search_steps,
    stride_dym, stride_wn, stride_dxb, stride_dxt,
    PACKED: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # program (pid_m, pid_k): dA[rows of pid_m, columns of K tile pid_k], reduced over N_OUT
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_tiles = tl.cdiv(D, BLOCK_K)
    slot, dy, dx, d0 = _slot_of(pid_k, k_tiles, s, BLOCK_K)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    d = d0 + tl.arange(0, BLOCK_K)
    m_mask = rm < M
    d_mask = d < D
    g_row_ptr = dy_ptr + rm.to(tl.int64) * stride_dym
    w_ptrs = w_ptr + (slot * D + d)[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N_OUT, BLOCK_N):
        n = n0 + rn
        n_mask = n < N_OUT
        g = tl.load(g_row_ptr[:, None] + n[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + n.to(tl.int64)[:, None] * stride_wn, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=INPUT_PRECISION)
    b, tok, wp = _row_sources(rm, cu_ptr, grids_ptr, out_cu_ptr, n_images, search_steps, s, P, G, Wp, PACKED)
    dst = dx_ptr + b.to(tl.int64) * stride_dxb + (tok + dy * wp + dx).to(tl.int64) * stride_dxt
    tl.store(dst[:, None] + d[None, :], acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def _dw_step(acc, dy_ptr, x_ptr, rm, m_mask, b, tok, wp, dy, dx, rn, n_mask, d, d_mask,
             stride_dym, stride_xb, stride_xt, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc[BLOCK_N, BLOCK_K] += dy[rm, rn]^T @ A[rm, slot (dy, dx), d]."""
    src = x_ptr + b.to(tl.int64) * stride_xb + (tok + dy * wp + dx).to(tl.int64) * stride_xt
    a = tl.load(src[:, None] + d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    g_t = tl.load(dy_ptr + rm.to(tl.int64)[None, :] * stride_dym + rn[:, None],
                  mask=n_mask[:, None] & m_mask[None, :], other=0.0)  # dy^T tile [BLOCK_N, BLOCK_M]
    if UPCAST:
        a = a.to(tl.float32)
        g_t = g_t.to(tl.float32)
    return tl.dot(g_t, a, acc, input_precision=INPUT_PRECISION)


@triton.jit
def pixel_shuffle_project_bwd_dw_kernel(
    dy_ptr, x_ptr, dw_ptr, cu_ptr, grids_ptr, out_cu_ptr,
    M, N_OUT, D, s, P, G, Wp, n_images, search_steps,
    stride_dym, stride_xb, stride_xt, stride_dwn,
    PACKED: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # program (pid_n, pid_k): dW[rows of pid_n, columns of K tile pid_k], reduced over all M rows
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_tiles = tl.cdiv(D, BLOCK_K)
    slot, dy, dx, d0 = _slot_of(pid_k, k_tiles, s, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = d0 + tl.arange(0, BLOCK_K)
    rm0 = tl.arange(0, BLOCK_M)
    n_mask = rn < N_OUT
    d_mask = d < D

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if PACKED:
        # image by image, so that the inner loop's addresses are arithmetic (no dependent loads)
        # and the compiler software-pipelines it as in the batched case
        for img in range(0, n_images):
            m_lo = tl.load(out_cu_ptr + img)
            m_hi = tl.load(out_cu_ptr + img + 1)
            start = tl.load(cu_ptr + img)
            wp = tl.load(grids_ptr + 2 * img + 1)
            for m0 in range(m_lo, m_hi, BLOCK_M):
                rm = m0 + rm0
                tok = _image_tokens(rm - m_lo, start, wp, s, P)
                acc = _dw_step(acc, dy_ptr, x_ptr, rm, rm < m_hi, rm * 0, tok, wp, dy, dx, rn, n_mask, d, d_mask,
                               stride_dym, stride_xb, stride_xt, UPCAST, INPUT_PRECISION)
    else:
        for m0 in range(0, M, BLOCK_M):
            rm = m0 + rm0
            b = rm // G
            tok = _image_tokens(rm - b * G, 0, Wp, s, P)
            acc = _dw_step(acc, dy_ptr, x_ptr, rm, rm < M, b, tok, Wp, dy, dx, rn, n_mask, d, d_mask,
                           stride_dym, stride_xb, stride_xt, UPCAST, INPUT_PRECISION)
    dw_ptrs = dw_ptr + rn.to(tl.int64)[:, None] * stride_dwn + (slot * D + d)[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & d_mask[None, :])


# ---------------------------------------------------------------------------------------------
# Tile configurations. The autotuned launchers pick among CONFIGS on a GPU; DEFAULT_* are the ones
# the AOT test (tests/test_pixel_shuffle_project.py) compiles directly for sm_80 and sm_90; the
# interpreter runs INTERPRETER (small tiles: it is slow, and small tiles exercise the masks).
# ---------------------------------------------------------------------------------------------
DEFAULT_FWD = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
DEFAULT_DX = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=3)
DEFAULT_DW = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)
INTERPRETER = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16)


def _config(kw: dict) -> triton.Config:
    kw = dict(kw)
    return triton.Config(kw, num_warps=kw.pop("num_warps"), num_stages=kw.pop("num_stages"))


FWD_CONFIGS = [_config(DEFAULT_FWD)] + [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=st)
    # (no 128x256 tile: its 4-stage pipeline needs 192 KiB of shared memory, over an A100's 163 KiB)
    for bm, bn, bk, w, st in [(128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 5)]
]
DX_CONFIGS = [_config(DEFAULT_DX)] + [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [(128, 64, 64, 4, 4), (64, 64, 128, 4, 4), (64, 64, 64, 4, 5)]
]
DW_CONFIGS = [_config(DEFAULT_DW)] + [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [(64, 128, 64, 4, 4), (64, 64, 128, 4, 4), (64, 64, 64, 8, 4)]
]

# Small-M forward tiles: with split-K (split_k) they fill a wave at M = 150..1200, K = 12288.
FWD_CONFIGS += [
    triton.Config(dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8), num_warps=4, num_stages=3),
    triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8), num_warps=4, num_stages=4),
]

# fp32 inputs multiply in full fp32 ("ieee" FMA dots, no tensor cores): the low-precision tiles
# spill there, so fp32 launches choose among these small tiles alone, and fp16/bf16 never do.
FP32_FWD_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [(32, 64, 32, 4, 2), (32, 32, 32, 4, 2)]
]
FP32_BWD_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [(32, 64, 32, 4, 2), (32, 32, 32, 4, 2)]
]


def keeps(config: triton.Config, dtype: torch.dtype) -> bool:
    """Whether an autotuned launch on `dtype` inputs may choose `config`."""
    return (config in FP32_FWD_CONFIGS or config in FP32_BWD_CONFIGS) == (dtype == torch.float32)


def _prune_by_dtype(configs, named_args, **kwargs):
    dtype = next(iter(named_args.values())).dtype  # the first operand: x (forward) or grad_y
    return [c for c in configs if keeps(c, dtype)]


# The forward is tuned per (bucket of M, out width, D, s): the best tile depends on M through the
# grid size (whether the programs fill the GPU), and a power-of-two bucket keeps packed batches,
# whose M changes with every batch, from re-tuning at each new M. dx and dW keep (N_OUT, D, s):
# their grids have s*s*D/BLOCK_K K tiles on one axis, hundreds of programs at any M.
_PRUNE = dict(early_config_prune=_prune_by_dtype)
_fwd_tuned = triton.autotune(configs=FWD_CONFIGS + FP32_FWD_CONFIGS, key=["M_BUCKET", "N_OUT", "D", "s"],
                             prune_configs_by=_PRUNE)(pixel_shuffle_project_fwd_kernel)
_dx_tuned = triton.autotune(configs=DX_CONFIGS + FP32_BWD_CONFIGS, key=["N_OUT", "D", "s"],
                            prune_configs_by=_PRUNE)(pixel_shuffle_project_bwd_dx_kernel)
_dw_tuned = triton.autotune(configs=DW_CONFIGS + FP32_BWD_CONFIGS, key=["N_OUT", "D", "s"],
                            prune_configs_by=_PRUNE)(pixel_shuffle_project_bwd_dw_kernel)

M_BUCKET_CAP = 4096     # every M above it shares one tuning: the grid fills the GPU anyway
MAX_SPLIT_K = 32
MIN_K_ITERS_PER_SPLIT = 4  # each split runs at least this many BLOCK_K iterations
H100_SMS = 132
INTERPRETER_WAVE = 8    # "SM count" under the interpreter: small, so test shapes exercise split-K


def m_bucket(M: int) -> int:
    """Autotune bucket of M: the next power of two (at least 16), capped at M_BUCKET_CAP."""
    return min(M_BUCKET_CAP, 1 << max(4, (max(M, 1) - 1).bit_length()))


def split_k(tiles: int, k_iters: int, wave: int) -> int:
    """K splits for a forward grid of `tiles` output tiles and `k_iters` BLOCK_K iterations: 1 when
    the tiles fill a wave of `wave` SMs, else enough splits to fill it, each at least
    MIN_K_ITERS_PER_SPLIT iterations long, at most MAX_SPLIT_K."""
    if tiles >= wave:
        return 1
    return max(1, min(triton.cdiv(wave, tiles), MAX_SPLIT_K, k_iters // MIN_K_ITERS_PER_SPLIT))


def fwd_grid(M: int, N_OUT: int, D: int, s: int, meta: dict, wave: int) -> tuple:
    """Forward launch grid (output tiles, K splits) for tile sizes `meta` on a GPU of `wave` SMs."""
    tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N_OUT, meta["BLOCK_N"])
    return tiles, split_k(tiles, s * s * triton.cdiv(D, meta["BLOCK_K"]), wave)


def dx_grid(M: int, D: int, s: int, meta: dict) -> tuple:
    return triton.cdiv(M, meta["BLOCK_M"]), s * s * triton.cdiv(D, meta["BLOCK_K"])


def dw_grid(N_OUT: int, D: int, s: int, meta: dict) -> tuple:
    return triton.cdiv(N_OUT, meta["BLOCK_N"]), s * s * triton.cdiv(D, meta["BLOCK_K"])


def _wave(device: torch.device) -> int:
    if triton_interpreted():
        return INTERPRETER_WAVE
    if device.type != "cuda":  # the AOT gate runs the launcher on CPU tensors: project an H100
        return H100_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _geometry(x, M, N_OUT, cu_seqlens, grids, out_cu_seqlens, hw, factor, num_prefix_tokens):
    """(PACKED, metadata pointers, scalar arguments M ... search_steps) shared by the three kernels."""
    packed = cu_seqlens is not None
    n_images = cu_seqlens.numel() - 1 if packed else x.shape[0]
    search_steps = math.ceil(math.log2(n_images)) if packed and n_images > 1 else 0
    G = (hw[0] // factor) * (hw[1] // factor) if not packed else 1
    dummy = x  # stands in for absent metadata pointers; never read
    pointers = (cu_seqlens if packed else dummy, grids if packed else dummy, out_cu_seqlens if packed else dummy)
    scalars = (M, N_OUT, x.shape[2], factor, num_prefix_tokens, G, hw[1], n_images, search_steps)
    return packed, pointers, scalars


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], y: torch.Tensor,
            cu_seqlens: Optional[torch.Tensor], grids: Optional[torch.Tensor],
            out_cu_seqlens: Optional[torch.Tensor], hw: Sequence[int], factor: int, num_prefix_tokens: int) -> None:
    """y [M, out] = shuffled(x) @ weight.T (+ bias). x: [B, N, D] view, unit stride on D (packed:
    [1, T, D] with int32 cu_seqlens [n+1], grids [n, 2], out_cu_seqlens [n+1] on x's device)."""
    M, N_OUT = y.shape
    D, s = x.shape[2], factor
    packed, ptrs, geo = _geometry(x, M, N_OUT, cu_seqlens, grids, out_cu_seqlens, hw, factor, num_prefix_tokens)
    wave = _wave(x.device)
    interp = triton_interpreted()
    configs = [dict(INTERPRETER, GROUP_M=4)] if interp else [c.kwargs for c in _fwd_tuned.configs if keeps(c, x.dtype)]
    # one workspace that fits every candidate config (the autotuner runs them all on these args)
    splits = max(fwd_grid(M, N_OUT, D, s, c, wave)[1] for c in configs)
    ws = torch.empty((splits, M, N_OUT) if splits > 1 else (1,), device=y.device, dtype=torch.float32)
    args = (x, weight, bias if bias is not None else x, y, ws, *ptrs, *geo, m_bucket(M),
            x.stride(0), x.stride(1), weight.stride(0), y.stride(0))
    flags = dict(PACKED=packed, HAS_BIAS=bias is not None, **_dot_flags(x))
    if interp:
        chosen = configs[0]
        pixel_shuffle_project_fwd_kernel[fwd_grid(M, N_OUT, D, s, chosen, wave)](*args, **flags, **chosen)
    else:
        _fwd_tuned[lambda meta: fwd_grid(M, N_OUT, D, s, meta, wave)](*args, **flags)
        chosen = _fwd_tuned.best_config.kwargs  # the config of the launch that just ran
    used = fwd_grid(M, N_OUT, D, s, chosen, wave)[1]
    if used > 1:  # the fixed-order sum of the partials (deterministic), then the bias
        total = ws[:used].sum(0)
        y.copy_(total.add_(bias) if bias is not None else total)


def backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, grad_x: Optional[torch.Tensor],
             grad_weight: Optional[torch.Tensor], grad_bias: Optional[torch.Tensor],
             cu_seqlens: Optional[torch.Tensor], grids: Optional[torch.Tensor],
             out_cu_seqlens: Optional[torch.Tensor], hw: Sequence[int], factor: int, num_prefix_tokens: int) -> None:
    """Write each given grad: grad_x [B, N, D] (prefix rows zero), grad_weight [out, K], grad_bias
    [out]. grad_y: contiguous [M, out]."""
    M, N_OUT = grad_y.shape
    D, s = x.shape[2], factor
    packed, ptrs, geo = _geometry(x, M, N_OUT, cu_seqlens, grids, out_cu_seqlens, hw, factor, num_prefix_tokens)
    flags = dict(PACKED=packed, **_dot_flags(x))
    interp = triton_interpreted()
    if grad_bias is not None:
        grad_bias.copy_(grad_y.sum(0, dtype=torch.float32))
    if grad_x is not None:
        _zero_prefix_rows(grad_x, cu_seqlens, num_prefix_tokens)
        args = (grad_y, weight, grad_x, *ptrs, *geo, grad_y.stride(0), weight.stride(0),
                grad_x.stride(0), grad_x.stride(1))
        if interp:
            grid = (triton.cdiv(M, INTERPRETER["BLOCK_M"]), s * s * triton.cdiv(D, INTERPRETER["BLOCK_K"]))
            pixel_shuffle_project_bwd_dx_kernel[grid](*args, **flags, **INTERPRETER)
        else:
            _dx_tuned[lambda meta: dx_grid(M, D, s, meta)](*args, **flags)
    if grad_weight is not None:
        args = (grad_y, x, grad_weight, *ptrs, *geo, grad_y.stride(0), x.stride(0), x.stride(1),
                grad_weight.stride(0))
        if interp:
            grid = (triton.cdiv(N_OUT, INTERPRETER["BLOCK_N"]), s * s * triton.cdiv(D, INTERPRETER["BLOCK_K"]))
            pixel_shuffle_project_bwd_dw_kernel[grid](*args, **flags, **INTERPRETER)
        else:
            _dw_tuned[lambda meta: dw_grid(N_OUT, D, s, meta)](*args, **flags)


def _dot_flags(x: torch.Tensor) -> dict:
    """UPCAST: bf16 dots run in fp32 under the interpreter (its bf16 dot is wrong).
    INPUT_PRECISION: fp32 inputs multiply in full fp32 ("ieee", as torch's matmul does by default),
    not TF32; for fp16/bf16 it is moot."""
    return dict(UPCAST=triton_interpreted() and x.dtype == torch.bfloat16,
                INPUT_PRECISION="ieee" if x.dtype in (torch.float32, torch.float64) else "tf32")


def _zero_prefix_rows(grad_x: torch.Tensor, cu_seqlens: Optional[torch.Tensor], P: int) -> None:
    """Prefix tokens take no part in the shuffle: their gradient is zero (the kernel writes the rest)."""
    if P == 0:
        return
    if cu_seqlens is None:
        grad_x[:, :P] = 0
    else:
        rows = (cu_seqlens[:-1].long()[:, None] + torch.arange(P, device=grad_x.device)).flatten()
        grad_x[0].index_fill_(0, rows, 0)
