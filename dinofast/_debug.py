"""The debug switch for value checks on device metadata.

The ops never read cu_seqlens / grids / out_cu_seqlens back to the host on their own (on CUDA that
is a host sync: it stalls the pipeline and breaks CUDA graphs). Their values are checked against
a host `PackedLayout` when the caller gives one, by the C++/CUDA kernels' own checks, and, with the
switch on (`DINOFAST_DEBUG_CHECKS=1` or `with dinofast.debug_checks():`), by reading the device
tensors here: the only place in the op path that copies metadata to the host.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, List, Optional, Tuple

import torch

ENV_VAR = "DINOFAST_DEBUG_CHECKS"

_forced: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("dinofast_debug_checks", default=None)


# os.environ.get encodes the key on every call (~0.6 us, paid by every op call); the mapping's
# encoded store is read directly when it is there (os.environ updates it on every assignment).
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else None


def enabled() -> bool:
    """True when the ops should read device metadata and check its values."""
    forced = _forced.get()
    if forced is not None:
        return forced
    if _ENV_DATA is not None and _ENV_KEY is not None:
        value = _ENV_DATA.get(_ENV_KEY)
        return value is not None and value not in (b"", b"0", "", "0")
    return os.environ.get(ENV_VAR, "0") not in ("", "0")


@contextlib.contextmanager
def debug_checks(on: bool = True) -> Iterator[None]:
    """Within this block, every dinofast op reads its device metadata (cu_seqlens, grids, ...) back
    to the host and raises a ValueError on bad values (a host sync per call: for debugging only).
    `debug_checks(False)` turns the checks off even when DINOFAST_DEBUG_CHECKS=1."""
    token = _forced.set(bool(on))
    try:
        yield
    finally:
        _forced.reset(token)


def read_device_metadata(cu_seqlens: torch.Tensor, grids: Optional[torch.Tensor] = None,
                         ) -> Tuple[List[int], Optional[List[Tuple[int, int]]]]:
    """Host copies of cu_seqlens [n+1] and grids [n, 2] (a host sync on CUDA). Debug checks only."""
    cu = cu_seqlens.tolist()
    hw = None if grids is None else [(h, w) for h, w in grids.tolist()]
    return cu, hw


def read_device_ints(t: torch.Tensor) -> List[int]:
    """Host copy of a 1-D int tensor (a host sync on CUDA). Debug checks only."""
    return t.tolist()


def check_device_metadata(cu_seqlens: torch.Tensor, grids: Optional[torch.Tensor], total: int,
                          num_prefix_tokens: int, layout=None, max_seqlen: Optional[int] = None) -> None:
    """Under the switch: the values of cu_seqlens (and grids) read back and checked alone, against
    each other, against max_seqlen, and against the caller's host PackedLayout when there is one."""
    from dinofast import _validate as V

    cu, hw = read_device_metadata(cu_seqlens, grids)
    V.check_packed_values(cu, hw, total, num_prefix_tokens)
    if max_seqlen is not None:
        V.check_max_seqlen(max_seqlen, V.max_len(cu))
    if layout is None:
        return
    if tuple(cu) != layout.cu_seqlens:
        V.fail("layout", f"the values of cu_seqlens {cu}", f"layout.cu_seqlens = {list(layout.cu_seqlens)}")
    if hw is not None and layout.grids is not None and tuple(hw) != layout.grids:
        V.fail("layout", f"the values of grids {hw}", f"layout.grids = {list(layout.grids)}")



def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Under the switch: two int tensors hold the same values (read back)."""
    return b.shape == a.shape and read_device_ints(b) == read_device_ints(a)
