"""pixel_shuffle_project: fused pixel shuffle + projection (nanoVLM's modality projector) for
rectangular grids and packed images (registration, backend dispatch, autograd, functional API).

Backends (one implementation each, same semantics):
  reference  dinofast/reference/pixel_shuffle_project.py   triton  kernels/pixel_shuffle_project.py
  cpp        csrc/pixel_shuffle_project_cpu.cpp             cuda    csrc/pixel_shuffle_project_cuda.cu
All of them receive x as a 3-D [B, N, D] view (packed [T, D] as [1, T, D]) with unit stride on D,
write y into a preallocated [M, out] buffer, and never build the whole shuffled tensor (the
reference does: it is the oracle).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from dinofast import _debug
from dinofast import _validate as V
from dinofast._backend import dispatch, empty_output
from dinofast._layout import PackedLayout, flatten_layout, int32_on, packed_grids, unflatten_layout
from dinofast.ops._eager import direct_call_ok
from dinofast.reference.pixel_shuffle_project import pixel_shuffle, pixel_unshuffle
from dinofast.reference.rope2d import host_ints


def shuffled_grid(Hp: int, Wp: int, factor: int) -> Tuple[int, int]:
    """(Gh, Gw) = (Hp/factor, Wp/factor): the token grid after a pixel shuffle of a (Hp, Wp) patch
    grid. Raises ValueError when a side is not divisible by factor."""
    V.check_positive_int(factor, "factor")
    Hp, Wp = V.check_grid((Hp, Wp))
    check_divisible_grid(Hp, Wp, factor)
    return Hp // factor, Wp // factor


def check_divisible_grid(Hp: int, Wp: int, factor: int, image: str = "") -> None:
    if Hp % factor or Wp % factor:
        V.fail("grids", f"(Hp, Wp){image} both divisible by factor {factor}", (Hp, Wp))


# ---------------------------------------------------------------------------------------------
# Backends. forward(x, weight, bias, y, meta) writes y [M, out]; backward(grad_y, x, weight,
# grad_x, grad_weight, grad_bias, meta) writes each grad that is not None. x / grad_x: [B, N, D].
# ---------------------------------------------------------------------------------------------
class Meta(NamedTuple):
    """Geometry every backend receives. packed: cu_seqlens/grids/out_cu_seqlens are int32 tensors on
    x's device and `host` the caller's PackedLayout or None; batched: hw."""

    cu_seqlens: Optional[Tensor]
    grids: Optional[Tensor]
    out_cu_seqlens: Optional[Tensor]
    hw: Tuple[int, int]
    factor: int
    num_prefix_tokens: int
    host: Optional[PackedLayout]


def _reference_images(meta: Meta) -> list:
    """[(token start, Hp, Wp, row start)] per image, from the host layout when the caller gave one
    (else the oracle reads the device tensors)."""
    host = meta.host
    cu = host_ints(meta.cu_seqlens if host is None else host.cu_seqlens)
    hw = host_ints(meta.grids if host is None or host.grids is None else host.grids)
    images, rows = [], 0
    for t0, (hp, wp) in zip(cu, hw):
        images.append((t0, hp, wp, rows))
        rows += (hp // meta.factor) * (wp // meta.factor)
    return images


def _reference_shuffled(x: Tensor, meta: Meta) -> Tensor:
    """The whole shuffled matrix [M, D*s*s] (the reference may build it: it is the oracle)."""
    s, P = meta.factor, meta.num_prefix_tokens
    if meta.cu_seqlens is None:
        return pixel_shuffle(x, *meta.hw, s, P).flatten(0, 1)
    return torch.cat([pixel_shuffle(x[:, t0:t0 + P + hp * wp], hp, wp, s, P)[0]
                      for t0, hp, wp, _ in _reference_images(meta)])


def _wide(*ts):
    """fp16/bf16 -> fp32 (fp32/fp64 unchanged): the reference backend accumulates in fp32 and
    rounds once, as the kernels do."""
    return [t.to(torch.promote_types(t.dtype, torch.float32)) if t is not None else None for t in ts]


def _reference_forward(x, weight, bias, y, meta: Meta) -> None:
    x, weight, bias = _wide(x, weight, bias)
    out = _reference_shuffled(x, meta) @ weight.t()
    y.copy_(out + bias if bias is not None else out)


def _reference_backward(grad_y, x, weight, grad_x, grad_weight, grad_bias, meta: Meta) -> None:
    s, P = meta.factor, meta.num_prefix_tokens
    grad_y, x, weight = _wide(grad_y, x, weight)
    if grad_bias is not None:
        grad_bias.copy_(grad_y.sum(0))
    if grad_weight is not None:
        grad_weight.copy_(grad_y.t() @ _reference_shuffled(x, meta))
    if grad_x is not None:
        grad_a = grad_y @ weight  # [M, D*s*s], un-shuffled back onto the patch rows
        if meta.cu_seqlens is None:
            grad_x[:, :P] = 0
            grad_x[:, P:] = pixel_unshuffle(grad_a.view(x.shape[0], -1, grad_a.shape[1]), *meta.hw, s)
        else:
            for t0, hp, wp, m0 in _reference_images(meta):
                g = (hp // s) * (wp // s)
                grad_x[0, t0:t0 + P] = 0
                grad_x[0, t0 + P:t0 + P + hp * wp] = pixel_unshuffle(grad_a[None, m0:m0 + g], hp, wp, s)[0]


def _triton_forward(x, weight, bias, y, meta: Meta) -> None:
    from dinofast.kernels.pixel_shuffle_project import forward

    forward(x, weight, bias, y, meta.cu_seqlens, meta.grids, meta.out_cu_seqlens, meta.hw, meta.factor,
            meta.num_prefix_tokens)


def _triton_backward(grad_y, x, weight, grad_x, grad_weight, grad_bias, meta: Meta) -> None:
    from dinofast.kernels.pixel_shuffle_project import backward

    backward(grad_y, x, weight, grad_x, grad_weight, grad_bias, meta.cu_seqlens, meta.grids,
             meta.out_cu_seqlens, meta.hw, meta.factor, meta.num_prefix_tokens)


# One schema each, two kernels: torch's dispatcher picks csrc/*.cpp or csrc/*.cu by device.
def _C_forward(x, weight, bias, y, meta: Meta) -> None:
    torch.ops.dinofast_C.pixel_shuffle_project(x, weight, bias, y, meta.cu_seqlens, meta.grids,
                                               meta.out_cu_seqlens, *meta.hw, meta.factor, meta.num_prefix_tokens)


def _C_backward(grad_y, x, weight, grad_x, grad_weight, grad_bias, meta: Meta) -> None:
    torch.ops.dinofast_C.pixel_shuffle_project_backward(
        grad_y, x, weight, grad_x, grad_weight, grad_bias, meta.cu_seqlens, meta.grids, meta.out_cu_seqlens,
        *meta.hw, meta.factor, meta.num_prefix_tokens)


class Impl(NamedTuple):
    forward: callable
    backward: callable


IMPLS = {
    "reference": Impl(_reference_forward, _reference_backward),
    "triton": Impl(_triton_forward, _triton_backward),
    "cpp": Impl(_C_forward, _C_backward),
    "cuda": Impl(_C_forward, _C_backward),
}


def packed_rows(x: Tensor, cu_seqlens: Tensor, factor: int, num_prefix_tokens: int):
    """Output rows M of a packed call from shapes alone: every image holds P + Hp*Wp tokens with
    factor | Hp, Wp, so M = sum Gh*Gw = (T - n*P) / factor^2 (no device read)."""
    n = cu_seqlens.shape[0] - 1
    patches = x.shape[0] - n * num_prefix_tokens
    return patches // (factor * factor), patches


def _meta(x, cu_seqlens, grids, out_cu_seqlens, hp, wp, factor, P, host) -> Tuple[Meta, int]:
    """The backends' Meta and the number of output rows M (under the debug switch, the packed
    metadata values are read back and checked here)."""
    if cu_seqlens is None:
        return Meta(None, None, None, (hp, wp), factor, P, None), x.shape[0] * (hp // factor) * (wp // factor)
    if _debug.enabled():
        _debug.check_device_metadata(cu_seqlens, grids, x.shape[0], P, host)
        _, hw = _debug.read_device_metadata(cu_seqlens, grids)
        check_divisible(hw, factor)
        want = [0]
        for h, w in hw:
            want.append(want[-1] + (h // factor) * (w // factor))
        got = _debug.read_device_ints(out_cu_seqlens)
        if got != want:
            V.fail("out_cu_seqlens", f"{want} (cumulated Gh*Gw)", got)
    return Meta(cu_seqlens, grids, out_cu_seqlens, (0, 0), factor, P, host), packed_rows(x, cu_seqlens, factor, P)[0]


def check_divisible(hw, factor: int) -> None:
    for i, (h, w) in enumerate(hw):
        check_divisible_grid(h, w, factor, f" of image {i}")


def _x3(x: Tensor) -> Tensor:
    """The backends' [B, N, D] view of a public [B, N, D] / packed [T, D] tensor (no copy)."""
    return x.unsqueeze(0) if x.dim() == 2 else x


