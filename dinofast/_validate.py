"""Input checks shared by every op: each failure is a ValueError naming the argument, what was
expected and what came.

Two kinds of checks: `check_*` look only at shapes/dtypes/devices and are safe under torch.compile
tracing; `read_packed` reads the values of cu_seqlens/grids (a host sync on CUDA) and is called
inside the custom ops, where tensors are real.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def fail(arg: str, expected: str, got) -> None:
    raise ValueError(f"{arg}: expected {expected}, got {got}")


def check_tensor(t, arg: str, *, ndim: Optional[int] = None, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        fail(arg, "a torch.Tensor", type(t).__name__)
    if ndim is not None and t.dim() != ndim:
        fail(arg, f"a {ndim}-D tensor", f"shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        fail(arg, "dtype in " + ", ".join(str(d).replace("torch.", "") for d in dtypes), t.dtype)


def check_same(ref: torch.Tensor, ref_arg: str, other: torch.Tensor, arg: str, *, shape=True) -> None:
    if other.dtype != ref.dtype:
        fail(arg, f"dtype {ref.dtype} (as {ref_arg})", other.dtype)
    if other.device != ref.device:
        fail(arg, f"device {ref.device} (as {ref_arg})", other.device)
    if shape and other.shape != ref.shape:
        fail(arg, f"shape {tuple(ref.shape)} (as {ref_arg})", tuple(other.shape))


def check_head_dim(D: int, arg: str, *, multiple: int = 4, maximum: int = 256) -> None:
    if D % multiple != 0 or not (0 < D <= maximum):
        fail(arg, f"head dim a multiple of {multiple} in [{multiple}, {maximum}]", D)


def check_finite(x: float, arg: str) -> None:
    if not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        fail(arg, "a finite positive number", x)


def check_nonneg_int(x, arg: str) -> None:
    if not isinstance(x, int) or isinstance(x, bool) or x < 0:
        fail(arg, "a non-negative int", x)


def check_grid(grid, arg: str = "grids") -> Tuple[int, int]:
    """A batched grid: (Hp, Wp), two positive ints."""
    if isinstance(grid, torch.Tensor):
        grid = tuple(int(v) for v in grid.tolist())
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid)
    ):
        fail(arg, "(Hp, Wp), two positive ints", grid)
    return int(grid[0]), int(grid[1])


def check_packed_meta(cu_seqlens, grids, total: int, device: torch.device) -> int:
    """Shape/dtype/device of packed metadata; returns the number of images n."""
    check_tensor(cu_seqlens, "cu_seqlens", ndim=1, dtypes=(torch.int32,))
    if cu_seqlens.numel() < 2:
        fail("cu_seqlens", "int32 [n+1] with n >= 1", f"shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        fail("cu_seqlens", f"device {device}", cu_seqlens.device)
    n = cu_seqlens.numel() - 1
    check_tensor(grids, "grids", ndim=2, dtypes=(torch.int32,))
    if grids.shape != (n, 2):
        fail("grids", f"int32 [n, 2] with n = {n} (len(cu_seqlens) - 1)", f"shape {tuple(grids.shape)}")
    if grids.device != device:
        fail("grids", f"device {device}", grids.device)
    return n


def read_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> List[int]:
    """Host copy of cu_seqlens, checked: starts at 0, non-decreasing, ends at `total`."""
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        fail("cu_seqlens", "cu_seqlens[0] == 0", cu[0])
    for i in range(len(cu) - 1):
        if cu[i + 1] < cu[i]:
            fail("cu_seqlens", "non-decreasing values", f"cu_seqlens[{i}]={cu[i]} > cu_seqlens[{i + 1}]={cu[i + 1]}")
    if cu[-1] != total:
        fail("cu_seqlens", f"cu_seqlens[-1] == {total} (total tokens)", cu[-1])
    return cu


def read_packed(
    cu_seqlens: torch.Tensor, grids: torch.Tensor, total: int, num_prefix_tokens: int
) -> Tuple[List[int], List[Tuple[int, int]]]:
    """Host copies of cu_seqlens and grids, checked against each other: every segment holds
    num_prefix_tokens + Hp*Wp tokens."""
    cu = read_cu_seqlens(cu_seqlens, total)
    hw = [tuple(g) for g in grids.tolist()]
    for i, (hp, wp) in enumerate(hw):
        if hp <= 0 or wp <= 0:
            fail("grids", f"positive (Hp, Wp) for image {i}", (hp, wp))
        if cu[i + 1] - cu[i] != num_prefix_tokens + hp * wp:
            fail(
                "cu_seqlens",
                f"segment {i} of num_prefix_tokens + Hp*Wp = {num_prefix_tokens} + {hp}*{wp} = "
                f"{num_prefix_tokens + hp * wp} tokens",
                cu[i + 1] - cu[i],
            )
    return cu, hw


def max_len(cu: Sequence[int]) -> int:
    return max(b - a for a, b in zip(cu[:-1], cu[1:]))


def check_cu_seqlens(cu_seqlens, device: torch.device) -> int:
    """cu_seqlens: int32 [n+1], n >= 1, on `device`; returns n (values: read_cu_seqlens)."""
    check_tensor(cu_seqlens, "cu_seqlens", ndim=1, dtypes=(torch.int32,))
    if cu_seqlens.numel() < 2:
        fail("cu_seqlens", "int32 [n+1] with n >= 1", f"shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        fail("cu_seqlens", f"device {device}", cu_seqlens.device)
    return cu_seqlens.numel() - 1
