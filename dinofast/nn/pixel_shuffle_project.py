"""nn.Module wrapper of dinofast.pixel_shuffle_project: a drop-in for nanoVLM's ModalityProjector."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dinofast import _validate as V
from dinofast._layout import PackedLayout
from dinofast.ops.pixel_shuffle_project import pixel_shuffle_project


class PixelShuffleProjector(nn.Module):
    """Drop `num_prefix_tokens`, pixel-shuffle by `factor` and project to `out_dim`, fused.

    forward(x, grids, cu_seqlens=None, layout=None): batched x [B, P + Hp*Wp, in_dim] with grids
    (Hp, Wp) -> [B, Gh*Gw, out_dim]; packed x [T, in_dim] with cu_seqlens int32 [n+1] and grids int32
    [n, 2] -> (y [sum Gh_i*Gw_i, out_dim], out_cu_seqlens int32 [n+1]) (layout: the optional host
    dinofast.PackedLayout, see dinofast.pixel_shuffle_project).
    State dict: `proj.weight` [out_dim, in_dim*factor^2] (+ `proj.bias` [out_dim]): the keys and
    layout of nanoVLM's ModalityProjector, so its checkpoints load unchanged.
    """

    def __init__(self, in_dim: int, out_dim: int, factor: int, bias: bool = False, num_prefix_tokens: int = 0):
        super().__init__()
        V.check_positive_int(in_dim, "in_dim")
        V.check_positive_int(out_dim, "out_dim")
        V.check_positive_int(factor, "factor")
        V.check_nonneg_int(num_prefix_tokens, "num_prefix_tokens")
        self.in_dim, self.out_dim, self.factor = in_dim, out_dim, factor
        self.num_prefix_tokens = num_prefix_tokens
        self.proj = nn.Linear(in_dim * factor * factor, out_dim, bias=bias)
        nn.init.normal_(self.proj.weight, mean=0.0, std=0.02)  # nanoVLM's initialisation
        if bias:
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, grids, cu_seqlens: Optional[torch.Tensor] = None,
                layout: Optional[PackedLayout] = None):
        if x.shape[-1] != self.in_dim:
            V.fail("x", f"last dim in_dim = {self.in_dim}", f"shape {tuple(x.shape)}")
        weight, bias = _weight_and_bias(self.proj)
        return pixel_shuffle_project(x, weight, bias, grids=grids, factor=self.factor,
                                     num_prefix_tokens=self.num_prefix_tokens, cu_seqlens=cu_seqlens, layout=layout)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, out_dim={self.out_dim}, factor={self.factor}, "
                f"num_prefix_tokens={self.num_prefix_tokens}")


def _weight_and_bias(linear: nn.Linear):
    """(linear.weight, linear.bias), read from the parameter dict when they live there: two
    nn.Module.__getattr__ lookups cost more than a microsecond per call. Weights held elsewhere
    (parametrizations, weight norm) are read as attributes."""
    params = linear._parameters
    weight = params["weight"] if "weight" in params else linear.weight
    bias = params["bias"] if "bias" in params else linear.bias
    return weight, bias
