"""Extraction throughput on CPU: `dinofast extract` (token-budget packed batches through the
patched model) vs the transformers model run one image at a time, both from image files on disk to
a safetensors shard, ViT-S dimensions with random weights, 64 generated images of mixed sizes up to
768 px.

    pytest benchmarks/test_extract.py --benchmark-only -s

Both rows run in each dtype of the model benchmarks (CPU: fp32 and bf16; GPU: bf16): the
per-image model in that dtype, `dinofast extract --dtype`.

Target: packed >= 1.3x the per-image loop in images/s, checked by the packed row when the per-image
row of its dtype ran first in the same session.
"""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.test_dinov3 import DTYPES as MODEL_DTYPES, dtype_id

NUM_IMAGES = 64
MAX_SIDE = 768
ROUNDS = 3  # medians of 3: ~1 min per dtype on the quiet 2-core dev box (2026-11-24)
TARGET = 1.3
_medians = {}


@pytest.fixture(scope="module")
def vit_s_dir(tmp_path_factory):
    """ViT-S/16 dimensions of the released DINOv3 (384 wide, 12 layers, 6 heads, 4 registers)."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
        num_register_tokens=4, patch_size=16, layer_norm_eps=1e-5,
    )
    path = tmp_path_factory.mktemp("vit_s")
    DINOv3ViTModel(config).eval().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """64 JPEGs: longest side uniform in [96, 768], aspect ratio in [1/2.5, 2.5], some grayscale."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("bench_images")
    for i in range(NUM_IMAGES):
        longest = int(rng.integers(96, MAX_SIDE + 1))
        aspect = float(np.exp(rng.uniform(np.log(1 / 2.5), np.log(2.5))))
        h, w = (longest, max(16, int(longest / aspect))) if aspect > 1 else (max(16, int(longest * aspect)), longest)
        # smooth random content (not white noise) so JPEG decoding costs what photos cost
        small = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        if i % 7 == 0:
            im = im.convert("L")
        im.save(os.path.join(root, f"img{i:03d}.jpg"), quality=90)
    return str(root)


DTYPES = [dtype_id(d) for d in MODEL_DTYPES]  # names, as `dinofast extract --dtype` takes them


def per_image_transformers(model_dir, image_dir, out_dir, dtype="float32"):
    """The baseline: the same files, processor and shard format, transformers' DINOv3ViTModel
    (sdpa attention, unpatched) called on one [1, 3, H, W] image at a time, in `dtype`."""
    from safetensors.torch import save_file
    from transformers import DINOv3ViTModel

    import dinofast

    dt = getattr(torch, dtype)
    model = DINOv3ViTModel.from_pretrained(model_dir).eval().to(dt)
    proc = dinofast.ImageProcessor(patch_size=16, max_side=MAX_SIDE)
    R = model.config.num_register_tokens
    tensors = {}
    for name in sorted(os.listdir(image_dir)):
        with Image.open(os.path.join(image_dir, name)) as im:
            pixels, grid = proc(im)
        with torch.inference_mode():
            h = model(pixel_values=pixels[None].to(dt)).last_hidden_state[0]
        tensors[f"{name}/cls"] = h[0].clone()
        tensors[f"{name}/registers"] = h[1:1 + R].clone()
        tensors[f"{name}/patches"] = h[1 + R:].unflatten(0, (grid.Hp, grid.Wp)).clone()
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "features.safetensors"))


def packed_extract(model_dir, image_dir, out_dir, dtype="float32"):
    from dinofast import extract

    extract.main(["--model", model_dir, "--images", image_dir, "--out", out_dir, "--max-side", str(MAX_SIDE),
                  "--max-tokens-per-batch", "8192", "--no-progress", "--dtype", dtype])


def _bench(benchmark, fn, model_dir, image_dir, tmp_path, label, dtype):
    outs = iter(range(100))

    def setup():
        out = str(tmp_path / f"out{next(outs)}")
        shutil.rmtree(out, ignore_errors=True)
        return (model_dir, image_dir, out, dtype), {}

    benchmark.pedantic(fn, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median
    _medians[label] = median
    benchmark.extra_info["images_per_s"] = NUM_IMAGES / median
    print(f"\n{label}: median {median:.2f} s, {NUM_IMAGES / median:.2f} images/s")


@pytest.mark.parametrize("dtype", DTYPES)
def test_extract_transformers_per_image(benchmark, vit_s_dir, image_dir, tmp_path, dtype):
    benchmark.group = f"extract-vit-s-cpu-{dtype}"
    _bench(benchmark, per_image_transformers, vit_s_dir, image_dir, tmp_path, f"transformers per image {dtype}", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_extract_dinofast_packed(benchmark, vit_s_dir, image_dir, tmp_path, dtype):
    benchmark.group = f"extract-vit-s-cpu-{dtype}"
    _bench(benchmark, packed_extract, vit_s_dir, image_dir, tmp_path, f"dinofast extract (packed) {dtype}", dtype)
    if f"transformers per image {dtype}" not in _medians:
        pytest.skip(reason="the speedup needs the per-image row of this dtype from the same session")
    ratio = _medians[f"transformers per image {dtype}"] / _medians[f"dinofast extract (packed) {dtype}"]
    benchmark.extra_info["speedup_vs_per_image"] = ratio
    print(f"speedup packed vs per image: {ratio:.2f}x (target {TARGET}x)")
    assert ratio >= TARGET, f"packed extraction is {ratio:.2f}x the per-image loop; target {TARGET}x"

