"""VisionTower vs the per-image loop a VLM runs today: 8 mixed images -> LM tokens (ViT-S / ViT-B
tower, 12 layers, random weights, pixel shuffle s=4, projector to 960 = nanoVLM's LM width).

Rows (`IMPLS`):
  transformers-per-image   nanoVLM's loop: unpatched transformers model on one image at a time,
                           prefix dropped, reshape/permute pixel shuffle + Linear per image
  dinofast-patched-per-image  the same loop over the patched model and dinofast's projector
  vision-tower             dinofast.VisionTower: one packed encoder pass + one packed projection

    pytest benchmarks/test_vision_tower.py --benchmark-only          (pytest-benchmark rows)
    python -m benchmarks.test_vision_tower [rounds] [threads] [dtype] (rows alternated call by call)

`build_case(variant, dtype=...)` returns (run functions by row name, images): what a bench command
calls. Target (CPU): vision-tower >= 1.5x transformers-per-image. On CPU the rows run in fp32 and
bf16 (dtype: float32 or bfloat16, default float32), on GPU in bf16.
"""
import os
import random
import statistics
import sys
import time

import pytest
import torch

import dinofast
from benchmarks.test_dinov3 import DTYPE, DTYPES, MODELS, dtype_id, model_for

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = ("transformers-per-image", "dinofast-patched-per-image", "vision-tower")
FACTOR, LM_WIDTH, PREFIX = 4, 960, 5  # s, d_lm, CLS + 4 registers


def mixed_cell_sizes(n=8, seed=0, cell=64):
    """n (H, W) in [256, 768], multiples of the cell (patch 16 * s 4), square/tall/wide mixed."""
    rng = random.Random(seed)
    return [(cell * rng.randint(4, 12), cell * rng.randint(4, 12)) for _ in range(n)]


def nanovlm_project(patches, weight, Hp, Wp, s):
    """nanoVLM's modality projector on a rectangular grid: [1, Hp*Wp, D] -> [1, Gh*Gw, out]."""
    B, _, D = patches.shape
    x = patches.reshape(B, Hp // s, s, Wp // s, s, D).permute(0, 1, 3, 2, 4, 5)
    return torch.nn.functional.linear(x.reshape(B, (Hp // s) * (Wp // s), D * s * s), weight)


def build_case(variant, n=8, seed=0, dtype=DTYPE):
    """({row name: zero-argument callable returning the [sum tokens, 960] embeds}, images)."""
    model = model_for(variant, dtype)
    D = model.config.hidden_size
    torch.manual_seed(seed)
    projector = dinofast.nn.PixelShuffleProjector(D, LM_WIDTH, FACTOR, num_prefix_tokens=PREFIX)
    projector = projector.to(device=DEVICE, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, h, w, generator=g).to(device=DEVICE, dtype=dtype) for h, w in mixed_cell_sizes(n, seed)]
    tower = dinofast.VisionTower(model, projector)
    weight = projector.proj.weight

    def transformers_loop():
        dinofast.unpatch_dinov3(model)
        outs = []
        for img in images:
            seq = model(img[None]).last_hidden_state[:, PREFIX:]
            outs.append(nanovlm_project(seq, weight, img.shape[1] // 16, img.shape[2] // 16, FACTOR)[0])
        return torch.cat(outs)

    def patched_loop():
        dinofast.patch_dinov3(model)
        outs = []
        for img in images:
            seq = model(img[None]).last_hidden_state
            outs.append(projector(seq, (img.shape[1] // 16, img.shape[2] // 16))[0])
        return torch.cat(outs)

    def vision_tower():
        dinofast.patch_dinov3(model)  # same modules as the patched loop; the packed pass uses them as they are
        return tower(images).embeds

    def inference(fn):
        def run():
            with torch.inference_mode():
                return fn()
        return run

    runs = {"transformers-per-image": inference(transformers_loop),
            "dinofast-patched-per-image": inference(patched_loop),
            "vision-tower": inference(vision_tower)}
    return runs, images


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("variant", MODELS)
def test_vision_tower(bench, benchmark, variant, dtype, impl):
    runs, images = build_case(variant, dtype=dtype)
    benchmark.extra_info["sizes"] = [tuple(t.shape[1:]) for t in images]
    try:
        bench(runs[impl], f"vision tower 8 mixed images ViT-{variant} {dtype_id(dtype)} "
                          f"s={FACTOR} -> {LM_WIDTH}")
    finally:
        dinofast.unpatch_dinov3(model_for(variant, dtype))


def alternating(variant, rounds=3, dtype=DTYPE):
    """Median seconds per row, rows called in turn (A B C A B C ...) after one warm-up call each,
    and the max abs difference of each row's embeds from the transformers loop's."""
    runs, images = build_case(variant, dtype=dtype)
    want = runs["transformers-per-image"]()
    diffs = {name: (fn() - want).abs().max().item() for name, fn in runs.items()}  # also the warm-up
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    dinofast.unpatch_dinov3(model_for(variant, dtype))
    return {name: (statistics.median(t), min(t), diffs[name]) for name, t in times.items()}, images


def main(argv):
    rounds = int(argv[1]) if len(argv) > 1 else 3
    threads = int(argv[2]) if len(argv) > 2 else torch.get_num_threads()
    dtype = getattr(torch, argv[3], None) if len(argv) > 3 else DTYPE
    if dtype not in DTYPES:
        raise SystemExit(f"dtype: expected one of {[dtype_id(d) for d in DTYPES]}, got {argv[3]!r}")
    torch.set_num_threads(threads)
    print(f"device {DEVICE.type}, dtype {dtype}, torch threads {torch.get_num_threads()}, rounds {rounds}, "
          f"load average {os.getloadavg()}", flush=True)
    for variant in MODELS:
        rows, images = alternating(variant, rounds, dtype)
        print(f"\nViT-{variant}, sizes {[tuple(t.shape[1:]) for t in images]}")
        base = rows["transformers-per-image"]
        for name, (med, low, diff) in rows.items():
            print(f"  {name:<28} median {med * 1e3:9.1f} ms  min {low * 1e3:9.1f} ms  "
                  f"speed-up {base[0] / med:5.2f}x (min/min {base[1] / low:5.2f}x)  max|diff| {diff:.2e}", flush=True)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main(sys.argv)
