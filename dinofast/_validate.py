"""Input checks shared by every op: each failure is a ValueError naming the argument, what was
expected and what came.

Checks look at shapes/dtypes/devices (safe under torch.compile tracing, free on any device) or at
host values (Python ints: a dinofast.PackedLayout, or what the debug switch read back, see
dinofast._debug). Nothing here reads a device tensor.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake

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


# ---------------------------------------------------------------------------------------------
# Aliasing, periods, strides: checks on metadata only (no device read), except where noted.
# ---------------------------------------------------------------------------------------------
def _dims(t: torch.Tensor) -> List[Tuple[int, int]]:
    """(stride, size) of the dims that matter for addressing (size > 1), by stride ascending."""
    return sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1)


def _nested(dims: List[Tuple[int, int]]) -> bool:
    """Every stride beyond the span of the smaller ones: then distinct indices give distinct
    addresses, and an offset has at most one decomposition per sign pattern (searched below)."""
    span = 0
    for st, n in dims:
        if st <= span:
            return False
        span += (n - 1) * st
    return True


def _reachable(delta: int, dims: List[Tuple[int, int]]) -> bool:
    """Whether delta = sum_d i_d * stride_d for some |i_d| <= size_d - 1 (dims nested, largest
    stride last). Two candidates per dim (floor and ceil): at most 2**ndim steps."""
    if not dims:
        return delta == 0
    (st, n), rest = dims[-1], dims[:-1]
    span = sum((m - 1) * s for s, m in rest)
    for i in {delta // st, -(-delta // st)}:
        if abs(i) <= n - 1 and abs(delta - i * st) <= span and _reachable(delta - i * st, rest):
            return True
    return False


def _extent(t: torch.Tensor) -> Tuple[int, int]:
    """[first, last] element offsets of t in its storage."""
    lo = hi = t.storage_offset()
    for st, n in zip(t.stride(), t.shape):
        (lo, hi) = (lo + st * (n - 1), hi) if st < 0 else (lo, hi + st * (n - 1))
    return lo, hi


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    # meta tensors have no memory to share (every data_ptr reads 0)
    return (a.device == b.device and a.device.type != "meta"
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def check_no_internal_overlap(t: torch.Tensor, arg: str) -> None:
    """A tensor written in place must not address one element twice (expand(), stride 0, an
    overlapping as_strided): each write would be applied on top of another."""
    if torch.compiler.is_compiling() or t.numel() <= 1:
        return
    dims = _dims(t)
    if any(st <= 0 for st, _ in dims) or not _nested(dims):
        if torch._debug_has_internal_overlap(t) != 0 or any(st <= 0 for st, _ in dims):
            fail(arg, "a tensor whose elements are distinct memory locations (not expanded, no stride 0, no "
                 "overlapping as_strided)", f"shape {tuple(t.shape)} with strides {t.stride()}")


def check_disjoint(a: torch.Tensor, a_arg: str, b: torch.Tensor, b_arg: str) -> None:
    """Two tensors written in place must not share an element (rope2d_(q, q), overlapping views);
    views that interleave without sharing one (q and k of one qkv buffer) are fine."""
    if torch.compiler.is_compiling() or a.numel() == 0 or b.numel() == 0 or not _same_storage(a, b):
        return
    (alo, ahi), (blo, bhi) = _extent(a), _extent(b)
    if ahi < blo or bhi < alo:
        return
    dims = _dims(a)
    if a.shape == b.shape and a.stride() == b.stride() and _nested(dims):
        if not _reachable(b.storage_offset() - a.storage_offset(), dims):
            return
    fail(f"{a_arg}, {b_arg}", f"tensors that share no memory ({a_arg} is written in place)",
         f"overlapping views of one storage ({a_arg} at offset {a.storage_offset()}, strides {a.stride()}; "
         f"{b_arg} at offset {b.storage_offset()}, strides {b.stride()})")


def tracing(t: torch.Tensor) -> bool:
    """True while a compiler traces (torch.compile, torch.export strict or not, jit): the tensors are
    then fakes or proxies, so no data_ptr, version-keyed cache or eager-only op."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or (type(t) is not torch.Tensor and is_fake(t))  # a fake is a Tensor subclass (is_fake: ~1 us)
            or torch._is_functional_tensor(t))


def version_key(*tensors: Optional[torch.Tensor]) -> Optional[tuple]:
    """A key that changes whenever one of `tensors` is replaced or modified in place (None for
    inference tensors: they have no version counter, so nothing cached from them can be trusted).
    Eager only: callers check `tracing` first (dynamo cannot trace is_inference, a fake has no
    data_ptr)."""
    key = []
    for t in tensors:
        if t is None:
            key.append(None)
            continue
        if t.is_inference():
            return None
        key.append((t.data_ptr(), t._version, t.device, t.dtype, t.shape))
    return tuple(key)


def check_periods(periods, head_dim: int, arg: str) -> None:
    """Periods [head_dim/4] must be finite and positive: a zero or NaN period gives NaN angles (the
    inverse frequency is 1/period). On CPU the values are read here; on an accelerator the check is
    an asynchronous device assertion (no host sync)."""
    check_tensor(periods, arg, ndim=1)
    if periods.numel() != head_dim // 4:
        fail(arg, f"[head_dim/4] = [{head_dim // 4}]", f"shape {tuple(periods.shape)}")
    if not periods.is_floating_point():
        fail(arg, "a floating tensor of finite positive periods", periods.dtype)
    ok = (torch.isfinite(periods) & (periods > 0)).all()
    if periods.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            fail(arg, "finite positive periods", [float(p) for p in periods])
    else:
        torch._assert_async(ok, f"{arg}: expected finite positive periods")


def unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """x with stride 1 on its last dim, copying only when needed: a size-1 last dim may carry any
    stride (it addresses one element), so it is re-strided instead of being refused."""
    if x.stride(-1) == 1:
        return x
    if x.shape[-1] == 1:
        return x.as_strided(x.shape, x.stride()[:-1] + (1,), x.storage_offset())
    return x.contiguous()


def check_coord_param(value, arg: str, *, minimum: float, inclusive: bool = True) -> None:
    """An optional coordinate-augmentation parameter: None or a finite number >= / > minimum."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value < minimum if inclusive else value <= minimum):
        fail(arg, f"None or a finite number {'>=' if inclusive else '>'} {minimum}", value)


FP32_MAX = torch.finfo(torch.float32).max


def check_softmax_scale(scale, arg: str = "softmax_scale") -> None:
    """A finite positive scale that float32 holds: the kernels scale in fp32, where 1e300 is inf."""
    check_finite(scale, arg)
    if scale > FP32_MAX:
        fail(arg, f"a finite positive number <= {FP32_MAX:.4g} (float32)", scale)


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself when contiguous (no dispatcher round trip on the per-call path), else a copy."""
    return t if t.is_contiguous() else t.contiguous()


def check_coord_transform(coord_transform, n: int, device: torch.device,
                          arg: str = "coord_transform") -> Optional[torch.Tensor]:
    """coord_transform ([4] or [n, 4]) of a rotation of n images, named `arg`; returns it as
    contiguous float32 on `device` (or None). (periods: check_periods, through rope_inv_freq.)"""
    if coord_transform is None:
        return None
    check_tensor(coord_transform, arg)
    if coord_transform.numel() not in (4, 4 * n) or coord_transform.shape[-1] != 4:
        fail(arg, f"[4] or [{n}, 4] (shift_y, shift_x, scale_y, scale_x)",
             f"shape {tuple(coord_transform.shape)}")
    return coord_transform.to(device=device, dtype=torch.float32).contiguous()
