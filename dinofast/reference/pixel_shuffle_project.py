"""Pixel shuffle + projection in plain PyTorch: the oracle every backend is tested against.

Index map (README, "Pixel shuffle + projection"), factor s, grid (Hp, Wp), Gh = Hp/s,
Gw = Wp/s, P prefix tokens dropped first:
    shuffled[b, I*Gw + J, (dy*s + dx)*D + d] = x[b, P + (I*s + dy)*Wp + (J*s + dx), d]
then y = shuffled @ weight.T (+ bias). Written as reshape/permute (nanoVLM's formula generalised to
rectangles) so that it reads like the spec; it materialises the shuffled tensor, the kernels do not.
"""
from __future__ import annotations

from typing import Optional

import torch


def pixel_shuffle(x: torch.Tensor, Hp: int, Wp: int, factor: int, num_prefix_tokens: int = 0) -> torch.Tensor:
    """x [B, P + Hp*Wp, D] -> [B, Gh*Gw, D*s*s] (the prefix is dropped)."""
    B, _, D = x.shape
    s = factor
    Gh, Gw = Hp // s, Wp // s
    patches = x[:, num_prefix_tokens:].reshape(B, Gh, s, Gw, s, D)  # [B, I, dy, J, dx, d]
    return patches.permute(0, 1, 3, 2, 4, 5).reshape(B, Gh * Gw, s * s * D)


def pixel_unshuffle(shuffled: torch.Tensor, Hp: int, Wp: int, factor: int) -> torch.Tensor:
    """The inverse of pixel_shuffle without the prefix: [B, Gh*Gw, D*s*s] -> [B, Hp*Wp, D]."""
    B, _, K = shuffled.shape
    s = factor
    Gh, Gw, D = Hp // s, Wp // s, K // (s * s)
    blocks = shuffled.reshape(B, Gh, Gw, s, s, D)  # [B, I, J, dy, dx, d]
    return blocks.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp * Wp, D)


def shuffle_source_rows(Hp: int, Wp: int, factor: int, num_prefix_tokens: int = 0, device=None) -> torch.Tensor:
    """int64 [Gh*Gw, s*s]: entry [I*Gw + J, dy*s + dx] is the row of x (within one image, prefix
    included) that fills slot (dy, dx) of shuffled token (I, J). Every non-prefix row occurs once."""
    s = factor
    Gh, Gw = Hp // s, Wp // s
    I = torch.arange(Gh, device=device).view(Gh, 1, 1, 1)
    J = torch.arange(Gw, device=device).view(1, Gw, 1, 1)
    dy = torch.arange(s, device=device).view(1, 1, s, 1)
    dx = torch.arange(s, device=device).view(1, 1, 1, s)
    rows = num_prefix_tokens + (I * s + dy) * Wp + (J * s + dx)
    return rows.reshape(Gh * Gw, s * s)


def _project(shuffled: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    y = shuffled @ weight.t()
    return y + bias if bias is not None else y


def pixel_shuffle_project_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    grids,
    factor: int,
    num_prefix_tokens: int = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """Batched: x [B, P + Hp*Wp, D], grids (Hp, Wp) -> y [B, Gh*Gw, out].
    Packed: x [T, D], cu_seqlens int32 [n+1], grids int32 [n, 2] -> (y [sum Gh_i*Gw_i, out],
    out_cu_seqlens int32 [n+1]). weight [out, D*s*s], bias [out]. Computed in the inputs' dtype
    (pass fp64 tensors for an fp64 oracle). Differentiable with plain autograd."""
    P, s = num_prefix_tokens, factor
    if cu_seqlens is None:
        Hp, Wp = (int(v) for v in grids)
        return _project(pixel_shuffle(x, Hp, Wp, s, P), weight, bias)
    cu = cu_seqlens.tolist()
    ys, out_cu = [], [0]
    for i, (Hp, Wp) in enumerate(grids.tolist()):
        shuffled = pixel_shuffle(x[None, cu[i]:cu[i + 1]], Hp, Wp, s, P)[0]
        ys.append(_project(shuffled, weight, bias))
        out_cu.append(out_cu[-1] + shuffled.shape[0])
    return torch.cat(ys), torch.tensor(out_cu, dtype=torch.int32, device=x.device)
