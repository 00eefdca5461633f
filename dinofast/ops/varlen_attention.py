"""varlen_attention: packed block-diagonal self-attention with optionally fused 2D RoPE
(registration, backend dispatch, autograd, functional API, flash-attn drop-in).

Backends (one implementation each, same semantics):
  reference  dinofast/reference/varlen_attention.py   triton  kernels/varlen_attention.py
  cpp        csrc/varlen_attention_cpu.cpp             cuda    csrc/varlen_attention_cuda.cpp
Every backend receives q, k, v, out as [T, H, D] views with unit stride on D (any T/H strides),
cu_seqlens int32 [n+1] on their device, lse as contiguous float32 [H, T], and `rope`: None or a
RopeArgs whose rotation it applies to q and k (cpp as the tiles are loaded; triton by one rope2d
pass into scratch buffers before its plain kernels; cuda into rotated scratch copies, which it
hands to ATen's flash / memory-efficient attention).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from dinofast import _debug
from dinofast import _validate as V
from dinofast._backend import dispatch, empty_output
from dinofast._layout import PackedLayout, check_layout, flatten_layout, packed_grids, unflatten_layout
from dinofast.ops._eager import direct_call_ok
from dinofast.ops.rope2d import RopeSpec, rope_inv_freq
from dinofast.reference.rope2d import apply_rope2d, host_ints
from dinofast.reference.varlen_attention import varlen_attention_reference

# Head dims the kernels take: multiples of 8 (fp16 rows of 16 bytes) up to 256.
HEAD_DIM_MULTIPLE, MAX_HEAD_DIM = 8, 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class RopeArgs(NamedTuple):
    """The rotation as the backends see it: freqs float32 [D/4], grids int32 [n, 2] (Hp, Wp),
    coord_transform float32 [4] / [n, 4] or None, num_prefix_tokens unrotated tokens per segment."""

    freqs: Tensor
    grids: Tensor
    coord_transform: Optional[Tensor]
    num_prefix_tokens: int

    def inv_freq(self, head_dim: int, device) -> Tensor:  # the RopeSpec interface the reference uses
        return self.freqs


class Impl(NamedTuple):
    forward: object   # (q, k, v, out, lse, cu_seqlens, max_seqlen, scale, rope) -> None
    backward: object  # (dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, scale, rope) -> None


# ---------------------------------------------------------------------------------------------
# Backends. host: the caller's PackedLayout or None (only the reference backend loops on the host).
# ---------------------------------------------------------------------------------------------
def _host_view(cu_seqlens, rope, host):
    """The reference's per-segment loop runs over host copies when the caller gave them (else the
    oracle reads the device tensors itself)."""
    if host is None:
        return cu_seqlens, rope
    if rope is not None and host.grids is not None:
        rope = rope._replace(grids=host.grids)
    return host.cu_seqlens, rope


def _reference_forward(q, k, v, out, lse, cu_seqlens, max_seqlen, scale, rope, host):
    cu, rope = _host_view(cu_seqlens, rope, host)
    ref_out, ref_lse = varlen_attention_reference(q, k, v, cu, softmax_scale=scale, rope=rope)
    out.copy_(ref_out)
    lse.copy_(ref_lse)


def _reference_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, scale, rope, host):
    """Softmax-attention backward written out per segment (fp32), then the adjoint rotation.
    Tests check it against torch autograd through varlen_attention_reference."""
    cu, rope = _host_view(cu_seqlens, rope, host)
    if rope is not None:
        q, k = apply_rope2d(q, k, rope.freqs, rope.grids, num_prefix_tokens=rope.num_prefix_tokens,
                            cu_seqlens=cu, coord_transform=rope.coord_transform)
    cu = host_ints(cu)
    f32 = torch.float32
    dq_rot = torch.zeros(q.shape, dtype=f32, device=q.device)
    dk_rot = torch.zeros(k.shape, dtype=f32, device=q.device)
    for start, end in zip(cu[:-1], cu[1:]):
        if end == start:
            continue
        qs, ks, vs, dos, os_ = (x[start:end].transpose(0, 1).to(f32) for x in (q, k, v, dout, out))
        p = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)          # [H, L, L]
        dp = dos @ vs.transpose(1, 2)
        ds = p * (dp - (dos * os_).sum(-1, keepdim=True))
        dq_rot[start:end] = (ds @ ks * scale).transpose(0, 1)
        dk_rot[start:end] = (ds.transpose(1, 2) @ qs * scale).transpose(0, 1)
        dv[start:end] = (p.transpose(1, 2) @ dos).transpose(0, 1)
    if rope is not None:  # the rotation is orthogonal: its adjoint rotates by -angle
        dq_rot, dk_rot = apply_rope2d(dq_rot, dk_rot, rope.freqs, rope.grids,
                                      num_prefix_tokens=rope.num_prefix_tokens, cu_seqlens=cu,
                                      coord_transform=rope.coord_transform, inverse=True)
    dq.copy_(dq_rot)
    dk.copy_(dk_rot)


def _triton_forward(q, k, v, out, lse, cu_seqlens, max_seqlen, scale, rope, host):
    from dinofast.kernels.varlen_attention import forward

    forward(q, k, v, out, lse, cu_seqlens, max_seqlen, scale, rope)


def _triton_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, scale, rope, host):
    from dinofast.kernels.varlen_attention import backward

    backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, scale, rope)


def _C_rope(rope):
    if rope is None:
        return None, None, None, 0
    return rope.freqs, rope.grids, rope.coord_transform, rope.num_prefix_tokens


def _C_forward(q, k, v, out, lse, cu_seqlens, max_seqlen, scale, rope, host):
    # One schema, two kernels: the dispatcher picks csrc/varlen_attention_cpu.cpp or _cuda.cu by device.
    torch.ops.dinofast_C.varlen_attention_fwd(q, k, v, out, lse, cu_seqlens, max_seqlen, scale, *_C_rope(rope))


def _C_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, scale, rope, host):
    torch.ops.dinofast_C.varlen_attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen,
                                              scale, *_C_rope(rope))


IMPLS = {
    "reference": Impl(_reference_forward, _reference_backward),
    "triton": Impl(_triton_forward, _triton_backward),
    "cpp": Impl(_C_forward, _C_backward),
    "cuda": Impl(_C_forward, _C_backward),
}


def _rope_args(inv_freq, grids, coord_transform, num_prefix_tokens) -> Optional[RopeArgs]:
    return None if inv_freq is None else RopeArgs(inv_freq, grids, coord_transform, num_prefix_tokens)


def _forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale, inv_freq, grids, coord_transform,
             num_prefix_tokens, host) -> Tuple[Tensor, Tensor]:
    """The forward on real tensors (eager, or inside the registered op). Never reads device
    metadata unless the debug switch is on."""
    if _debug.enabled():
        _debug.check_device_metadata(cu_seqlens, grids, q.shape[0], num_prefix_tokens, host, max_seqlen)
    T, H, _ = q.shape
    out = empty_output(q)
    lse = empty_output(q if q.dtype == torch.float32 else q.new_empty(0, dtype=torch.float32), (H, T))
    impl = dispatch(IMPLS, q.device, "varlen_attention")
    if T > 0 and H > 0:
        impl.forward(q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale,
                     _rope_args(inv_freq, grids, coord_transform, num_prefix_tokens), host)
    return out, lse


# ---------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with fake and autograd kernels. Host
# metadata crosses the schema as int lists (host_cu_seqlens [n+1], host_grids [2n]) or None.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("dinofast::varlen_attention_fwd", mutates_args=())
def _fwd_op(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, softmax_scale: float,
    inv_freq: Optional[Tensor], grids: Optional[Tensor], coord_transform: Optional[Tensor],
    num_prefix_tokens: int, host_cu_seqlens: Optional[List[int]], host_grids: Optional[List[int]],
) -> Tuple[Tensor, Tensor]:
    """(out [T, H, D] in q's dtype, lse float32 [H, T]: log-sum-exp of each row's scaled scores)."""
    return _forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale, inv_freq, grids, coord_transform,
                    num_prefix_tokens, unflatten_layout(host_cu_seqlens, host_grids, num_prefix_tokens))


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, softmax_scale, inv_freq, grids, coord_transform, num_prefix_tokens,
      host_cu_seqlens, host_grids):
    T, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((H, T), dtype=torch.float32)


@torch.library.custom_op("dinofast::varlen_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
    max_seqlen: int, softmax_scale: float, inv_freq: Optional[Tensor], grids: Optional[Tensor],
    coord_transform: Optional[Tensor], num_prefix_tokens: int, host_cu_seqlens: Optional[List[int]],
    host_grids: Optional[List[int]],
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), each like q/k/v; through the rotation when inv_freq is given."""
    host = unflatten_layout(host_cu_seqlens, host_grids, num_prefix_tokens)
    dq, dk, dv = empty_output(q), empty_output(k), empty_output(v)
    impl = dispatch(IMPLS, q.device, "varlen_attention")
    if q.shape[0] > 0 and q.shape[1] > 0:
        impl.backward(grad_out, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, softmax_scale,
                      _rope_args(inv_freq, grids, coord_transform, num_prefix_tokens), host)
    return dq, dk, dv