# ---------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with fake and autograd kernels.
# ---------------------------------------------------------------------------------------------
def _forward(x, weight, bias, cu_seqlens, grids, out_cu_seqlens, hp, wp, factor, num_prefix_tokens, host) -> Tensor:
    """The forward on real tensors (eager, or inside the registered op)."""
    meta, M = _meta(x, cu_seqlens, grids, out_cu_seqlens, hp, wp, factor, num_prefix_tokens, host)
    impl = dispatch(IMPLS, x.device, "pixel_shuffle_project")
    y = empty_output(x, (M, weight.shape[0]))
    if y.numel():
        impl.forward(_x3(x), weight, bias, y, meta)
    # explicit sizes: with B = 0 or out = 0 a -1 could not be inferred
    return y if cu_seqlens is not None else y.view(x.shape[0], (hp // factor) * (wp // factor), weight.shape[0])


@torch.library.custom_op("dinofast::pixel_shuffle_project", mutates_args=())
def _psp_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], cu_seqlens: Optional[Tensor], grids: Optional[Tensor],
    out_cu_seqlens: Optional[Tensor], hp: int, wp: int, factor: int, num_prefix_tokens: int,
    host_cu_seqlens: Optional[List[int]], host_grids: Optional[List[int]],
) -> Tensor:
    return _forward(x, weight, bias, cu_seqlens, grids, out_cu_seqlens, hp, wp, factor, num_prefix_tokens,
                    unflatten_layout(host_cu_seqlens, host_grids, num_prefix_tokens))


