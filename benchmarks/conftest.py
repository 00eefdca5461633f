"""Shared benchmark helpers: `pytest benchmarks/ --benchmark-only`.

Each op's file benchmarks every backend available on the device (the Triton interpreter is left
out on CPU: it is for correctness, not speed) beside its baselines, one pytest-benchmark group per
shape so that rows measured side by side sit together.
"""
import contextlib
import os
import time

import pytest
import torch

import dinofast
from dinofast import _backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# A fixed CPU thread count (DINOFAST_BENCH_THREADS, default 2): ratios are only comparable at one.
THREADS = int(os.environ.get("DINOFAST_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)
print(f"benchmarks: torch threads = {torch.get_num_threads()} (DINOFAST_BENCH_THREADS)")


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


def interleaved(rows: dict, rounds: int, *, before=None, clock=time.perf_counter) -> dict:
    """Median seconds of each row of `rows` (name -> callable), timing one call of every row per
    round, round after round: a load spike on a shared machine hits every row alike, so the ratios
    between rows survive it. One untimed call per row first (compilation, caches). `before`, when
    given, is called untimed before every timed call (to put every row in the same starting state).
    `clock`: time.thread_time measures the work of a 1-thread CPU run without the time it waits for a core."""
    rows = {name: _synced(fn) for name, fn in rows.items()}
    for fn in rows.values():
        fn()
    times = {name: [] for name in rows}
    for _ in range(rounds):
        for name, fn in rows.items():
            if before is not None:
                before()
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