@_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, inv_freq, grids,
      coord_transform, num_prefix_tokens, host_cu_seqlens, host_grids):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, inv_freq, grids, coord_transform, P, host_cu, host_grids = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, inv_freq, grids, coord_transform)
    ctx.args = (max_seqlen, scale, P, host_cu, host_grids)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens, inv_freq, grids, coord_transform = ctx.saved_tensors
    max_seqlen, scale, P, host_cu, host_grids = ctx.args
    dq, dk, dv = _bwd_op(V.unit_last_stride(grad_out), q, k, v, out, lse, cu_seqlens, max_seqlen, scale,
                         inv_freq, grids, coord_transform, P, host_cu, host_grids)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------
class _Args(NamedTuple):
    """What _prepare hands the op: the schema's arguments, plus the layout object for direct calls."""

    q: Tensor
    k: Tensor
    v: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    softmax_scale: float
    freqs: Optional[Tensor]
    grids: Optional[Tensor]
    coord_transform: Optional[Tensor]
    num_prefix_tokens: int
    layout: Optional[PackedLayout]


def _attention(a: _Args) -> Tuple[Tensor, Tensor]:
    """(out, lse): directly when no dispatcher is needed, else through the registered op."""
    if direct_call_ok(a.q, a.k, a.v, a.coord_transform):
        return _forward(*a)
    host_cu, host_grids = flatten_layout(a.layout)
    return _fwd_op(*a[:-1], host_cu, host_grids if a.freqs is not None else None)


