"""Self-checks behind `python -m dinofast`: for each op, every backend available on the device
against the reference on random data (max abs error) and its median time.

Each op adds one function decorated with @check("name"), returning (inputs builder, runner):
the same shape of code for every op, so the report reads the same.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch

from dinofast import _backend

CHECKS: Dict[str, Callable] = {}


def check(name: str):
    def register(fn):
        CHECKS[name] = fn
        return fn
    return register


def median_ms(fn: Callable, device: torch.device, repeat: int = 5) -> float:
    fn()  # warm-up (compilation, caches)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compare_backends(run: Callable, device: torch.device) -> List[dict]:
    """run() -> tensor or tuple of tensors under the current backend; rows per available backend."""
    def flat(out):
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return torch.cat([o.detach().double().flatten() for o in outs])

    with _backend.backend("reference"):
        want = flat(run())
        ref_ms = median_ms(run, device)
    rows = []
    for name in _backend.available_backends(device.type):
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter is for tests, not for a speed table
        if name == "reference":
            rows.append(dict(backend=name, max_abs_err=0.0, ms=ref_ms, speedup=1.0))
            continue
        with _backend.backend(name):
            try:
                err = (flat(run()) - want).abs().max().item()
                ms = median_ms(run, device)
            except _backend.BackendUnavailableError:
                continue
        rows.append(dict(backend=name, max_abs_err=err, ms=ms, speedup=ref_ms / ms))
    return rows


@check("rope2d")
def check_rope2d(device: torch.device) -> List[dict]:
    from dinofast.ops.rope2d import rope2d

    B, H, Hp, Wp, P, D = 2, 12, 48, 32, 5, 64  # a 768x512 image, ViT-B heads
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, P + Hp * Wp, H, D, generator=g).to(device).transpose(1, 2)
    k = torch.randn(B, P + Hp * Wp, H, D, generator=g).to(device).transpose(1, 2)
    return compare_backends(lambda: rope2d(q, k, (Hp, Wp), num_prefix_tokens=P), device)


def report(device: torch.device) -> str:
    lines = [f"dinofast on {device.type}: backends available: {', '.join(_backend.available_backends(device.type))}"]
    for name in dinofast_backends_unavailable(device):
        lines.append(f"  (not available: {name})")
    for op, fn in CHECKS.items():
        lines.append(f"\n{op}: parity with the reference and median time on random data")
        lines.append(f"  {'backend':<10} {'max abs err':>12} {'ms':>9} {'vs reference':>13}")
        for r in fn(device):
            lines.append(f"  {r['backend']:<10} {r['max_abs_err']:>12.2e} {r['ms']:>9.3f} {r['speedup']:>12.2f}x")
    return "\n".join(lines)


def dinofast_backends_unavailable(device: torch.device) -> List[str]:
    out = []
    for name in _backend.BACKENDS:
        why = _backend.why_unavailable(name, device.type)
        if why:
            out.append(f"{name}: {why}")
    return out
