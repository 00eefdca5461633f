"""Shared benchmark helpers: `pytest benchmarks/ --benchmark-only`.

Each op's file benchmarks every backend available on the device (the Triton interpreter is left
out on CPU: it is for correctness, not speed) beside its baselines, one pytest-benchmark group per
shape so that rows measured side by side sit together.
"""
import contextlib
import time

import pytest
import torch

import dinofast
from dinofast import _backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def speed_backends():
    """The backends worth timing on DEVICE."""
    return [b for b in _backend.available_backends(DEVICE.type) if not (b == "triton" and DEVICE.type != "cuda")]


def _synced(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


@pytest.fixture
def bench(benchmark):
    """bench(fn, group, backend=None): time fn (under `backend` when given) in `group`.

    One untimed call warms up (compilation, caches) and sizes the run: about half a second of
    rounds, at least 5 and at most 200."""
    def run(fn, group: str, backend=None):
        benchmark.group = group
        fn = _synced(fn)
        with dinofast.backend(backend) if backend else contextlib.nullcontext():
            t0 = time.perf_counter()
            fn()
            once = time.perf_counter() - t0
            rounds = max(5, min(200, int(0.5 / max(once, 1e-6))))
            return benchmark.pedantic(fn, rounds=rounds, iterations=1)
    return run