@_psp_op.register_fake
def _(x, weight, bias, cu_seqlens, grids, out_cu_seqlens, hp, wp, factor, num_prefix_tokens, host_cu_seqlens,
      host_grids):
    if cu_seqlens is None:
        return x.new_empty(x.shape[0], (hp // factor) * (wp // factor), weight.shape[0])
    return x.new_empty(packed_rows(x, cu_seqlens, factor, num_prefix_tokens)[0], weight.shape[0])


@torch.library.custom_op("dinofast::pixel_shuffle_project_backward", mutates_args=())
def _psp_backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor, cu_seqlens: Optional[Tensor], grids: Optional[Tensor],
    out_cu_seqlens: Optional[Tensor], hp: int, wp: int, factor: int, num_prefix_tokens: int,
    need_x: bool, need_weight: bool, need_bias: bool, host_cu_seqlens: Optional[List[int]],
    host_grids: Optional[List[int]],
) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias); those not needed come back as empty [0] tensors."""
    meta, _ = _meta(x, cu_seqlens, grids, out_cu_seqlens, hp, wp, factor, num_prefix_tokens,
                    unflatten_layout(host_cu_seqlens, host_grids, num_prefix_tokens))
    impl = dispatch(IMPLS, x.device, "pixel_shuffle_project")
    grad_x = empty_output(x, x.shape) if need_x else x.new_empty(0)
    grad_weight = empty_output(weight, weight.shape) if need_weight else x.new_empty(0)
    grad_bias = empty_output(weight, (weight.shape[0],)) if need_bias else x.new_empty(0)
    grad_y2 = grad_y.reshape(grad_y.shape[:-1].numel(), weight.shape[0])  # [M, out], also when M or out is 0
    if grad_y2.stride(-1) != 1 or not grad_y2.is_contiguous():
        grad_y2 = grad_y2.contiguous()
    if grad_y2.numel() == 0:  # no output element (B = 0, no rows, or out = 0): every gradient is zero
        for g in (grad_x, grad_weight, grad_bias):
            g.zero_()
        return grad_x, grad_weight, grad_bias
    impl.backward(grad_y2, _x3(x), weight, _x3(grad_x) if need_x else None,
                  grad_weight if need_weight else None, grad_bias if need_bias else None, meta)
    return grad_x, grad_weight, grad_bias


@_psp_backward_op.register_fake
def _(grad_y, x, weight, cu_seqlens, grids, out_cu_seqlens, hp, wp, factor, num_prefix_tokens,
      need_x, need_weight, need_bias, host_cu_seqlens, host_grids):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(weight) if need_weight else x.new_empty(0),
            weight.new_empty(weight.shape[0]) if need_bias else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, cu_seqlens, grids, out_cu_seqlens, hp, wp, factor, P, host_cu, host_grids = inputs
    ctx.save_for_backward(x, weight, cu_seqlens, grids, out_cu_seqlens)
    ctx.hp, ctx.wp, ctx.factor, ctx.P, ctx.has_bias = hp, wp, factor, P, bias is not None
    ctx.host = (host_cu, host_grids)


def _backward(ctx, grad_y):
    # dx: dA = grad_y @ W scattered back to the un-shuffled rows (prefix rows get zero);
    # dW = grad_y^T @ A (A gathered on the fly); db = grad_y.sum(0).
    x, weight, cu_seqlens, grids, out_cu_seqlens = ctx.saved_tensors
    need_x, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], (
        ctx.has_bias and ctx.needs_input_grad[2])
    grad_x, grad_weight, grad_bias = _psp_backward_op(
        grad_y, x, weight, cu_seqlens, grids, out_cu_seqlens, ctx.hp, ctx.wp, ctx.factor, ctx.P,
        need_x, need_weight, need_bias, *ctx.host)
    return (grad_x if need_x else None, grad_weight if need_weight else None, grad_bias if need_bias else None,
            None, None, None, None, None, None, None, None, None)


_psp_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------
def _out_cu_seqlens_on(hw: Tuple[Tuple[int, int], ...], factor: int, device: torch.device) -> Tensor:
    """int32 [n+1] cumulated Gh*Gw of host grids (checked divisible by factor), on `device`."""
    check_divisible(hw, factor)
    rows = [0]
    for hp, wp in hw:
        rows.append(rows[-1] + (hp // factor) * (wp // factor))
    return int32_on(rows, device)


def _prepare(x, weight, bias, grids, factor, num_prefix_tokens, cu_seqlens, layout) -> tuple:
    """Shape/dtype/device checks and host-layout checks (no device read; safe under torch.compile
    tracing) and the op's arguments (the last one: the layout)."""
    packed = cu_seqlens is not None
    V.check_tensor(x, "x", ndim=2 if packed else 3, dtypes=V.FLOAT_DTYPES)
    V.check_tensor(weight, "weight", ndim=2)
    V.check_same(x, "x", weight, "weight", shape=False)
    V.check_positive_int(factor, "factor")
    V.check_nonneg_int(num_prefix_tokens, "num_prefix_tokens")
    D, s, P = x.shape[-1], factor, num_prefix_tokens
    if D == 0:
        V.fail("x", "a non-empty feature dim D", f"shape {tuple(x.shape)}")
    if weight.shape[1] != D * s * s:
        V.fail("weight", f"[out, D*s*s] with in-features D*s*s = {D}*{s}*{s} = {D * s * s}",
               f"shape {tuple(weight.shape)}")
    if bias is not None:
        V.check_tensor(bias, "bias", ndim=1)
        V.check_same(weight, "weight", bias, "bias", shape=False)
        if bias.shape[0] != weight.shape[0]:
            V.fail("bias", f"[out] = [{weight.shape[0]}] (weight's out-features)", f"shape {tuple(bias.shape)}")
        bias = bias.contiguous()
    if packed:
        grids, layout, n = packed_grids(grids, layout, cu_seqlens, x.shape[0], "x.shape[0] (T)", P, x.device)
        cu_seqlens, grids = V.contiguous(cu_seqlens), V.contiguous(grids)
        hp = wp = 0
        if layout is not None and not torch.compiler.is_compiling():
            # checked and made once per layout; a clone, as it is returned to the caller
            out_cu_seqlens = layout.derived(("out_cu_seqlens", s, x.device),
                                            lambda: _out_cu_seqlens_on(layout.grids, s, x.device)).clone()
        else:  # rows per image: Gh*Gw from grids by tensor ops (traceable, no device read)
            if layout is not None:
                check_divisible(layout.grids, s)
            per_image = (grids[:, 0] // s) * (grids[:, 1] // s)
            out_cu_seqlens = torch.cat([per_image.new_zeros(1), per_image.cumsum(0)]).to(torch.int32)
        _, patches = packed_rows(x, cu_seqlens, s, P)
        if patches < 0 or patches % (s * s):
            V.fail("x", f"T - n*num_prefix_tokens = {x.shape[0]} - {n}*{P} patch tokens, a multiple of "
                   f"factor^2 = {s * s} (every Hp, Wp divisible by factor)", f"shape {tuple(x.shape)}")
    else:
        hp, wp = V.check_grid(grids)
        check_divisible_grid(hp, wp, s)
        if x.shape[1] != P + hp * wp:
            V.fail("x", f"N = num_prefix_tokens + Hp*Wp = {P} + {hp}*{wp} = {P + hp * wp} tokens "
                   "(x is [B, N, D])", x.shape[1])
        grids = out_cu_seqlens = layout = None
    return (V.unit_last_stride(x), weight.contiguous(), bias, cu_seqlens, grids, out_cu_seqlens, hp, wp, s, P, layout)


def pixel_shuffle_project(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, grids, factor: int,
    num_prefix_tokens: int = 0, cu_seqlens: Optional[Tensor] = None, layout: Optional[PackedLayout] = None,
):
    """Drop the prefix tokens, fold each factor x factor block of patch tokens into one token
    (pixel shuffle) and project it: y = shuffled(x) @ weight.T (+ bias). Differentiable in x,
    weight and bias; the shuffled tensor is never materialised.

    Batched: x [B, P + Hp*Wp, D], grids (Hp, Wp) -> y [B, Gh*Gw, out].
    Packed:  x [T, D], cu_seqlens int32 [n+1], grids int32 [n, 2] per-image (Hp, Wp) on x's device
             or a host list of (Hp, Wp) pairs -> (y [sum_i Gh_i*Gw_i, out], out_cu_seqlens int32 [n+1]).
             layout: optional dinofast.PackedLayout (host cu_seqlens/grids, e.g. `pack(...).layout`),
             checked against the tensors' shapes. The device values are never read back (no host
             sync) unless dinofast.debug_checks() / DINOFAST_DEBUG_CHECKS=1 is on.
    weight [out, D*s*s] (nanoVLM's `proj.weight` layout: column (dy*s + dx)*D + d), bias [out].
    s = factor divides every Hp and Wp; Gh = Hp/s, Gw = Wp/s (see dinofast.shuffled_grid).
    dtypes fp32, fp16, bf16 (fp64 too), all the same; accumulation in fp32.
    """
    args = _prepare(x, weight, bias, grids, factor, num_prefix_tokens, cu_seqlens, layout)
    if direct_call_ok(args[0], args[1], args[2]):
        y = _forward(*args)
    else:
        y = _psp_op(*args[:-1], *flatten_layout(args[-1]))
    return (y, args[5]) if cu_seqlens is not None else y