def _prepare(q, k, v, cu_seqlens, max_seqlen, softmax_scale, rope, layout) -> _Args:
    """Shape/dtype/device checks and host-layout checks (no device read; safe under torch.compile
    tracing) and the op's arguments."""
    V.check_tensor(q, "q", ndim=3, dtypes=DTYPES)
    V.check_tensor(k, "k")
    V.check_tensor(v, "v")
    V.check_same(q, "q", k, "k")
    V.check_same(q, "q", v, "v")
    D = q.shape[-1]
    V.check_head_dim(D, "q.shape[-1] (head dim)", multiple=HEAD_DIM_MULTIPLE, maximum=MAX_HEAD_DIM)
    n = V.check_cu_seqlens(cu_seqlens, q.device)
    V.check_nonneg_int(max_seqlen, "max_seqlen")
    if softmax_scale is None:
        softmax_scale = D ** -0.5
    V.check_softmax_scale(softmax_scale)
    freqs = grids = coord_transform = None
    P = 0
    if rope is not None:
        if not isinstance(rope, RopeSpec):
            V.fail("rope", "a dinofast.RopeSpec or None", type(rope).__name__)
        V.check_nonneg_int(rope.num_prefix_tokens, "rope.num_prefix_tokens")
        P = rope.num_prefix_tokens
        grids, layout, _ = packed_grids(rope.grids, layout, cu_seqlens, q.shape[0], "q.shape[0] (T)", P, q.device,
                                        grids_arg="rope.grids", prefix_arg="rope.num_prefix_tokens", n=n)
        grids = V.contiguous(grids)
        V.check_finite(rope.theta, "rope.theta")
        coord_transform = V.check_coord_transform(rope.coord_transform, n, q.device, "rope.coord_transform")
        freqs = rope_inv_freq(D, rope.theta, rope.periods, q.device, "rope.periods")
    else:
        check_layout(layout, cu_seqlens, q.shape[0], "q.shape[0] (T)")
    if layout is not None:
        V.check_max_seqlen(max_seqlen, layout.max_seqlen, ", from layout")
    return _Args(V.unit_last_stride(q), V.unit_last_stride(k), V.unit_last_stride(v),
                 V.contiguous(cu_seqlens), max_seqlen, float(softmax_scale),
                 freqs, grids, coord_transform, P, layout)


def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *,
    softmax_scale: Optional[float] = None, rope: Optional[RopeSpec] = None, layout: Optional[PackedLayout] = None,
) -> Tensor:
    """Block-diagonal (varlen) non-causal self-attention over a packed sequence. Differentiable.

    q, k, v: [T, H, D] (any T/H strides), fp32 everywhere, fp16/bf16 (on GPU, and accepted on CPU);
             D a multiple of 8 up to 256 (DINOv3: 64, 7B: 128).
    cu_seqlens: int32 [n+1]; segment i is tokens cu_seqlens[i]:cu_seqlens[i+1] and attends only to itself.
    max_seqlen: an upper bound on the segment lengths (sizes the launch grid), a Python int.
    layout: optional dinofast.PackedLayout, the host copy of cu_seqlens (and grids), e.g.
          `pack(...).layout`: checked against the tensors' shapes and against max_seqlen on the host.
          The device values of cu_seqlens/grids are never read back (no host sync) unless
          dinofast.debug_checks() / DINOFAST_DEBUG_CHECKS=1 is on; the C++/CUDA kernels check what
          they can. rope.grids given as a host list is a layout too.
    softmax_scale: default D**-0.5.
    rope: dinofast.RopeSpec(grids int32 [n, 2] or list of (Hp, Wp), num_prefix_tokens, theta, periods,
          coord_transform): q and k are rotated by DINOv3's 2D RoPE; equal to dinofast.rope2d
          followed by attention.
    Returns [T, H, D] in q's dtype. Softmax statistics in fp32; the fp32 log-sum-exp [H, T] is saved
    for the backward.
    """
    out, _ = _attention(_prepare(q, k, v, cu_seqlens, max_seqlen, softmax_scale, rope, layout))
    return out


