"""Self-checks behind `python -m dinofast` / `dinofast check`: for each op, every backend available
on the device against the reference on random data: the shapes and dtype checked, the tolerance,
the max abs error, PASS/FAIL and the median time.

Each op adds one function decorated with @check("name", atol=...), returning (what it checks, rows
from compare_backends): the same shape of code for every op, so the report reads the same.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from dinofast import _backend

# name -> (function(device) -> (description, rows), atol)
CHECKS: Dict[str, Tuple[Callable, float]] = {}


def check(name: str, atol: float):
    """Register an op's check; atol bounds max |backend - reference| (fp32 inputs, fp32 reference:
    only summation order may differ)."""
    def register(fn):
        CHECKS[name] = (fn, atol)
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
    """run() -> tensor or tuple of tensors under the current backend; rows per available backend.
    A backend that raises gets a row with its error (and fails); NaN makes max_abs_err NaN (fails)."""
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
                got = flat(run())
                err = (got - want).abs().max().item() if got.shape == want.shape else math.inf
                if torch.isnan(got).any():
                    err = math.nan
                ms = median_ms(run, device)
            except _backend.BackendUnavailableError:
                continue
            except Exception as e:  # a broken backend is a FAIL row, not a crash of the report
                rows.append(dict(backend=name, max_abs_err=math.nan, ms=math.nan, speedup=math.nan,
                                 error=f"{type(e).__name__}: {e}".splitlines()[0]))
                continue
        rows.append(dict(backend=name, max_abs_err=err, ms=ms, speedup=ref_ms / ms))
    return rows


@check("rope2d", atol=1e-5)
def check_rope2d(device: torch.device) -> List[dict]:
    from dinofast.ops.rope2d import rope2d

    B, H, Hp, Wp, P, D = 2, 12, 48, 32, 5, 64  # a 768x512 image, ViT-B heads
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, P + Hp * Wp, H, D, generator=g).to(device).transpose(1, 2)
    k = torch.randn(B, P + Hp * Wp, H, D, generator=g).to(device).transpose(1, 2)
    what = f"q, k [{B}, {H}, {P + Hp * Wp}, {D}] float32, grid {Hp}x{Wp}, {P} prefix tokens"
    return what, compare_backends(lambda: rope2d(q, k, (Hp, Wp), num_prefix_tokens=P), device)


@check("varlen_attention", atol=1e-4)
def check_varlen_attention(device: torch.device) -> List[dict]:
    from dinofast.ops.rope2d import RopeSpec
    from dinofast.ops.varlen_attention import varlen_attention

    H, D, P = 12, 64, 5
    grids = torch.tensor([(14, 14), (32, 24), (48, 32)], dtype=torch.int32)  # 224x224, 512x384, 768x512
    lengths = [P + h * w for h, w in grids.tolist()]
    cu = torch.tensor([0] + [sum(lengths[: i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(cu[-1].item(), H, D, generator=g).to(device) for _ in range(3))
    rope = RopeSpec(grids.to(device), P)
    what = (f"q, k, v [{sum(lengths)}, {H}, {D}] float32, {len(lengths)} images packed "
            f"(grids {', '.join(f'{h}x{w}' for h, w in grids.tolist())}), fused RoPE")
    return what, compare_backends(lambda: varlen_attention(q, k, v, cu.to(device), max(lengths), rope=rope), device)


@check("pixel_shuffle_project", atol=1e-4)
def check_pixel_shuffle_project(device: torch.device) -> List[dict]:
    from dinofast.ops.pixel_shuffle_project import pixel_shuffle_project

    B, Hp, Wp, P, D, s, out = 2, 40, 60, 5, 768, 4, 960  # 640x960 images, ViT-B, nanoVLM's LM width
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, P + Hp * Wp, D, generator=g).to(device)
    w = (torch.randn(out, D * s * s, generator=g) / (D * s * s) ** 0.5).to(device)
    what = f"x [{B}, {P + Hp * Wp}, {D}] float32, weight [{out}, {D * s * s}], grid {Hp}x{Wp}, factor {s}"
    return what, compare_backends(lambda: pixel_shuffle_project(x, w, grids=(Hp, Wp), factor=s, num_prefix_tokens=P),
                                  device)


def run_checks(device: torch.device, ops: Optional[Sequence[str]] = None) -> Tuple[str, List[str]]:
    """The report text and the failures ("op/backend: why"), for `ops` (default: every op)."""
    ops = list(CHECKS) if ops is None else list(ops)
    lines = [f"dinofast on {device.type}: backends available: {', '.join(_backend.available_backends(device.type))}"]
    for name in dinofast_backends_unavailable(device):
        lines.append(f"  (not available: {name})")
    failures = []
    for op in ops:
        fn, atol = CHECKS[op]
        what, rows = fn(device)
        lines.append(f"\n{op}: {what}; each backend against the reference, PASS if max abs err <= {atol:.0e}")
        lines.append(f"  {'backend':<10} {'max abs err':>12} {'verdict':>8} {'ms':>9} {'vs reference':>13}")
        for r in rows:
            ok = r["max_abs_err"] <= atol  # False for NaN
            verdict = "PASS" if ok else "FAIL"
            if not ok:
                failures.append(f"{op}/{r['backend']}: "
                                + r.get("error", f"max abs err {r['max_abs_err']:.2e} > {atol:.0e}"))
            lines.append(f"  {r['backend']:<10} {r['max_abs_err']:>12.2e} {verdict:>8} {r['ms']:>9.3f} "
                         f"{r['speedup']:>12.2f}x" + (f"  {r['error']}" if "error" in r else ""))
    lines.append("")
    lines.append(f"FAIL: {len(failures)} check(s): " + "; ".join(failures) if failures else
                 f"PASS: every available backend of {len(ops)} op(s) matches the reference")
    return "\n".join(lines), failures


def report(device: torch.device) -> str:
    return run_checks(device)[0]


def dinofast_backends_unavailable(device: torch.device) -> List[str]:
    out = []
    for name in _backend.BACKENDS:
        why = _backend.why_unavailable(name, device.type)
        if why:
            out.append(f"{name}: {why}")
    return out
