"""Input checks shared by every op: each failure is a ValueError naming the argument, what was
expected and what came.

Checks look at shapes/dtypes/devices (safe under torch.compile tracing, free on any device) or at
host values (Python ints: a dinofast.PackedLayout, or what the debug switch read back, see
dinofast._debug). Nothing here reads a device tensor.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

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
    # chained comparisons, not math.isfinite: traceable by torch.compile when x is symbolic (NaN fails both)
    if not isinstance(x, (int, float)) or not (0 < x < math.inf):
        fail(arg, "a finite positive number", x)


def check_nonneg_int(x, arg: str) -> None:
    if not isinstance(x, int) or isinstance(x, bool) or x < 0:
        fail(arg, "a non-negative int", x)


def check_positive_int(x, arg: str) -> None:
    if not isinstance(x, int) or isinstance(x, bool) or x <= 0:
        fail(arg, "a positive int", x)


def check_grid(grid, arg: str = "grids") -> Tuple[int, int]:
    """A batched grid: (Hp, Wp), two positive Python ints (a tensor would need a host sync)."""
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid)
    ):
        fail(arg, "(Hp, Wp), two positive Python ints", grid)
    return int(grid[0]), int(grid[1])


def check_packed_meta(cu_seqlens, grids, total: int, device: torch.device, n: Optional[int] = None) -> int:
    """Shape/dtype/device of packed metadata; returns the number of images n (n: cu_seqlens
    already checked, holding n+1 values)."""
    if n is None:
        n = check_cu_seqlens(cu_seqlens, device)
    check_tensor(grids, "grids", ndim=2, dtypes=(torch.int32,))
    if grids.shape != (n, 2):
        fail("grids", f"int32 [n, 2] with n = {n} (len(cu_seqlens) - 1)", f"shape {tuple(grids.shape)}")
    if grids.device != device:
        fail("grids", f"device {device}", grids.device)
    return n


# Value checks on host copies (Python ints): a PackedLayout given by the caller, or, under the debug
# switch, what dinofast._debug read back from the device tensors. Never a device read here.
def check_cu_values(cu: Sequence[int], total: int, arg: str = "cu_seqlens") -> None:
    """cu: starts at 0, non-decreasing, ends at `total`."""
    if cu[0] != 0:
        fail(arg, f"{arg}[0] == 0", cu[0])
    for i in range(len(cu) - 1):
        if cu[i + 1] < cu[i]:
            fail(arg, "non-decreasing values", f"{arg}[{i}]={cu[i]} > {arg}[{i + 1}]={cu[i + 1]}")
    if cu[-1] != total:
        fail(arg, f"{arg}[-1] == {total} (total tokens)", cu[-1])


def check_grid_values(cu: Sequence[int], hw: Sequence[Tuple[int, int]], num_prefix_tokens: int,
                      arg: str = "cu_seqlens", grids_arg: str = "grids") -> None:
    """Every grid positive and segment i holding num_prefix_tokens + Hp*Wp tokens."""
    for i, (hp, wp) in enumerate(hw):
        if hp <= 0 or wp <= 0:
            fail(grids_arg, f"positive (Hp, Wp) for image {i}", (hp, wp))
        if cu[i + 1] - cu[i] != num_prefix_tokens + hp * wp:
            fail(
                arg,
                f"segment {i} of num_prefix_tokens + Hp*Wp = {num_prefix_tokens} + {hp}*{wp} = "
                f"{num_prefix_tokens + hp * wp} tokens",
                cu[i + 1] - cu[i],
            )


def check_packed_values(cu: Sequence[int], hw: Optional[Sequence[Tuple[int, int]]], total: int,
                        num_prefix_tokens: int) -> None:
    """Host copies of cu_seqlens and (when given) grids, checked alone and against each other."""
    check_cu_values(cu, total)
    if hw is not None:
        check_grid_values(cu, hw, num_prefix_tokens)


def check_max_seqlen(max_seqlen: int, longest: int, where: str = "") -> None:
    if max_seqlen < longest:
        fail("max_seqlen", f">= the longest segment ({longest} tokens{where})", max_seqlen)


def max_len(cu: Sequence[int]) -> int:
    return max(b - a for a, b in zip(cu[:-1], cu[1:]))


def check_cu_seqlens(cu_seqlens, device: torch.device) -> int:
    """cu_seqlens: int32 [n+1], n >= 1, on `device`; returns n (values: check_cu_values)."""
    check_tensor(cu_seqlens, "cu_seqlens", ndim=1, dtypes=(torch.int32,))
    if cu_seqlens.numel() < 2:
        fail("cu_seqlens", "int32 [n+1] with n >= 1", f"shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        fail("cu_seqlens", f"device {device}", cu_seqlens.device)
    return cu_seqlens.numel() - 1
