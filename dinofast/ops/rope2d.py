"""rope2d: fused 2D RoPE for DINOv3 (registration, backend dispatch, autograd, functional API).

Backends (one implementation each, same semantics):
  reference  dinofast/reference/rope2d.py       triton  kernels/rope2d.py
  cpp        csrc/rope2d_cpu.cpp                    cuda    csrc/rope2d_cuda.cu
All of them receive 4-D [B, N, H, D] strided views (packed [T, H, D] as [1, T, H, D]) and write
into preallocated outputs that may alias the inputs (that is how rope2d_ works in place).
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from dinofast import _debug
from dinofast import _validate as V
from dinofast._backend import dispatch, empty_output
from dinofast._layout import PackedLayout, flatten_layout, packed_grids, unflatten_layout
from dinofast.ops._eager import direct_call_ok
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
        """float32 [head_dim/4], computed afresh (the reference's; the ops use rope_inv_freq)."""
        return inv_freq(head_dim, self.theta, self.periods, device=device).contiguous()


# id(periods) -> (a weak reference to it, its key below, device, 1/periods there): a checkpoint's
# periods go to every layer's call, so they are checked and inverted once per change of the tensor,
# not per call (six small tensor ops, and a host read of the check on CPU). A plain dict: a
# WeakIdKeyDictionary lookup costs a microsecond more per call.
_PERIOD_INV_FREQ: dict = {}
_PERIOD_INV_FREQ_MAX = 64  # entries of dead tensors go when the table is cleared at this size


def rope_inv_freq(head_dim: int, theta: float, periods: Optional[Tensor], device, arg: str = "periods") -> Tensor:
    """float32 [head_dim/4] on `device`: 1/periods when given (V.check_periods: a ValueError naming
    `arg`), else transformers' 1/theta^(4k/D)."""
    device = device if isinstance(device, torch.device) else torch.device(device)
    if periods is None:
        if torch.compiler.is_compiling():
            return inv_freq(head_dim, theta, device=device)
        return _cached_inv_freq(head_dim, theta, device)
    V.check_tensor(periods, arg)  # before the key reads its attributes
    # the key: the tensor's version and storage, and the head dim its shape was checked against (a
    # resize is an in-place change: a new version)
    key = (None if periods.requires_grad or V.tracing(periods) or periods.is_inference()
           else (periods._version, periods.data_ptr(), periods.dtype, head_dim))
    if key is not None:
        hit = _PERIOD_INV_FREQ.get(id(periods))
        if hit is not None and hit[0]() is periods and hit[1] == key and hit[2] == device:
            return hit[3]
    V.check_periods(periods, head_dim, arg)
    if key is None:
        return inv_freq(head_dim, theta, periods, device=device).contiguous()
    with torch.inference_mode(False):  # a normal tensor, which a later backward may save
        freqs = inv_freq(head_dim, theta, periods, device=device).contiguous()
    if len(_PERIOD_INV_FREQ) >= _PERIOD_INV_FREQ_MAX:
        _PERIOD_INV_FREQ.clear()
    _PERIOD_INV_FREQ[id(periods)] = (weakref.ref(periods), key, device, freqs)
    return freqs


@functools.lru_cache(maxsize=64)
def _cached_inv_freq(head_dim: int, theta: float, device: torch.device) -> Tensor:
    # A tensor made under inference_mode could never be saved for a later backward: the cached one
    # must be a normal tensor whatever mode its first caller ran in.
    with torch.inference_mode(False):
        return inv_freq(head_dim, theta, device=device)


# ---------------------------------------------------------------------------------------------
# Backends: write rotated q, k ([B, N, H, D] views) into q_out, k_out.
# host: the caller's PackedLayout (host cu_seqlens and grids) or None; max_seqlen: an upper bound
# on the segment lengths (packed), N (batched).
# ---------------------------------------------------------------------------------------------
def _reference_impl(q, k, q_out, k_out, freqs, cu_seqlens, grids, hw, coord_transform, P, inverse, max_seqlen,
                    host):
    if cu_seqlens is None:  # the reference speaks the public layouts: [B, H, N, D] / [T, H, D]
        rq, rk = apply_rope2d(q.transpose(1, 2), k.transpose(1, 2), freqs, hw, num_prefix_tokens=P,
                              coord_transform=coord_transform, inverse=inverse)
        q_out.copy_(rq.transpose(1, 2))
        k_out.copy_(rk.transpose(1, 2))
    else:  # the per-image loop runs over the host layout when there is one (else the oracle reads it)
        rq, rk = apply_rope2d(q[0], k[0], freqs, grids if host is None else host.grids, num_prefix_tokens=P,
                              cu_seqlens=cu_seqlens if host is None else host.cu_seqlens,
                              coord_transform=coord_transform, inverse=inverse)
        q_out[0].copy_(rq)
        k_out[0].copy_(rk)


def _triton_impl(q, k, q_out, k_out, freqs, cu_seqlens, grids, hw, coord_transform, P, inverse, max_seqlen, host):
    from dinofast.kernels.rope2d import rope2d as launch

    launch(q, k, q_out, k_out, freqs, cu_seqlens, grids, hw, coord_transform, P, inverse, max_seqlen)


def _C_impl(q, k, q_out, k_out, freqs, cu_seqlens, grids, hw, coord_transform, P, inverse, max_seqlen, host):
    # One schema, two kernels: torch's dispatcher picks csrc/rope2d_cpu.cpp or csrc/rope2d_cuda.cu by device.
    torch.ops.dinofast_C.rope2d(q, k, q_out, k_out, freqs, cu_seqlens, grids, hw[0], hw[1],
                                coord_transform, P, inverse)


IMPLS = {"reference": _reference_impl, "triton": _triton_impl, "cpp": _C_impl, "cuda": _C_impl}


def _bnhd(x: Tensor, packed: bool) -> Tensor:
    """The backends' [B, N, H, D] view of a public [B, H, N, D] / [T, H, D] tensor (no copy)."""
    return x.unsqueeze(0) if packed else x.transpose(1, 2)


def _run(q, k, q_out, k_out, freqs, cu_seqlens, grids, hp, wp, coord_transform, P, inverse, max_seqlen,
         host) -> None:
    """The op on real tensors (eager, or inside the registered op). Never reads device metadata
    unless the debug switch is on."""
    packed = cu_seqlens is not None
    if packed and _debug.enabled():
        _debug.check_device_metadata(cu_seqlens, grids, q.shape[0], P, host)
    impl = dispatch(IMPLS, q.device, "rope2d")
    if q.numel() == 0:
        return
    impl(_bnhd(q, packed), _bnhd(k, packed), _bnhd(q_out, packed), _bnhd(k_out, packed), freqs,
         cu_seqlens, grids, (hp, wp), coord_transform, P, inverse, max_seqlen, host)


# ---------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with fake and autograd kernels. Host
# metadata crosses the schema as int lists (host_cu_seqlens [n+1], host_grids [2n]) or None.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("dinofast::rope2d", mutates_args=())
def _rope2d_op(
    q: Tensor, k: Tensor, inv_freq: Tensor, cu_seqlens: Optional[Tensor], grids: Optional[Tensor],
    hp: int, wp: int, coord_transform: Optional[Tensor], num_prefix_tokens: int, inverse: bool,
    max_seqlen: int, host_cu_seqlens: Optional[List[int]], host_grids: Optional[List[int]],
) -> Tuple[Tensor, Tensor]:
    q_out, k_out = empty_output(q), empty_output(k)
    _run(q, k, q_out, k_out, inv_freq, cu_seqlens, grids, hp, wp, coord_transform, num_prefix_tokens, inverse,
         max_seqlen, unflatten_layout(host_cu_seqlens, host_grids, num_prefix_tokens))
    return q_out, k_out


@_rope2d_op.register_fake
def _(q, k, inv_freq, cu_seqlens, grids, hp, wp, coord_transform, num_prefix_tokens, inverse, max_seqlen,
      host_cu_seqlens, host_grids):
    return torch.empty_like(q), torch.empty_like(k)


def _setup_context(ctx, inputs, output):
    _, _, freqs, cu_seqlens, grids, hp, wp, coord_transform, P, inverse, max_seqlen, host_cu, host_grids = inputs
    ctx.save_for_backward(freqs, cu_seqlens, grids, coord_transform)
    ctx.args = (hp, wp, P, inverse, max_seqlen, host_cu, host_grids)


def _backward(ctx, grad_q, grad_k):
    # The rotation is orthogonal: its adjoint is the rotation by -angle.
    freqs, cu_seqlens, grids, coord_transform = ctx.saved_tensors
    hp, wp, P, inverse, max_seqlen, host_cu, host_grids = ctx.args
    grad_q, grad_k = V.unit_last_stride(grad_q), V.unit_last_stride(grad_k)
    dq, dk = _rope2d_op(grad_q, grad_k, freqs, cu_seqlens, grids, hp, wp, coord_transform, P, not inverse,
                        max_seqlen, host_cu, host_grids)
    return dq, dk, None, None, None, None, None, None, None, None, None, None, None


_rope2d_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("dinofast::rope2d_", mutates_args=("q", "k"))
def _rope2d_inplace_op(
    q: Tensor, k: Tensor, inv_freq: Tensor, cu_seqlens: Optional[Tensor], grids: Optional[Tensor],
    hp: int, wp: int, coord_transform: Optional[Tensor], num_prefix_tokens: int, inverse: bool,
    max_seqlen: int, host_cu_seqlens: Optional[List[int]], host_grids: Optional[List[int]],
) -> None:
    _run(q, k, q, k, inv_freq, cu_seqlens, grids, hp, wp, coord_transform, num_prefix_tokens, inverse,
         max_seqlen, unflatten_layout(host_cu_seqlens, host_grids, num_prefix_tokens))


@_rope2d_inplace_op.register_fake
def _(q, k, inv_freq, cu_seqlens, grids, hp, wp, coord_transform, num_prefix_tokens, inverse, max_seqlen,
      host_cu_seqlens, host_grids):
    return None


# ---------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------
class _Args(NamedTuple):
    """What _prepare hands the op: the schema's arguments, plus the layout object for direct calls."""

    q: Tensor
    k: Tensor
    freqs: Tensor
    cu_seqlens: Optional[Tensor]
    grids: Optional[Tensor]
    hp: int
    wp: int
    coord_transform: Optional[Tensor]
    num_prefix_tokens: int
    max_seqlen: int
    layout: Optional[PackedLayout]

    def schema(self, inverse: bool) -> tuple:
        host_cu, host_grids = flatten_layout(self.layout)
        return (self.q, self.k, self.freqs, self.cu_seqlens, self.grids, self.hp, self.wp, self.coord_transform,
                self.num_prefix_tokens, inverse, self.max_seqlen, host_cu, host_grids)


def _prepare(q, k, grids, num_prefix_tokens, theta, periods, cu_seqlens, coord_transform, layout) -> _Args:
    """Shape/dtype/device checks and host-layout checks (no device read; safe under torch.compile
    tracing) and the op's arguments."""
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
        grids, layout, n = packed_grids(grids, layout, cu_seqlens, q.shape[0], "q.shape[0] (T)", num_prefix_tokens,
                                        q.device)
        cu_seqlens, grids = V.contiguous(cu_seqlens), V.contiguous(grids)
        hp = wp = 0
        # the launch bound: the longest image when the host knows it, else T (still a bound)
        max_seqlen = q.shape[0] if layout is None else layout.max_seqlen
    else:
        n = q.shape[0]
        hp, wp = V.check_grid(grids)
        if q.shape[2] != num_prefix_tokens + hp * wp:
            V.fail("q", f"N = num_prefix_tokens + Hp*Wp = {num_prefix_tokens} + {hp}*{wp} = "
                   f"{num_prefix_tokens + hp * wp} tokens (q is [B, H, N, D])", q.shape[2])
        grids = layout = None
        max_seqlen = q.shape[2]
    coord_transform = V.check_coord_transform(coord_transform, n, q.device)
    freqs = rope_inv_freq(D, theta, periods, q.device)
    return _Args(V.unit_last_stride(q), V.unit_last_stride(k), freqs, cu_seqlens, grids, hp, wp, coord_transform,
                 num_prefix_tokens, max_seqlen, layout)


def rope2d(
    q: Tensor, k: Tensor, grids, *, num_prefix_tokens: int, theta: float = 100.0,
    periods: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
    coord_transform: Optional[Tensor] = None, layout: Optional[PackedLayout] = None,
) -> Tuple[Tensor, Tensor]:
    """DINOv3 2D RoPE of q and k; returns new (q, k) in the input dtype. Differentiable.

    Batched: q, k [B, H, N, D] (a transposed [B, N, H, D] buffer is used as is, no copy),
             grids = (Hp, Wp), N = num_prefix_tokens + Hp*Wp.
    Packed:  q, k [T, H, D], cu_seqlens int32 [n+1], grids int32 [n, 2] per-image (Hp, Wp) on q's
             device, or a host list of n (Hp, Wp) pairs (copied to the device once per distinct list).
             layout: optional dinofast.PackedLayout (host copies of cu_seqlens/grids, e.g.
             `pack(...).layout`): checked against the tensors' shapes and used to size the launch.
             The device values are never read back (no host sync) unless dinofast.debug_checks()
             / DINOFAST_DEBUG_CHECKS=1 is on; the C++/CUDA kernels check what they can.
    D: a multiple of 4 up to 256; dtypes fp32, fp16, bf16 (fp64 too). Angles in fp32 in-kernel.
    theta: the period base; periods [D/4] (as stored in DINOv3 checkpoints) overrides it.
    coord_transform: train-time augmentation, float32 [4] or [n, 4] (shift_y, shift_x, scale_y,
    scale_x); see dinofast.sample_coord_transform. The prefix tokens are never rotated.
    """
    a = _prepare(q, k, grids, num_prefix_tokens, theta, periods, cu_seqlens, coord_transform, layout)
    if direct_call_ok(a.q, a.k, a.coord_transform):
        q_out, k_out = empty_output(a.q), empty_output(a.k)
        _run(a.q, a.k, q_out, k_out, a.freqs, a.cu_seqlens, a.grids, a.hp, a.wp, a.coord_transform,
             a.num_prefix_tokens, False, a.max_seqlen, a.layout)
        return q_out, k_out
    return _rope2d_op(*a.schema(False))


def rope2d_(
    q: Tensor, k: Tensor, grids, *, num_prefix_tokens: int, theta: float = 100.0,
    periods: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
    coord_transform: Optional[Tensor] = None, layout: Optional[PackedLayout] = None,
) -> Tuple[Tensor, Tensor]:
    """In-place rope2d (inference: not differentiable); returns (q, k). Same arguments as rope2d."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise ValueError("rope2d_: expected q and k that do not require grad (in-place rotation is not "
                         "differentiable); got requires_grad=True: use dinofast.rope2d")
    a = _prepare(q, k, grids, num_prefix_tokens, theta, periods, cu_seqlens, coord_transform, layout)
    if a.q is not q or a.k is not k:
        V.fail("q, k", "unit stride on the head dim for an in-place rotation", (q.stride(), k.stride()))
    # each element is read and written once per tensor: shared elements would be rotated twice
    V.check_no_internal_overlap(q, "q")
    V.check_no_internal_overlap(k, "k")
    V.check_disjoint(q, "q", k, "k")
    if direct_call_ok(q, k, a.coord_transform):
        _run(q, k, q, k, a.freqs, a.cu_seqlens, a.grids, a.hp, a.wp, a.coord_transform, a.num_prefix_tokens,
             False, a.max_seqlen, a.layout)
    else:
        _rope2d_inplace_op(*a.schema(False))
    return q, k
