"""varlen_attention: packed block-diagonal self-attention with optionally fused 2D RoPE
(registration, backend dispatch, autograd, functional API, flash-attn drop-in).

Backends (one implementation each, same semantics):
  reference  dinofast/reference/varlen_attention.py   triton  kernels/varlen_attention.py
  cpp        csrc/varlen_attention_cpu.cpp             cuda    csrc/varlen_attention_cuda.cpp
Every backend receives q, k, v, out as [T, H, D] views with unit stride on D (any T/H strides),
cu_seqlens int32 [n+1] on their device, lse as contiguous float32 [H, T], and `rope`: None or a
RopeArgs whose rotation it applies to q and k (the cuda backend into rotated scratch copies, which
it hands to ATen's flash / memory-efficient attention; the others as they load q and k).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from dinofast import _validate as V
from dinofast._backend import dispatch, empty_output
from dinofast.ops.rope2d import RopeSpec, rope_inv_freq
from dinofast.reference.rope2d import apply_rope2d
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
# Backends
# ---------------------------------------------------------------------------------------------
def _reference_forward(q, k, v, out, lse, cu_seqlens, max_seqlen, scale, rope):
    o, l = varlen_attention_reference(q, k, v, cu_seqlens, softmax_scale=scale, rope=rope)
    out.copy_(o)
    lse.copy_(l)


def _reference_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, scale, rope):
    """Softmax-attention backward written out per segment (fp32), then the adjoint rotation.
    Tests check it against torch autograd through varlen_attention_reference."""
    if rope is not None:
        q, k = apply_rope2d(q, k, rope.freqs, rope.grids, num_prefix_tokens=rope.num_prefix_tokens,
                            cu_seqlens=cu_seqlens, coord_transform=rope.coord_transform)
    cu = cu_seqlens.tolist()
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
                                      num_prefix_tokens=rope.num_prefix_tokens, cu_seqlens=cu_seqlens,
                                      coord_transform=rope.coord_transform, inverse=True)
    dq.copy_(dq_rot)
    dk.copy_(dk_rot)


def _triton_forward(q, k, v, out, lse, cu_seqlens, max_seqlen, scale, rope):
    from dinofast.kernels.varlen_attention import forward

    forward(q, k, v, out, lse, cu_seqlens, max_seqlen, scale, rope)


def _triton_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, scale, rope):
    from dinofast.kernels.varlen_attention import backward

    backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, scale, rope)


def _C_rope(rope):
    if rope is None:
        return None, None, None, 0
    return rope.freqs, rope.grids, rope.coord_transform, rope.num_prefix_tokens


def _C_forward(q, k, v, out, lse, cu_seqlens, max_seqlen, scale, rope):
    # One schema, two kernels: the dispatcher picks csrc/varlen_attention_cpu.cpp or _cuda.cu by device.
    torch.ops.dinofast_C.varlen_attention_fwd(q, k, v, out, lse, cu_seqlens, max_seqlen, scale, *_C_rope(rope))


def _C_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, scale, rope):
    torch.ops.dinofast_C.varlen_attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen,
                                              scale, *_C_rope(rope))


IMPLS = {
    "reference": Impl(_reference_forward, _reference_backward),
    "triton": Impl(_triton_forward, _triton_backward),
    "cpp": Impl(_C_forward, _C_backward),
    "cuda": Impl(_C_forward, _C_backward),
}


def _checked_rope(q, cu_seqlens, inv_freq, grids, coord_transform, num_prefix_tokens) -> Optional[RopeArgs]:
    """Value checks that need real tensors (a host sync on CUDA): they live inside the ops."""
    T = q.shape[0]
    if inv_freq is None:
        V.read_cu_seqlens(cu_seqlens, T)
        return None
    V.read_packed(cu_seqlens, grids, T, num_prefix_tokens)
    return RopeArgs(inv_freq, grids, coord_transform, num_prefix_tokens)


def _check_max_seqlen(cu_seqlens: Tensor, max_seqlen: int) -> None:
    longest = V.max_len(cu_seqlens.tolist())
    if max_seqlen < longest:
        V.fail("max_seqlen", f">= the longest segment ({longest} tokens)", max_seqlen)


# ---------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with fake and autograd kernels.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("dinofast::varlen_attention_fwd", mutates_args=())
def _fwd_op(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, softmax_scale: float,
    inv_freq: Optional[Tensor], grids: Optional[Tensor], coord_transform: Optional[Tensor],
    num_prefix_tokens: int,
) -> Tuple[Tensor, Tensor]:
    """(out [T, H, D] in q's dtype, lse float32 [H, T]: log-sum-exp of each row's scaled scores)."""
    rope = _checked_rope(q, cu_seqlens, inv_freq, grids, coord_transform, num_prefix_tokens)
    _check_max_seqlen(cu_seqlens, max_seqlen)
    T, H, _ = q.shape
    out = empty_output(q)
    lse = empty_output(q.new_empty(0, dtype=torch.float32), (H, T))
    impl = dispatch(IMPLS, q.device, "varlen_attention")
    if T > 0 and H > 0:
        impl.forward(q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, rope)
    return out, lse


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, softmax_scale, inv_freq, grids, coord_transform, num_prefix_tokens):
    T, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((H, T), dtype=torch.float32)


@torch.library.custom_op("dinofast::varlen_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
    max_seqlen: int, softmax_scale: float, inv_freq: Optional[Tensor], grids: Optional[Tensor],
    coord_transform: Optional[Tensor], num_prefix_tokens: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), each like q/k/v; through the rotation when inv_freq is given."""
    rope = None if inv_freq is None else RopeArgs(inv_freq, grids, coord_transform, num_prefix_tokens)
    dq, dk, dv = empty_output(q), empty_output(k), empty_output(v)
    impl = dispatch(IMPLS, q.device, "varlen_attention")
    if q.shape[0] > 0 and q.shape[1] > 0:
        impl.backward(grad_out, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, softmax_scale, rope)
    return dq, dk, dv


