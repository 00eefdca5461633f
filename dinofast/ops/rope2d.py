"""rope2d: fused 2D RoPE for DINOv3 (registration, backend dispatch, autograd, functional API).

Backends (one implementation each, same semantics):
  reference  dinofast/reference/rope2d.py       triton  kernels/rope2d.py
  cpp        csrc/rope2d_cpu.cpp                    cuda    csrc/rope2d_cuda.cu
All of them receive 4-D [B, N, H, D] strided views (packed [T, H, D] as [1, T, H, D]) and write
into preallocated outputs that may alias the inputs (that is how rope2d_ works in place).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from dinofast import _validate as V
from dinofast._backend import dispatch, empty_output
from dinofast.reference.rope2d import apply_rope2d, inv_freq


@dataclass(frozen=True)
class RopeSpec:
    """DINOv3 2D RoPE parameters, for ops that rotate q/k on the fly (see varlen_attention).

    grids: (Hp, Wp) for batched inputs, int32 [n, 2] for packed ones. coord_transform: optional
    float32 [4] or [n, 4] (shift_y, shift_x, scale_y, scale_x), see sample_coord_transform.
    """

    grids: Union[Tuple[int, int], Tensor]
    num_prefix_tokens: int
    theta: float = 100.0
    periods: Optional[Tensor] = None
    coord_transform: Optional[Tensor] = None

    def inv_freq(self, head_dim: int, device) -> Tensor:
        return rope_inv_freq(head_dim, self.theta, self.periods, device)


def rope_inv_freq(head_dim: int, theta: float, periods: Optional[Tensor], device) -> Tensor:
    """float32 [head_dim/4] on `device`: 1/periods when given, else transformers' 1/theta^(4k/D)."""
    if periods is not None or torch.compiler.is_compiling():
        return inv_freq(head_dim, theta, periods, device=device).contiguous()
    return _cached_inv_freq(head_dim, float(theta), torch.device(device))


@functools.lru_cache(maxsize=64)
def _cached_inv_freq(head_dim: int, theta: float, device: torch.device) -> Tensor:
    return inv_freq(head_dim, theta, device=device)


# ---------------------------------------------------------------------------------------------
# Backends: write rotated q, k ([B, N, H, D] views) into q_out, k_out.
# ---------------------------------------------------------------------------------------------
def _reference_impl(q, k, q_out, k_out, freqs, cu_seqlens, grids, hw, coord_transform, P, inverse, max_seqlen):
    if cu_seqlens is None:  # the reference speaks the public layouts: [B, H, N, D] / [T, H, D]
        rq, rk = apply_rope2d(q.transpose(1, 2), k.transpose(1, 2), freqs, hw, num_prefix_tokens=P,
                              coord_transform=coord_transform, inverse=inverse)
        q_out.copy_(rq.transpose(1, 2))
        k_out.copy_(rk.transpose(1, 2))
    else:
        rq, rk = apply_rope2d(q[0], k[0], freqs, grids, num_prefix_tokens=P, cu_seqlens=cu_seqlens,
                              coord_transform=coord_transform, inverse=inverse)
        q_out[0].copy_(rq)
        k_out[0].copy_(rk)


def _triton_impl(q, k, q_out, k_out, freqs, cu_seqlens, grids, hw, coord_transform, P, inverse, max_seqlen):
    from dinofast.kernels.rope2d import rope2d as launch

    launch(q, k, q_out, k_out, freqs, cu_seqlens, grids, hw, coord_transform, P, inverse, max_seqlen)


def _C_impl(q, k, q_out, k_out, freqs, cu_seqlens, grids, hw, coord_transform, P, inverse, max_seqlen):
    # One schema, two kernels: torch's dispatcher picks csrc/rope2d_cpu.cpp or csrc/rope2d_cuda.cu by device.
    torch.ops.dinofast_C.rope2d(q, k, q_out, k_out, freqs, cu_seqlens, grids, hw[0], hw[1],
                                coord_transform, P, inverse)


IMPLS = {"reference": _reference_impl, "triton": _triton_impl, "cpp": _C_impl, "cuda": _C_impl}


def _bnhd(x: Tensor, packed: bool) -> Tensor:
    """The backends' [B, N, H, D] view of a public [B, H, N, D] / [T, H, D] tensor (no copy)."""
    return x.unsqueeze(0) if packed else x.transpose(1, 2)


def _run(q, k, q_out, k_out, freqs, cu_seqlens, grids, hp, wp, coord_transform, P, inverse) -> None:
    packed = cu_seqlens is not None
    if packed:  # value checks need real tensors: they live here, not in the traced wrapper
        cu, _ = V.read_packed(cu_seqlens, grids, q.shape[0], P)
        max_seqlen = V.max_len(cu)
    else:
        max_seqlen = q.shape[2]
    impl = dispatch(IMPLS, q.device, "rope2d")
    if q.numel() == 0:
        return
    impl(_bnhd(q, packed), _bnhd(k, packed), _bnhd(q_out, packed), _bnhd(k_out, packed), freqs,
         cu_seqlens, grids, (hp, wp), coord_transform, P, inverse, max_seqlen)


# ---------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with fake and autograd kernels.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("dinofast::rope2d", mutates_args=())
def _rope2d_op(
    q: Tensor, k: Tensor, inv_freq: Tensor, cu_seqlens: Optional[Tensor], grids: Optional[Tensor],
    hp: int, wp: int, coord_transform: Optional[Tensor], num_prefix_tokens: int, inverse: bool,
) -> Tuple[Tensor, Tensor]:
    q_out, k_out = empty_output(q), empty_output(k)
    _run(q, k, q_out, k_out, inv_freq, cu_seqlens, grids, hp, wp, coord_transform, num_prefix_tokens, inverse)
    return q_out, k_out


