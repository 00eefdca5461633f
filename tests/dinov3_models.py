"""Small random DINOv3 models for the model-layer tests (nothing downloaded)."""
import math

import torch

from tests.conftest import DEVICE


def small_config(*, gated=False, registers=4, hidden=128, heads=2, layers=2, **kw):
    from transformers import DINOv3ViTConfig

    return DINOv3ViTConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
        num_register_tokens=registers, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
        attn_implementation="sdpa", **kw)


@torch.no_grad()
def randomize(model, seed=0):
    """Every parameter set to random values of a healthy scale: transformers' init (std 0.02, unit
    LayerScale, unit norms) makes a near-identity network in which wrong attention or rope would
    hardly show; these weights make every part of the block matter."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.numel() == 0:
            continue
        if name.endswith("lambda1"):  # LayerScale
            v = 0.5 + torch.rand(p.shape, generator=g)
        elif "norm" in name and name.endswith("weight"):
            v = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
        elif p.dim() >= 2 and "token" not in name:  # Linear / Conv weights: fan-in scaling
            v = torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel())
        else:  # biases, cls / register / mask tokens
            v = 0.1 * torch.randn(p.shape, generator=g)
        p.copy_(v)
    return model


def random_model(*, backbone=False, seed=0, **config_kw):
    from transformers import DINOv3ViTBackbone, DINOv3ViTModel

    torch.manual_seed(seed)
    cls = DINOv3ViTBackbone if backbone else DINOv3ViTModel
    return randomize(cls(small_config(**config_kw)), seed).to(DEVICE).eval()


def images(sizes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g).to(device=DEVICE, dtype=dtype) for h, w in sizes]


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert not torch.isnan(a).any(), "NaN in the output"
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
