"""End-to-end DINOv3 forward: transformers (sdpa) vs dinofast-patched, and a mixed list of images
run one at a time vs encode_packed. Random ViT-S / ViT-B weights (nothing downloaded), batch 1,
torch.inference_mode(), fp32 and bf16 on CPU (bf16 on GPU).

Rows of one group (one model, size and dtype) are timed round-robin in one test (see
interleaved), at DINOFAST_BENCH_THREADS torch threads (default 2), DINOFAST_BENCH_MODEL_ROUNDS
rounds (default 5; a ViT-B round at 768^2 takes seconds on a 2-core CPU):
  forward:     transformers-sdpa, dinofast-patched
  8 mixed:     transformers-per-image, dinofast-patched-per-image, encode_packed
Medians and ratios are printed (-s) and stored in each benchmark's extra_info; the timed body of
the pytest-benchmark row is one round of all rows.

    pytest benchmarks/test_dinov3.py --benchmark-only -s
    DINOFAST_BENCH_MODELS=B ...            only ViT-B (default: S,B)
    -k "B-768x768 or mixed and B"          the rows of the README's table

Targets (CPU, recorded in benchmarks/README.md): patched ViT-B at 768^2 >= 1.3x transformers in
fp32 and >= 1.5x in bf16; encode_packed of 8 mixed images in bf16 >= 1.5x the per-image loop.
"""
import copy
import os
import random

import pytest
import torch

import dinofast
from benchmarks.conftest import DEVICE, THREADS, interleaved

DTYPES = [torch.bfloat16] if DEVICE.type == "cuda" else [torch.float32, torch.bfloat16]
DTYPE = DTYPES[0]  # the default dtype of benchmarks/test_vision_tower.py
VARIANTS = {"S": dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536),
            "B": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072)}
MODELS = [m for m in os.environ.get("DINOFAST_BENCH_MODELS", "S,B").split(",") if m in VARIANTS]
SIZES = [(224, 224), (512, 512), (768, 768), (1024, 1024), (640, 960)]
ROUNDS = int(os.environ.get("DINOFAST_BENCH_MODEL_ROUNDS", "5"))


def mixed_sizes(n=8, seed=0):
    """n (H, W) between 224 and 768, multiples of 16, square/tall/wide mixed, fixed by the seed."""
    rng = random.Random(seed)
    return [(16 * rng.randint(14, 48), 16 * rng.randint(14, 48)) for _ in range(n)]


_models = {}


def _random_model(variant, dtype):
    """ViT-`variant` with random weights, 12 layers, 4 registers, in eval mode and `dtype`."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(num_hidden_layers=12, num_register_tokens=4, attn_implementation="sdpa",
                          **VARIANTS[variant])
    return DINOv3ViTModel(cfg).to(device=DEVICE, dtype=dtype).eval()


def models_for(variant, dtype):
    """(transformers, dinofast-patched) copies of one ViT-`variant` in `dtype` (cached per session)."""
    if (variant, dtype) not in _models:
        plain = _random_model(variant, dtype)
        _models[(variant, dtype)] = plain, dinofast.patch_dinov3(copy.deepcopy(plain))
    return _models[(variant, dtype)]


def model_for(variant, dtype=DTYPE):
    """One ViT-`variant` in `dtype` that its user patches and unpatches (benchmarks/test_vision_tower.py;
    cached per session, apart from models_for's copies)."""
    if (variant, dtype, "own") not in _models:
        _models[variant, dtype, "own"] = _random_model(variant, dtype)
    return _models[variant, dtype, "own"]


def inference(fn):
    def run():
        with torch.inference_mode():
            return fn()
    return run


def _time_group(benchmark, group, rows, baseline):
    """Time `rows` interleaved; print and record medians and each row's speed-up over `baseline`."""
    benchmark.group = group
    rows = {name: inference(fn) for name, fn in rows.items()}
    medians = interleaved(rows, ROUNDS)
    lines = [f"{group}, {THREADS} threads, {ROUNDS} interleaved rounds"]
    for name, sec in medians.items():
        lines.append(f"  {name:28s} {sec * 1e3:10.1f} ms  {medians[baseline] / sec:5.2f}x {baseline}")
    print("\n".join(lines))
    benchmark.extra_info.update(threads=THREADS, rounds=ROUNDS, medians_ms={n: s * 1e3 for n, s in medians.items()})
    benchmark.pedantic(lambda: [fn() for fn in rows.values()], rounds=1, iterations=1)


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", MODELS)
def test_forward(benchmark, variant, size, dtype):
    plain, patched = models_for(variant, dtype)
    x = torch.randn(1, 3, *size, device=DEVICE, dtype=dtype)
    _time_group(benchmark, f"dinov3 forward ViT-{variant} {size[0]}x{size[1]} B=1 {dtype_id(dtype)}",
                {"transformers-sdpa": lambda: plain(x), "dinofast-patched": lambda: patched(x)},
                "transformers-sdpa")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("variant", MODELS)
def test_mixed_batch(benchmark, variant, dtype):
    plain, patched = models_for(variant, dtype)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, h, w, generator=g).to(device=DEVICE, dtype=dtype) for h, w in mixed_sizes()]
    benchmark.extra_info["sizes"] = [tuple(t.shape[1:]) for t in images]
    _time_group(benchmark, f"dinov3 8 mixed images ViT-{variant} {dtype_id(dtype)}", {
        "transformers-per-image": lambda: [plain(img[None]) for img in images],
        "dinofast-patched-per-image": lambda: [patched(img[None]) for img in images],
        "encode_packed": lambda: dinofast.encode_packed(patched, images),
    }, "transformers-per-image")