@_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, inv_freq, grids,
      coord_transform, num_prefix_tokens):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, inv_freq, grids, coord_transform, P = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, inv_freq, grids, coord_transform)
    ctx.max_seqlen, ctx.scale, ctx.P = max_seqlen, scale, P
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens, inv_freq, grids, coord_transform = ctx.saved_tensors
    dq, dk, dv = _bwd_op(_unit_stride(grad_out), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale,
                         inv_freq, grids, coord_transform, ctx.P)
    return dq, dk, dv, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------
def _unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _prepare(q, k, v, cu_seqlens, max_seqlen, softmax_scale, rope):
    """Shape/dtype/device checks (safe under torch.compile tracing) and the op's arguments."""
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
    V.check_finite(softmax_scale, "softmax_scale")
    freqs = grids = coord_transform = None
    P = 0
    if rope is not None:
        if not isinstance(rope, RopeSpec):
            V.fail("rope", "a dinofast.RopeSpec or None", type(rope).__name__)
        grids = rope.grids
        if not isinstance(grids, Tensor):  # a list of (Hp, Wp) pairs
            grids = torch.tensor([V.check_grid(g) for g in grids], dtype=torch.int32, device=q.device)
        V.check_packed_meta(cu_seqlens, grids, q.shape[0], q.device)
        V.check_nonneg_int(rope.num_prefix_tokens, "rope.num_prefix_tokens")
        V.check_finite(rope.theta, "rope.theta")
        if rope.periods is not None:
            V.check_tensor(rope.periods, "rope.periods", ndim=1)
            if rope.periods.numel() != D // 4:
                V.fail("rope.periods", f"[head_dim/4] = [{D // 4}]", f"shape {tuple(rope.periods.shape)}")
        coord_transform = rope.coord_transform
        if coord_transform is not None:
            V.check_tensor(coord_transform, "rope.coord_transform")
            if coord_transform.numel() not in (4, 4 * n) or coord_transform.shape[-1] != 4:
                V.fail("rope.coord_transform", f"[4] or [{n}, 4] (shift_y, shift_x, scale_y, scale_x)",
                       f"shape {tuple(coord_transform.shape)}")
            coord_transform = coord_transform.to(device=q.device, dtype=torch.float32).contiguous()
        freqs = rope_inv_freq(D, rope.theta, rope.periods, q.device)
        P = rope.num_prefix_tokens
    return (_unit_stride(q), _unit_stride(k), _unit_stride(v), cu_seqlens, max_seqlen, float(softmax_scale),
            freqs, grids, coord_transform, P)


