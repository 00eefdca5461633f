"""pixel_shuffle_project (the VLM bridge): each backend vs the eager reshape/permute + Linear path
and the floor, the GEMM alone on a pre-shuffled contiguous tensor. Forward, and forward+backward
(grads of x and weight). 5 prefix tokens, no bias (nanoVLM's projector).

The benchmark grid is D {768, 1024} x out {960, 2048} x s {2, 4} x {512, 768, 1024, 640x960} x B {1, 8},
forward and forward+backward: 128 shapes, several hours on a 2-core CPU. By default a trimmed grid
runs (every resolution, factor and batch for D 768 -> 960, D 1024 -> 2048 on two resolutions,
forward+backward on two resolutions); DINOFAST_BENCH_FULL=1 runs the full grid.
"""
import functools
import os

import pytest
import torch

import dinofast
from dinofast.reference.pixel_shuffle_project import pixel_shuffle
from benchmarks.conftest import DEVICE, speed_backends

RESOLUTIONS = {"512": (32, 32), "768": (48, 48), "1024": (64, 64), "640x960": (40, 60)}
P = 5
FULL = os.environ.get("DINOFAST_BENCH_FULL", "0") == "1"


def _shapes():
    """(mode, D, out, s, res, B)."""
    shapes = []
    for mode in ("fwd", "fwd+bwd"):
        for D, out in ((768, 960), (1024, 2048)):
            for s in (2, 4):
                for res in RESOLUTIONS:
                    for B in (1, 8):
                        keep = FULL or (
                            (mode == "fwd" and (D == 768 or res in ("512", "640x960")))
                            or (mode == "fwd+bwd" and D == 768 and res in ("512", "640x960")))
                        if keep:
                            shapes.append((mode, D, out, s, res, B))
    return shapes


@functools.lru_cache(maxsize=2)
def inputs(D: int, out: int, s: int, res: str, B: int):
    Hp, Wp = RESOLUTIONS[res]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, P + Hp * Wp, D, generator=g).to(DEVICE)
    w = (torch.randn(out, D * s * s, generator=g) / (D * s * s) ** 0.5).to(DEVICE)
    shuffled = pixel_shuffle(x, Hp, Wp, s, P).contiguous()  # the floor's pre-shuffled input
    grad_y = torch.randn(B, (Hp // s) * (Wp // s), out, generator=g).to(DEVICE)
    return x, w, shuffled, grad_y, (Hp, Wp)


def eager(x, w, grid, s):
    """nanoVLM's path generalised to rectangles: reshape/permute (a copy), then Linear."""
    return torch.nn.functional.linear(pixel_shuffle(x, *grid, s, P), w)


ROWS = speed_backends() + ["eager reshape+Linear", "GEMM floor"]


@pytest.mark.parametrize("shape", _shapes(), ids=lambda t: "-".join(map(str, t)))
@pytest.mark.parametrize("row", ROWS)
def test_pixel_shuffle_project(bench, row, shape):
    mode, D, out, s, res, B = shape
    x, w, shuffled, grad_y, grid = inputs(D, out, s, res, B)
    group = f"pixel_shuffle_project {mode} D={D} out={out} s={s} {res} B={B}"
    if row in dinofast.BACKENDS:
        def f(x, w):
            return dinofast.pixel_shuffle_project(x, w, grids=grid, factor=s, num_prefix_tokens=P)
        a = x
    elif row == "eager reshape+Linear":
        def f(x, w):
            return eager(x, w, grid, s)
        a = x
    else:  # the GEMM(s) alone on an already shuffled, contiguous input: no fused op can beat it
        def f(a, w):
            return torch.nn.functional.linear(a, w)
        a = shuffled
    if mode == "fwd":
        run = functools.partial(f, a, w)
    else:
        a, wg = a.detach().requires_grad_(), w.detach().requires_grad_()

        def run():
            return torch.autograd.grad(f(a, wg), (a, wg), grad_y)
    bench(run, group, backend=row if row in dinofast.BACKENDS else None)
