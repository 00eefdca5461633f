"""rope2d across resolutions: each backend vs the transformers eager path, torch.compile of the
reference, and the memory floor (copying q and k once). B 1 and 8, H 12, D 64, q/k laid out as
transformers makes them ([B, N, H, D] buffers seen as [B, H, N, D])."""
import functools

import pytest
import torch

import dinofast
from dinofast.reference.rope2d import rope2d_reference
from benchmarks.conftest import DEVICE, speed_backends

RESOLUTIONS = {"224": (14, 14), "512": (32, 32), "768": (48, 48), "1024": (64, 64), "640x960": (40, 60)}
P, H, D = 5, 12, 64


@functools.lru_cache(maxsize=4)
def inputs(res: str, B: int):
    Hp, Wp = RESOLUTIONS[res]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, P + Hp * Wp, H, D, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(B, P + Hp * Wp, H, D, generator=g).to(DEVICE).transpose(1, 2)
    return q, k, (Hp, Wp)


def transformers_eager(q, k, grid):
    """What DINOv3ViTModel does per layer: cos/sin from its rope module, then apply_rotary_pos_emb."""
    from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

    rope = _transformers_rope()
    pixels = torch.empty(1, 3, grid[0] * 16, grid[1] * 16, device=DEVICE)
    cos, sin = rope(pixels)
    return apply_rotary_pos_emb(q, k, cos, sin)


@functools.lru_cache(maxsize=1)
def _transformers_rope():
    from transformers import DINOv3ViTConfig
    from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTRopePositionEmbedding

    cfg = DINOv3ViTConfig(hidden_size=H * D, num_attention_heads=H, patch_size=16)
    return DINOv3ViTRopePositionEmbedding(cfg).to(DEVICE).eval()


torch._dynamo.config.recompile_limit = 64  # one graph per (resolution, batch) row
_compiled_reference = torch.compile(rope2d_reference, fullgraph=True, dynamic=False)

ROWS = speed_backends() + ["transformers-eager", "torch.compile(reference)", "memory-floor"]


@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("res", list(RESOLUTIONS))
@pytest.mark.parametrize("row", ROWS)
def test_rope2d(bench, row, res, B):
    q, k, grid = inputs(res, B)
    group = f"rope2d {res} B={B}"
    if row in dinofast.BACKENDS:
        bench(lambda: dinofast.rope2d(q, k, grid, num_prefix_tokens=P), group, backend=row)
    elif row == "transformers-eager":
        bench(lambda: transformers_eager(q, k, grid), group)
    elif row == "torch.compile(reference)":
        bench(lambda: _compiled_reference(q, k, grid, num_prefix_tokens=P), group)
    else:  # reading q, k once and writing them once: no rope kernel can beat this
        bench(lambda: (q.clone(), k.clone()), group)
