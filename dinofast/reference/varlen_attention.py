"""Varlen (packed, block-diagonal) self-attention in plain PyTorch: the oracle of every backend.

q, k, v are [T, H, D] packs of n segments; segment i owns tokens cu_seqlens[i]:cu_seqlens[i+1] and
attends only to itself (non-causal). With a RopeSpec, q and k of each segment are first rotated by
DINOv3's 2D RoPE exactly as dinofast.reference.rope2d does (result in the input dtype), so
"fused rope" means "rope2d, then attention".

Computed per segment in fp32 (fp64 for fp64 inputs) as written in the definition: scores
S = (Q K^T) * softmax_scale, P = softmax(S), out = P V, cast back to the input dtype; the log-sum-exp
of S is returned in fp32 (fp64). The order of operations is the semantics for non-finite input: a
NaN anywhere in a row's scores or values makes it NaN, a score that overflows to +Inf makes its row
NaN (Inf - Inf), one that overflows to -Inf only drops its key.
The backward is torch autograd through this same code: no hand-derived formula to trust.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from dinofast.reference.rope2d import apply_rope2d, host_ints


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def varlen_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
    softmax_scale: Optional[float] = None, rope=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [T, H, D] in q's dtype, lse [H, T] in fp32 (fp64 for fp64 inputs)).

    rope: a dinofast.RopeSpec (grids int32 [n, 2], num_prefix_tokens, theta/periods,
    coord_transform) or None. cu_seqlens (and rope.grids) may be host sequences. Differentiable in q, k, v.
    """
    T, H, D = q.shape
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    if rope is not None:
        freqs = rope.inv_freq(D, q.device)
        q, k = apply_rope2d(q, k, freqs, rope.grids, num_prefix_tokens=rope.num_prefix_tokens,
                            cu_seqlens=cu_seqlens, coord_transform=rope.coord_transform)
    ct = _compute_dtype(q)
    cu = host_ints(cu_seqlens)
    outs, lses = [], []
    for start, end in zip(cu[:-1], cu[1:]):
        # [L, H, D] -> [H, L, D]
        qs, ks, vs = (x[start:end].transpose(0, 1).to(ct) for x in (q, k, v))
        if end == start:
            outs.append(qs.transpose(0, 1))
            lses.append(qs.new_empty(H, 0))
            continue
        scores = (qs @ ks.transpose(1, 2)) * scale  # [H, L, L]
        outs.append((torch.softmax(scores, dim=-1) @ vs).transpose(0, 1))
        lses.append(torch.logsumexp(scores, dim=-1))
    out = torch.cat(outs, 0) if outs else q.new_empty(0, H, D, dtype=ct)
    return out.to(q.dtype), torch.cat(lses, 1)


def dense_masked_attention(q, k, v, cu_seqlens, softmax_scale=None) -> torch.Tensor:
    """The same attention as one dense SDPA call over all T tokens with a block-diagonal boolean
    mask (an independent second oracle; O(T^2) memory). Computed in q's dtype."""
    T = q.shape[0]
    seg = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=q.device),
                                  (cu_seqlens[1:] - cu_seqlens[:-1]).long(), output_size=T)
    mask = seg[:, None] == seg[None, :]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=softmax_scale)
    return out.transpose(0, 1)