def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *,
    softmax_scale: Optional[float] = None, rope: Optional[RopeSpec] = None,
) -> Tensor:
    """Block-diagonal (varlen) non-causal self-attention over a packed sequence. Differentiable.

    q, k, v: [T, H, D] (any T/H strides), fp32 everywhere, fp16/bf16 (on GPU, and accepted on CPU);
             D a multiple of 8 up to 256 (DINOv3: 64, 7B: 128).
    cu_seqlens: int32 [n+1]; segment i is tokens cu_seqlens[i]:cu_seqlens[i+1] and attends only to itself.
    max_seqlen: an upper bound on the segment lengths (sizes the launch grid).
    softmax_scale: default D**-0.5.
    rope: dinofast.RopeSpec(grids int32 [n, 2] or list of (Hp, Wp), num_prefix_tokens, theta, periods,
          coord_transform): q and k are rotated by DINOv3's 2D RoPE as they are loaded; equal to
          dinofast.rope2d followed by attention, with no rotated copy in memory.
    Returns [T, H, D] in q's dtype. Softmax statistics in fp32; the fp32 log-sum-exp [H, T] is saved
    for the backward.
    """
    out, _ = _fwd_op(*_prepare(q, k, v, cu_seqlens, max_seqlen, softmax_scale, rope))
    return out


def varlen_attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *,
    softmax_scale: Optional[float] = None, rope: Optional[RopeSpec] = None,
) -> Tuple[Tensor, Tensor]:
    """varlen_attention that also returns the float32 [H, T] log-sum-exp (not differentiable)."""
    return _fwd_op(*_prepare(q, k, v, cu_seqlens, max_seqlen, softmax_scale, rope))


def flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
    window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None, deterministic: bool = False,
    return_attn_probs: bool = False, block_table=None,
) -> Tensor:
    """flash_attn.flash_attn_varlen_func for packed self-attention: same arguments, same [T, H, D]
    result. Raises NotImplementedError for what dinofast does not do (dropout, causal, windows,
    softcap, ALiBi, attention probabilities, paged KV, different q/k lengths or head counts)."""
    unsupported = {
        "dropout_p > 0": dropout_p != 0.0, "causal=True": bool(causal),
        "window_size": tuple(window_size) != (-1, -1), "softcap": softcap != 0.0,
        "alibi_slopes": alibi_slopes is not None, "return_attn_probs": bool(return_attn_probs),
        "block_table (paged KV)": block_table is not None,
        "k/v heads different from q heads (MQA/GQA)": k.shape[1:] != q.shape[1:] or v.shape[1:] != q.shape[1:],
        "different q and k lengths (cross-attention)": (
            k.shape[0] != q.shape[0] or max_seqlen_q != max_seqlen_k
            or (cu_seqlens_k is not cu_seqlens_q and (cu_seqlens_k.shape != cu_seqlens_q.shape
                                                    or not torch.equal(cu_seqlens_k, cu_seqlens_q)))),
    }
    asked = [name for name, bad in unsupported.items() if bad]
    if asked:
        raise NotImplementedError(
            "dinofast.flash_attn_varlen_func does non-causal self-attention without dropout only; "
            f"not supported: {', '.join(asked)}")
    return varlen_attention(q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale=softmax_scale)
