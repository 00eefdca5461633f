"""nn.Module wrapper of dinofast.rope2d."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dinofast._layout import PackedLayout
from dinofast import _validate as V
from dinofast.ops.rope2d import rope2d
from dinofast.reference.rope2d import sample_coord_transform


class RoPE2D(nn.Module):
    """DINOv3 2D RoPE for q, k of head dim `head_dim`.

    forward(q, k, grids, cu_seqlens=None, layout=None) -> (q, k): batched q, k [B, H, N, D] with grids
    (Hp, Wp), or packed [T, H, D] with cu_seqlens int32 [n+1] and grids int32 [n, 2] (layout: the
    optional host dinofast.PackedLayout, see dinofast.rope2d).
    `periods` (a non-persistent buffer, [head_dim/4]) can be set from a checkpoint. In train mode,
    when any of shift/jitter/rescale is set, coordinates are augmented as DINOv3 does.
    """

    def __init__(self, head_dim: int, theta: float = 100.0, num_prefix_tokens: int = 5, *,
                 shift: Optional[float] = None, jitter: Optional[float] = None,
                 rescale: Optional[float] = None):
        super().__init__()
        V.check_positive_int(head_dim, "head_dim")
        V.check_head_dim(head_dim, "head_dim")
        V.check_finite(theta, "theta")
        V.check_nonneg_int(num_prefix_tokens, "num_prefix_tokens")
        V.check_coord_param(shift, "shift", minimum=0.0)
        V.check_coord_param(jitter, "jitter", minimum=1.0)
        V.check_coord_param(rescale, "rescale", minimum=1.0)
        self.head_dim, self.theta, self.num_prefix_tokens = head_dim, float(theta), num_prefix_tokens
        self.shift, self.jitter, self.rescale = shift, jitter, rescale
        self.register_buffer("periods", None, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, grids, cu_seqlens: Optional[torch.Tensor] = None,
                layout: Optional[PackedLayout] = None):
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"q: expected head dim {self.head_dim}, got {q.shape[-1]}")
        transform = None
        if self.training and (self.shift is not None or self.jitter is not None or self.rescale is not None):
            transform = sample_coord_transform(1, shift=self.shift, jitter=self.jitter, rescale=self.rescale,
                                               device=q.device)
        return rope2d(q, k, grids, num_prefix_tokens=self.num_prefix_tokens, theta=self.theta,
                      periods=self.periods, cu_seqlens=cu_seqlens, coord_transform=transform, layout=layout)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, num_prefix_tokens={self.num_prefix_tokens}"
