"""2D RoPE in plain PyTorch: the oracle every backend is tested against.

Numerics (DINOv3's, as transformers' DINOv3ViTRopePositionEmbedding computes them):
  coordinates  y_i = 2*(i + 0.5)/Hp - 1,  x_j = 2*(j + 0.5)/Wp - 1   (true rectangular grid)
  augmentation y' = (y + shift_y) * scale_y, x' = (x + shift_x) * scale_x   (train mode only)
  angles       a = 2*pi*coord * inv_freq_k, channel layout [a_y | a_x | a_y | a_x] (D/4 each)
  rotation     out = x*cos(a) + rotate_half(x)*sin(a); prefix tokens untouched
All of it in fp32 (fp64 when the inputs are fp64), cast back to the input dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def inv_freq(head_dim: int, theta: float = 100.0, periods: Optional[torch.Tensor] = None,
             dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """[head_dim/4] inverse periods: 1/theta^(4k/D) exactly as transformers computes them, or 1/periods."""
    if periods is not None:
        return 1.0 / periods.to(device=device, dtype=dtype)
    return 1 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=dtype, device=device)


def patch_coords(Hp: int, Wp: int, coord_transform: Optional[torch.Tensor] = None,
                 dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """[Hp*Wp, 2] (y, x) patch-centre coordinates in [-1, 1], row-major over the grid."""
    ys = torch.arange(0.5, Hp, dtype=dtype, device=device) / Hp
    xs = torch.arange(0.5, Wp, dtype=dtype, device=device) / Wp
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0
    if coord_transform is not None:  # (shift_y, shift_x, scale_y, scale_x)
        t = coord_transform.to(dtype=dtype, device=device).reshape(4)
        coords = (coords + t[:2]) * t[2:]
    return coords


def rope_angles(Hp: int, Wp: int, inv_freq: torch.Tensor,
                coord_transform: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[Hp*Wp, D] angles in the [y | x | y | x] layout."""
    coords = patch_coords(Hp, Wp, coord_transform, dtype=inv_freq.dtype, device=inv_freq.device)
    half = (2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]).flatten(1, 2)  # [HW, D/2]
    return half.tile(2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, angles: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x [..., HW, D] rotated by angles [HW, D] (by -angles when inverse), in angles' dtype."""
    sin = -angles.sin() if inverse else angles.sin()
    xf = x.to(angles.dtype)
    return (xf * angles.cos() + rotate_half(xf) * sin).to(x.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def host_ints(x) -> list:
    """A host list of x: a tensor's values (read back; the oracle may), or a sequence as it is."""
    return x.tolist() if isinstance(x, torch.Tensor) else [tuple(v) if isinstance(v, (tuple, list)) else v
                                                           for v in x]


def _transform_for(coord_transform: Optional[torch.Tensor], i: int) -> Optional[torch.Tensor]:
    if coord_transform is None:
        return None
    return coord_transform.reshape(-1, 4)[i if coord_transform.numel() > 4 else 0]


def rope2d_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    grids,
    *,
    num_prefix_tokens: int,
    theta: float = 100.0,
    periods: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    coord_transform: Optional[torch.Tensor] = None,
    inverse: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k).

    Batched: q, k [B, H, N, D], grids (Hp, Wp), N = num_prefix_tokens + Hp*Wp,
             coord_transform [4] or [B, 4] (one row per image).
    Packed:  q, k [T, H, D], cu_seqlens int32 [n+1], grids int32 [n, 2], coord_transform [4] or [n, 4];
             cu_seqlens and grids may also be host sequences (n+1 ints, n (Hp, Wp) pairs).
    """
    freqs = inv_freq(q.shape[-1], theta, periods, dtype=_compute_dtype(q), device=q.device)
    return apply_rope2d(q, k, freqs, grids, num_prefix_tokens=num_prefix_tokens, cu_seqlens=cu_seqlens,
                        coord_transform=coord_transform, inverse=inverse)


def apply_rope2d(q, k, freqs: torch.Tensor, grids, *, num_prefix_tokens: int,
                 cu_seqlens: Optional[torch.Tensor] = None, coord_transform: Optional[torch.Tensor] = None,
                 inverse: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """rope2d_reference with the inverse frequencies [D/4] given (computed in their dtype)."""
    freqs = freqs.to(_compute_dtype(q))
    P = num_prefix_tokens
    outs = []
    for x in (q, k):
        out = x.clone()
        if cu_seqlens is None:
            Hp, Wp = (int(v) for v in grids)
            if coord_transform is None or coord_transform.numel() == 4:  # one angle table for the batch
                out[:, :, P:] = rotate(x[:, :, P:], rope_angles(Hp, Wp, freqs, coord_transform), inverse)
            else:
                for b in range(x.shape[0]):
                    ang = rope_angles(Hp, Wp, freqs, _transform_for(coord_transform, b))
                    out[b, :, P:] = rotate(x[b, :, P:], ang, inverse)
        else:
            cu = host_ints(cu_seqlens)
            for i, (Hp, Wp) in enumerate(host_ints(grids)):
                ang = rope_angles(Hp, Wp, freqs, _transform_for(coord_transform, i))
                start, end = cu[i] + P, cu[i + 1]
                # [HW, H, D] -> [H, HW, D] to rotate, and back
                out[start:end] = rotate(x[start:end].transpose(0, 1), ang, inverse).transpose(0, 1)
        outs.append(out)
    return outs[0], outs[1]


def sample_coord_transform(
    n: int = 1,
    *,
    shift: Optional[float] = None,
    jitter: Optional[float] = None,
    rescale: Optional[float] = None,
    device=None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """[n, 4] (shift_y, shift_x, scale_y, scale_x), drawn as DINOv3 train mode draws them:
    shift ~ U(-shift, shift) per axis, jitter = exp(U(-ln J, ln J)) per axis, rescale =
    exp(U(-ln R, ln R)) shared by both axes; scale = jitter * rescale. The draws happen in the same
    order as transformers' DINOv3ViTRopePositionEmbedding, so one seed gives the same numbers.
    shift >= 0, jitter >= 1 and rescale >= 1 (finite) or None."""
    from dinofast import _validate as V

    V.check_nonneg_int(n, "n")
    V.check_coord_param(shift, "shift", minimum=0.0)
    V.check_coord_param(jitter, "jitter", minimum=1.0)
    V.check_coord_param(rescale, "rescale", minimum=1.0)
    t = torch.zeros(n, 4, dtype=torch.float32, device=device)
    t[:, 2:] = 1.0
    for i in range(n):
        if shift is not None:
            t[i, :2] = torch.empty(2, device=device).uniform_(-shift, shift, generator=generator)
        if jitter is not None:
            r = math.log(jitter)
            t[i, 2:] *= torch.empty(2, device=device).uniform_(-r, r, generator=generator).exp()
        if rescale is not None:
            r = math.log(rescale)
            t[i, 2:] *= torch.empty(1, device=device).uniform_(-r, r, generator=generator).exp()
    return t
