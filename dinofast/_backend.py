"""Backend choice for every dinofast op, in one table.

An op hands `dispatch` a dict {backend name: implementation}; the device of its inputs, the
`DINOFAST_BACKEND` environment variable or an enclosing `with dinofast.backend(...)` decide which
one runs. Nothing else in the package chooses a backend.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings
from typing import Callable, Dict, Iterator, Optional

import torch

# A _C built from other op schemas is treated as missing (setup.py compiles the same number in).
from dinofast._abi import C_ABI_VERSION

BACKENDS = ("reference", "triton", "cpp", "cuda")

# Automatic choice, by the device type of the inputs: the first available backend wins.
PREFERENCE = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpp", "reference"),
}

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("dinofast_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A backend was forced that cannot run here (not built, wrong device, no triton)."""


@functools.lru_cache(maxsize=None)
def load_C():
    """Return the compiled extension, or None (with one warning) when it is missing or stale."""
    try:
        from dinofast import _C
    except (ImportError, OSError) as err:
        warnings.warn(
            f"dinofast._C could not be loaded ({err}); the cpp/cuda backends are off. Rebuild with "
            "`pip install --no-build-isolation -e .` against the installed torch.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    built_abi, built_torch = _C.abi_version(), _C.torch_version()
    if built_abi != C_ABI_VERSION or built_torch != torch.__version__:
        warnings.warn(
            f"dinofast._C is stale (built for ABI {built_abi}, torch {built_torch}; this is ABI "
            f"{C_ABI_VERSION}, torch {torch.__version__}); the cpp/cuda backends are off. Rebuild with "
            "`pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _C


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(name: str, device_type: str) -> Optional[str]:
    """None when backend `name` can run on tensors of `device_type`, else the reason."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; expected one of {BACKENDS}"
    if name == "reference":
        return None
    if name == "triton":
        if not _triton_importable():
            return "triton is not installed"
        if device_type == "cuda":
            return None
        if device_type == "cpu" and triton_interpreted():
            return None
        return f"triton runs {device_type} tensors only under TRITON_INTERPRET=1 (set before importing dinofast)"
    C = load_C()
    if C is None:
        return "dinofast._C is not built or is stale"
    if name == "cpp":
        return None if device_type == "cpu" else f"the cpp backend runs CPU tensors, got {device_type}"
    # cuda
    if not C.with_cuda():
        return "dinofast._C was built without CUDA"
    return None if device_type == "cuda" else f"the cuda backend runs CUDA tensors, got {device_type}"


def available_backends(device_type: str) -> list:
    return [b for b in BACKENDS if why_unavailable(b, device_type) is None]


def forced_backend() -> Optional[str]:
    name = _forced.get() or os.environ.get("DINOFAST_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"DINOFAST_BACKEND / dinofast.backend: expected one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: Optional[str]) -> Iterator[None]:
    """Force backend `name` for every dinofast op in this block (None restores automatic choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def select(impls: Dict[str, Callable], device: torch.device, op: str) -> str:
    """The backend that runs `op` for inputs on `device`."""
    name = forced_backend()
    if name is not None:
        reason = why_unavailable(name, device.type)
        if reason is None and name not in impls:
            reason = f"{op} has no {name} implementation"
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {name!r} was forced but is unavailable: {reason}")
        return name
    for name in PREFERENCE.get(device.type, ("reference",)):
        if name in impls and why_unavailable(name, device.type) is None:
            return name
    raise BackendUnavailableError(f"{op}: no backend runs on {device.type} tensors")


# Tests set this so that every output buffer starts as NaN: an element a kernel forgets to write
# then fails the parity check instead of passing by luck.
POISON_OUTPUTS = False


def empty_output(like: torch.Tensor, shape=None) -> torch.Tensor:
    """The allocator of every op's output buffers (empty_like keeps like's strides)."""
    out = torch.empty_like(like) if shape is None else like.new_empty(shape)
    if POISON_OUTPUTS and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def dispatch(impls: Dict[str, Callable], device: torch.device, op: str) -> Callable:
    return impls[select(impls, device, op)]
