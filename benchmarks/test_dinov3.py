"""End-to-end DINOv3 forward: transformers (sdpa) vs dinofast-patched, and a mixed list of images
run one at a time vs encode_packed. Random ViT-S / ViT-B weights (nothing downloaded).

    pytest benchmarks/test_dinov3.py --benchmark-only
    DINOFAST_BENCH_MODELS=B ...            only ViT-B (default: S,B)

Targets (CPU, recorded in benchmarks/README.md): patched ViT-B >= 1.15x transformers at 768;
encode_packed >= 1.2x the per-image loop over 8 mixed images. On GPU the same rows run in bf16.
"""
import os
import random

import pytest
import torch

import dinofast
from benchmarks.conftest import DEVICE

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
VARIANTS = {"S": dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536),
            "B": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072)}
MODELS = [m for m in os.environ.get("DINOFAST_BENCH_MODELS", "S,B").split(",") if m in VARIANTS]
SIZES = [(224, 224), (512, 512), (768, 768), (1024, 1024), (640, 960)]


def mixed_sizes(n=8, seed=0):
    """n (H, W) between 224 and 768, multiples of 16, square/tall/wide mixed, fixed by the seed."""
    rng = random.Random(seed)
    return [(16 * rng.randint(14, 48), 16 * rng.randint(14, 48)) for _ in range(n)]


_models = {}


def model_for(variant):
    """ViT-`variant` with random weights, 12 layers, 4 registers, in eval mode (cached per session)."""
    if variant not in _models:
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        torch.manual_seed(0)
        cfg = DINOv3ViTConfig(num_hidden_layers=12, num_register_tokens=4, attn_implementation="sdpa",
                              **VARIANTS[variant])
        _models[variant] = DINOv3ViTModel(cfg).to(device=DEVICE, dtype=DTYPE).eval()
    return _models[variant]


def inference(fn):
    def run():
        with torch.inference_mode():
            return fn()
    return run


@pytest.mark.parametrize("impl", ["transformers-sdpa", "dinofast-patched"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", MODELS)
def test_forward(bench, variant, size, impl):
    model = model_for(variant)
    (dinofast.patch_dinov3 if impl == "dinofast-patched" else dinofast.unpatch_dinov3)(model)
    x = torch.randn(1, 3, *size, device=DEVICE, dtype=DTYPE)
    try:
        bench(inference(lambda: model(x)), f"dinov3 forward ViT-{variant} {size[0]}x{size[1]} B=1")
    finally:
        dinofast.unpatch_dinov3(model)


@pytest.mark.parametrize("impl", ["transformers-per-image", "dinofast-patched-per-image", "encode_packed"])
@pytest.mark.parametrize("variant", MODELS)
def test_mixed_batch(bench, benchmark, variant, impl):
    model = model_for(variant)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, h, w, generator=g).to(device=DEVICE, dtype=DTYPE) for h, w in mixed_sizes()]
    benchmark.extra_info["sizes"] = [tuple(t.shape[1:]) for t in images]
    if impl == "encode_packed":
        fn = lambda: dinofast.encode_packed(model, images)  # noqa: E731
    else:
        if impl.startswith("dinofast"):
            dinofast.patch_dinov3(model)
        fn = lambda: [model(img[None]) for img in images]  # noqa: E731
    try:
        bench(inference(fn), f"dinov3 8 mixed images ViT-{variant}")
    finally:
        dinofast.unpatch_dinov3(model)
