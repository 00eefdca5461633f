"""Shared fixtures, tolerances and helpers for every op's tests.

Triton kernels run in the interpreter on machines without a GPU: TRITON_INTERPRET must be set
before any kernel module is imported, so it is set here, first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import dinofast  # noqa: E402
from dinofast import _backend  # noqa: E402

settings.register_profile(
    "dinofast", deadline=None, max_examples=12, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("dinofast")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# fp32: a backend against the fp32 reference. fp16/bf16: against the fp64 reference computed from
# the same (rounded) inputs; rtol is one unit in the last place of the dtype, which covers the
# final rounding of an fp32-accurate result.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=0.0),
    torch.float16: dict(atol=1e-5, rtol=2.0**-10),
    torch.bfloat16: dict(atol=1e-4, rtol=2.0**-7),
    torch.float64: dict(atol=1e-10, rtol=0.0),
    # Attention on tensor cores (triton/cuda fp16/bf16) rounds the rotated Q/K tiles and the
    # probabilities P to the input dtype before the dots, as flash-attention does: a few units in
    # the last place of the dtype relative to |v| ~ 1, not one rounding of an fp32-exact result.
    "attention:float16": dict(atol=4e-3, rtol=2.0**-10),
    "attention:bfloat16": dict(atol=3e-2, rtol=2.0**-7),
}

# Whole models: patched / packed DINOv3 against transformers in fp32, max abs difference
# of outputs of order 1 after several layers (summation order differs: fused qkv GEMM, fused rope).
MODEL_ATOL = 1e-4


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None, scale: float = 1.0):
    """actual (any dtype) against expected (compared in fp64) within TOL[dtype] (times scale)."""
    tol = TOL[dtype or actual.dtype]
    a, e = actual.double(), expected.double()
    assert not torch.isnan(a).any(), "output holds NaN: an element was left unwritten (outputs are poisoned)"
    err = (a - e).abs()
    bound = scale * (tol["atol"] + tol["rtol"] * e.abs())
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"max abs err {err.max().item():.3g}; worst at flat index {worst.item()}: "
        f"got {a.flatten()[worst].item()}, expected {e.flatten()[worst].item()}")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every op output buffer starts as NaN (see dinofast._backend.empty_output)."""
    monkeypatch.setattr(_backend, "POISON_OUTPUTS", True)


def backend_params():
    """All backends, each skipped with its reason where it cannot run on DEVICE."""
    params = []
    for name in dinofast.BACKENDS:
        reason = _backend.why_unavailable(name, DEVICE.type)
        marks = [pytest.mark.skip(reason=f"{name} on {DEVICE.type}: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=backend_params())
def backend_name(request):
    with dinofast.backend(request.param):
        yield request.param


def make_cu_seqlens(lengths, device=DEVICE) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)


def randn(*shape, dtype=torch.float32, device=DEVICE, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