@_rope2d_op.register_fake
def _(q, k, inv_freq, cu_seqlens, grids, hp, wp, coord_transform, num_prefix_tokens, inverse):
    return torch.empty_like(q), torch.empty_like(k)


def _setup_context(ctx, inputs, output):
    _, _, freqs, cu_seqlens, grids, hp, wp, coord_transform, P, inverse = inputs
    ctx.save_for_backward(freqs, cu_seqlens, grids, coord_transform)
    ctx.hp, ctx.wp, ctx.P, ctx.inverse = hp, wp, P, inverse


def _backward(ctx, grad_q, grad_k):
    # The rotation is orthogonal: its adjoint is the rotation by -angle.
    freqs, cu_seqlens, grids, coord_transform = ctx.saved_tensors
    grad_q, grad_k = V.unit_last_stride(grad_q), V.unit_last_stride(grad_k)
    dq, dk = _rope2d_op(grad_q, grad_k, freqs, cu_seqlens, grids, ctx.hp, ctx.wp, coord_transform, ctx.P,
                        not ctx.inverse)
    return dq, dk, None, None, None, None, None, None, None, None


_rope2d_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("dinofast::rope2d_", mutates_args=("q", "k"))
def _rope2d_inplace_op(
    q: Tensor, k: Tensor, inv_freq: Tensor, cu_seqlens: Optional[Tensor], grids: Optional[Tensor],
    hp: int, wp: int, coord_transform: Optional[Tensor], num_prefix_tokens: int, inverse: bool,
) -> None:
    _run(q, k, q, k, inv_freq, cu_seqlens, grids, hp, wp, coord_transform, num_prefix_tokens, inverse)


@_rope2d_inplace_op.register_fake
def _(q, k, inv_freq, cu_seqlens, grids, hp, wp, coord_transform, num_prefix_tokens, inverse):
    return None


# ---------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------
def _prepare(q, k, grids, num_prefix_tokens, theta, periods, cu_seqlens, coord_transform):
    """Shape/dtype/device checks (safe under torch.compile tracing) and the op's arguments."""
    V.check_tensor(q, "q", dtypes=V.FLOAT_DTYPES)
    packed = cu_seqlens is not None
    V.check_tensor(q, "q", ndim=3 if packed else 4)
    V.check_tensor(k, "k")
    V.check_same(q, "q", k, "k")
    V.check_nonneg_int(num_prefix_tokens, "num_prefix_tokens")
    D = q.shape[-1]
    V.check_head_dim(D, "q.shape[-1] (head dim)")
    V.check_finite(theta, "theta")
    if packed:
        n = V.check_packed_meta(cu_seqlens, grids, q.shape[0], q.device)
        cu_seqlens, grids = cu_seqlens.contiguous(), grids.contiguous()
        hp = wp = 0
    else:
        n = q.shape[0]
        hp, wp = V.check_grid(grids)
        if q.shape[2] != num_prefix_tokens + hp * wp:
            V.fail("q", f"N = num_prefix_tokens + Hp*Wp = {num_prefix_tokens} + {hp}*{wp} = "
                   f"{num_prefix_tokens + hp * wp} tokens (q is [B, H, N, D])", q.shape[2])
        grids = None
    coord_transform = V.check_rope_extras(periods, coord_transform, D, n, q.device)
    freqs = rope_inv_freq(D, theta, periods, q.device)
    return (V.unit_last_stride(q), V.unit_last_stride(k), freqs, cu_seqlens, grids, hp, wp, coord_transform,
            num_prefix_tokens)


def rope2d(
    q: Tensor, k: Tensor, grids, *, num_prefix_tokens: int, theta: float = 100.0,
    periods: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
    coord_transform: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """DINOv3 2D RoPE of q and k; returns new (q, k) in the input dtype. Differentiable.

    Batched: q, k [B, H, N, D] (a transposed [B, N, H, D] buffer is used as is, no copy),
             grids = (Hp, Wp), N = num_prefix_tokens + Hp*Wp.
    Packed:  q, k [T, H, D], cu_seqlens int32 [n+1], grids int32 [n, 2] per-image (Hp, Wp).
    D: a multiple of 4 up to 256; dtypes fp32, fp16, bf16 (fp64 too). Angles in fp32 in-kernel.
    theta: the period base; periods [D/4] (as stored in DINOv3 checkpoints) overrides it.
    coord_transform: train-time augmentation, float32 [4] or [n, 4] (shift_y, shift_x, scale_y,
    scale_x); see dinofast.sample_coord_transform. The prefix tokens are never rotated.
    """
    args = _prepare(q, k, grids, num_prefix_tokens, theta, periods, cu_seqlens, coord_transform)
    return _rope2d_op(*args, False)


def rope2d_(
    q: Tensor, k: Tensor, grids, *, num_prefix_tokens: int, theta: float = 100.0,
    periods: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
    coord_transform: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """In-place rope2d (inference: not differentiable); returns (q, k). Same arguments as rope2d."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise ValueError("rope2d_: expected q and k that do not require grad (in-place rotation is not "
                         "differentiable); got requires_grad=True: use dinofast.rope2d")
    args = _prepare(q, k, grids, num_prefix_tokens, theta, periods, cu_seqlens, coord_transform)
    if args[0] is not q or args[1] is not k:
        V.fail("q, k", "unit stride on the head dim for an in-place rotation", (q.stride(), k.stride()))
    # each element is read and written once per tensor: shared elements would be rotated twice
    V.check_no_internal_overlap(q, "q")
    V.check_no_internal_overlap(k, "k")
    V.check_disjoint(q, "q", k, "k")
    _rope2d_inplace_op(*args, False)
    return q, k
