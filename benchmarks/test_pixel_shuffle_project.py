"""pixel_shuffle_project (the VLM bridge): each backend vs the eager reshape/permute + Linear path
and the floor, the GEMM alone on a pre-shuffled contiguous tensor. Forward, and forward+backward
(grads of x and weight). 5 prefix tokens, no bias (nanoVLM's projector). fp32 and bf16 (on CPUs with
AVX-512 BF16 / AMX, bf16 GEMMs run several times faster than fp32 ones, so any extra pass over
memory weighs more there).

Rows of one group (mode, shape, dtype) are timed round-robin in one test (benchmarks/conftest.py
`interleaved`, ROUNDS rounds, DINOFAST_BENCH_THREADS torch threads) so that their ratios survive a
loaded machine:
  <backend>              dinofast.pixel_shuffle_project (the reference backend: fp32 groups only)
  eager reshape+Linear   nanoVLM's path: reshape/permute (a copy), then F.linear
  GEMM floor             F.linear on an already shuffled, contiguous input: no fused op can beat it
Medians and the ratios to the floor and to eager are printed (-s) and stored in each benchmark's
extra_info; the timed body of the pytest-benchmark row is one round of all rows.

The benchmark grid is D {768, 1024} x out {960, 2048} x s {2, 4} x {512, 768, 1024, 640x960} x B {1, 8},
forward and forward+backward, in two dtypes: 256 groups, hours on a 2-core CPU. By default a trimmed
grid runs (every resolution, factor and batch for D 768 -> 960, D 1024 -> 2048 on two resolutions,
forward+backward on two resolutions); DINOFAST_BENCH_FULL=1 runs the full grid.
DINOFAST_BENCH_ROUNDS sets the rounds (default 7). DINOFAST_BENCH_CLOCK=thread with
DINOFAST_BENCH_THREADS=1 times each call by the thread's CPU time: the work of a row, without the
time a loaded machine keeps it waiting for a core.
"""
import functools
import os
import time

import pytest
import torch

import dinofast
from dinofast.reference.pixel_shuffle_project import pixel_shuffle
from benchmarks.conftest import DEVICE, THREADS, interleaved, speed_backends

RESOLUTIONS = {"512": (32, 32), "768": (48, 48), "1024": (64, 64), "640x960": (40, 60)}
P = 5
FULL = os.environ.get("DINOFAST_BENCH_FULL", "0") == "1"
ROUNDS = int(os.environ.get("DINOFAST_BENCH_ROUNDS", "7"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
THREAD_CLOCK = os.environ.get("DINOFAST_BENCH_CLOCK", "wall") == "thread"
if THREAD_CLOCK and (THREADS != 1 or DEVICE.type != "cpu"):
    raise RuntimeError("DINOFAST_BENCH_CLOCK=thread needs DINOFAST_BENCH_THREADS=1 on CPU")


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
def inputs(D: int, out: int, s: int, res: str, B: int, dtype: str):
    Hp, Wp = RESOLUTIONS[res]
    g = torch.Generator().manual_seed(0)
    dt = DTYPES[dtype]
    x = torch.randn(B, P + Hp * Wp, D, generator=g).to(DEVICE, dt)
    w = (torch.randn(out, D * s * s, generator=g) / (D * s * s) ** 0.5).to(DEVICE, dt)
    shuffled = pixel_shuffle(x, Hp, Wp, s, P).contiguous()  # the floor's pre-shuffled input
    grad_y = torch.randn(B, (Hp // s) * (Wp // s), out, generator=g).to(DEVICE, dt)
    return x, w, shuffled, grad_y, (Hp, Wp)


def eager(x, w, grid, s):
    """nanoVLM's path generalised to rectangles: reshape/permute (a copy), then Linear."""
    return torch.nn.functional.linear(pixel_shuffle(x, *grid, s, P), w)


def _rows(mode, x, w, shuffled, grad_y, grid, s, dtype):
    def timed(f, a):
        if mode == "fwd":
            return functools.partial(f, a, w)
        a, wg = a.detach().requires_grad_(), w.detach().requires_grad_()
        return lambda: torch.autograd.grad(f(a, wg), (a, wg), grad_y)

    rows = {}
    for backend in speed_backends():
        if backend == "reference" and dtype != "float32":
            continue  # it computes in fp32: no information in a bf16 row

        def fused(x, w, backend=backend):
            with dinofast.backend(backend):
                return dinofast.pixel_shuffle_project(x, w, grids=grid, factor=s, num_prefix_tokens=P)
        rows[backend] = timed(fused, x)
    rows["eager reshape+Linear"] = timed(lambda x, w: eager(x, w, grid, s), x)
    rows["GEMM floor"] = timed(torch.nn.functional.linear, shuffled)
    return rows


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", _shapes(), ids=lambda t: "-".join(map(str, t)))
def test_pixel_shuffle_project(benchmark, shape, dtype):
    mode, D, out, s, res, B = shape
    x, w, shuffled, grad_y, grid = inputs(D, out, s, res, B, dtype)
    benchmark.group = f"pixel_shuffle_project {mode} D={D} out={out} s={s} {res} B={B} {dtype}"
    rows = _rows(mode, x, w, shuffled, grad_y, grid, s, dtype)
    medians = interleaved(rows, ROUNDS, clock=time.thread_time if THREAD_CLOCK else time.perf_counter)
    floor, eager_s = medians["GEMM floor"], medians["eager reshape+Linear"]
    clock = "thread CPU time" if THREAD_CLOCK else "wall time"
    lines = [f"{benchmark.group}, {THREADS} threads, {ROUNDS} interleaved rounds, {clock}"]
    for name, sec in medians.items():
        lines.append(f"  {name:22s} {sec * 1e3:9.3f} ms  {sec / floor:5.3f}x floor  {sec / eager_s:5.3f}x eager")
    print("\n".join(lines))
    benchmark.extra_info.update(threads=THREADS, rounds=ROUNDS, clock=clock,
                                medians_ms={n: t * 1e3 for n, t in medians.items()})
    benchmark.pedantic(lambda: [fn() for fn in rows.values()], rounds=1, iterations=1)