def varlen_attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *,
    softmax_scale: Optional[float] = None, rope: Optional[RopeSpec] = None, layout: Optional[PackedLayout] = None,
) -> Tuple[Tensor, Tensor]:
    """varlen_attention that also returns the float32 [H, T] log-sum-exp (not differentiable)."""
    return _attention(_prepare(q, k, v, cu_seqlens, max_seqlen, softmax_scale, rope, layout))


def flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
    window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None, deterministic: bool = False,
    return_attn_probs: bool = False, block_table=None,
) -> Tensor:
    """flash_attn.flash_attn_varlen_func for packed self-attention: same arguments, same [T, H, D]
    result. Raises NotImplementedError for what dinofast does not do (dropout, causal, windows,
    softcap, ALiBi, attention probabilities, paged KV, different q/k lengths or head counts).
    max_seqlen_q and max_seqlen_k are upper bounds on the same segments: the larger one is used.
    cu_seqlens_k is taken to hold cu_seqlens_q's values (checked only under dinofast.debug_checks():
    comparing them is a device read)."""
    V.check_tensor(q, "q")
    V.check_tensor(k, "k")
    V.check_tensor(v, "v")
    V.check_tensor(cu_seqlens_q, "cu_seqlens_q")
    V.check_tensor(cu_seqlens_k, "cu_seqlens_k")
    V.check_nonneg_int(max_seqlen_q, "max_seqlen_q")
    V.check_nonneg_int(max_seqlen_k, "max_seqlen_k")
    if (dropout_p == 0.0 and not causal and softcap == 0.0 and alibi_slopes is None and not return_attn_probs
            and block_table is None and window_size in ((-1, -1), [-1, -1]) and (
                cu_seqlens_k is cu_seqlens_q or cu_seqlens_k.shape == cu_seqlens_q.shape)
            and k.shape == q.shape and v.shape == q.shape):
        asked = []  # the common drop-in call: nothing to name
    else:
        asked = _unsupported_flash_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                        causal, window_size, softcap, alibi_slopes, return_attn_probs, block_table)
    if asked:
        raise NotImplementedError(
            "dinofast.flash_attn_varlen_func does non-causal self-attention without dropout only; "
            f"not supported: {', '.join(asked)}")
    # Equal values of two cu_seqlens tensors can only be seen by reading them: under the debug switch.
    if cu_seqlens_k is not cu_seqlens_q and _debug.enabled() and not _debug.same_values(cu_seqlens_q, cu_seqlens_k):
        raise NotImplementedError("dinofast.flash_attn_varlen_func does self-attention only; not supported: "
                                  "different q and k lengths (cross-attention): cu_seqlens_k != cu_seqlens_q")
    return varlen_attention(q, k, v, cu_seqlens_q, max(max_seqlen_q, max_seqlen_k), softmax_scale=softmax_scale)


def _unsupported_flash_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal,
                            window_size, softcap, alibi_slopes, return_attn_probs, block_table) -> List[str]:
    """The names of the flash-attn features a call asks for that dinofast does not do."""
    unsupported = {
        "dropout_p > 0": dropout_p != 0.0, "causal=True": bool(causal),
        "window_size": tuple(window_size) != (-1, -1), "softcap": softcap != 0.0,
        "alibi_slopes": alibi_slopes is not None, "return_attn_probs": bool(return_attn_probs),
        "block_table (paged KV)": block_table is not None,
        "k/v heads different from q heads (MQA/GQA)": k.shape[1:] != q.shape[1:] or v.shape[1:] != q.shape[1:],
        "different q and k lengths (cross-attention)": (
            k.shape[0] != q.shape[0]
            or (cu_seqlens_k is not cu_seqlens_q and cu_seqlens_k.shape != cu_seqlens_q.shape)),
    }
    return [name for name, bad in unsupported.items() if bad]
