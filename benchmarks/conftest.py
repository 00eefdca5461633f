"""Shared benchmark helpers: `pytest benchmarks/ --benchmark-only`.

Each op's file benchmarks every backend available on the device (the Triton interpreter is left
out on CPU: it is for correctness, not speed) beside its baselines, one pytest-benchmark group per
shape so that rows measured side by side sit together.
"""
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
    """bench(fn, group, backend=None): time fn (under `backend` when given) in `group`."""
    def run(fn, group: str, backend=None, rounds: int = None):
        benchmark.group = group
        fn = _synced(fn)
        if backend is None:
            return benchmark.pedantic(fn, warmup_rounds=1, rounds=rounds or 5, iterations=1)
        with dinofast.backend(backend):
            return benchmark.pedantic(fn, warmup_rounds=1, rounds=rounds or 5, iterations=1)
    return run
