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


def backend_params(exclude=()):
    """All backends (but `exclude`), each skipped with its reason where it cannot run on DEVICE."""
    params = []
    for name in dinofast.BACKENDS:
        if name in exclude:
            continue
        reason = _backend.why_unavailable(name, DEVICE.type)
        marks = [pytest.mark.skip(reason=f"{name} on {DEVICE.type}: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=backend_params())
def backend_name(request):
    with dinofast.backend(request.param):
        yield request.param


@pytest.fixture(params=backend_params(exclude=("reference",)))
def kernel_backend(request):
    """Every backend but the reference: the reference backend runs the oracle's own code, so a parity
    test of it against the oracle could not fail. The reference is tested against independent
    oracles instead (transformers, dense masked SDPA, nanoVLM's formula, finite differences)."""
    with dinofast.backend(request.param):
        yield request.param


def skip_unless_available(backend: str, device: str = "cpu") -> None:
    """pytest.skip with the backend's own reason where it cannot run on `device`."""
    reason = _backend.why_unavailable(backend, device)
    if reason:
        pytest.skip(reason=f"{backend} on {device}: {reason}")


def value_error_test(cases):
    """A test, parametrized over `cases()` (a list of (regex, call)), that each call raises a ValueError
    matching its regex. Python validation runs before dispatch: once, not once per backend."""
    @pytest.mark.parametrize("case", range(len(cases())))
    def test(case):
        pattern, call = cases()[case]
        with pytest.raises(ValueError, match=pattern):
            call()
    return test


needs_C = pytest.mark.skipif(_backend.load_C() is None, reason="dinofast._C is not built")


def assert_compiles_like_eager(f, inputs) -> None:
    """f(*inputs) (a scalar) and its gradients w.r.t. every input: torch.compile(fullgraph=True)
    equal to eager. aot_eager traces the ops' fake and autograd registrations into one graph, which is
    what breaks a fullgraph compile; Inductor's own codegen is not under test."""
    eager_in = [t.clone().requires_grad_() for t in inputs]
    eager = f(*eager_in)
    eager.backward()
    compiled_in = [t.clone().requires_grad_() for t in inputs]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*compiled_in)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for c, e in zip(compiled_in, eager_in):
        torch.testing.assert_close(c.grad, e.grad)


# Low-precision attention, flash-attention's rule: the error of a backend against the fp64 oracle
# at most twice that of the same computation in PyTorch in the input dtype (plus an fp32 floor).
FLASH_RULE_FACTOR, FLASH_RULE_FLOOR = 2.0, 1e-5
# Gradients of fp16/bf16 inputs from the backends that accumulate in fp32 and round once (reference,
# cpp): within 5e-3 absolute plus one rounding of the dtype, against the fp64 oracle.
GRAD_FP32_ACCUM_ATOL = 5e-3


def assert_flash_rule(actual: torch.Tensor, oracle: torch.Tensor, baseline: torch.Tensor):
    """max|actual - oracle| <= 2 * max|baseline - oracle| + 1e-5; baseline: PyTorch's computation of
    the same thing in actual's dtype; oracle in fp64."""
    a, o, b = actual.double(), oracle.double(), baseline.double()
    assert not torch.isnan(a).any(), "output holds NaN: an element was left unwritten (outputs are poisoned)"
    err, base = (a - o).abs().max().item(), (b - o).abs().max().item()
    assert err <= FLASH_RULE_FACTOR * base + FLASH_RULE_FLOOR, f"max abs err {err:.3g} > 2 x PyTorch's {base:.3g}"


def assert_nan_like(actual: torch.Tensor, expected: torch.Tensor):
    """NaN exactly where the reference has NaN; elsewhere finite or equal infinities."""
    assert torch.equal(actual.isnan(), expected.isnan()), (
        f"NaN at {actual.isnan().sum().item()} elements, the reference at {expected.isnan().sum().item()}")


def make_cu_seqlens(lengths, device=DEVICE) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)


def randn(*shape, dtype=torch.float32, device=DEVICE, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def with_debug_checks(call):
    """call() under dinofast.debug_checks(): for bad values in device metadata, which the ops read
    back (and so can raise a ValueError about) only when the debug switch is on."""
    def run():
        with dinofast.debug_checks():
            return call()
    return run
