"""PackedLayout: the host (Python int) copy of a packed batch's metadata.

Device tensors (cu_seqlens, grids) are what the kernels read; a PackedLayout is what the Python
layer checks them against, sizes launches with and hands the reference backend, without reading a
device tensor back (see dinofast._debug for the switch that does read them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch

from dinofast import _validate as V


@dataclass(frozen=True)
class PackedLayout:
    """Host metadata of a packed sequence of n segments (images).

    cu_seqlens: n+1 Python ints (segment i is tokens cu_seqlens[i]:cu_seqlens[i+1]).
    grids: n (Hp, Wp) patch grids, or None (plain attention segments without RoPE).
    num_prefix_tokens: CLS + registers per image (segment i = num_prefix_tokens + Hp*Wp tokens).
    Built with `PackedLayout.from_grids(grids, num_prefix_tokens)` or `.from_lengths(lengths)`;
    `dinofast.pack()` returns one in `Packed.layout`. Values are checked when it is built.
    """

    cu_seqlens: Tuple[int, ...]
    grids: Optional[Tuple[Tuple[int, int], ...]] = None
    num_prefix_tokens: int = 0
    max_seqlen: int = field(init=False, compare=False)
    # device copies derived from this layout ((what, args...) -> tensor), made once per layout
    _derived: dict = field(init=False, compare=False, repr=False, default_factory=dict)

    def __post_init__(self):
        cu = self.cu_seqlens
        if not isinstance(cu, (tuple, list)) or len(cu) < 2 or not all(_is_int(v) for v in cu):
            V.fail("layout.cu_seqlens", "n+1 >= 2 Python ints", cu)
        object.__setattr__(self, "cu_seqlens", tuple(int(v) for v in cu))
        V.check_cu_values(self.cu_seqlens, self.cu_seqlens[-1], "layout.cu_seqlens")
        V.check_nonneg_int(self.num_prefix_tokens, "layout.num_prefix_tokens")
        if self.grids is not None:
            hw = tuple(V.check_grid(g, "layout.grids") for g in self.grids)
            if len(hw) != self.n:
                V.fail("layout.grids", f"{self.n} (Hp, Wp) pairs (one per segment of layout.cu_seqlens)",
                       f"{len(hw)} pairs")
            V.check_grid_values(self.cu_seqlens, hw, self.num_prefix_tokens, "layout.cu_seqlens", "layout.grids")
            object.__setattr__(self, "grids", hw)
        object.__setattr__(self, "max_seqlen", V.max_len(self.cu_seqlens))

    @classmethod
    def from_lengths(cls, lengths: Sequence[int]) -> "PackedLayout":
        """Segments of the given token counts (no grids)."""
        cu = [0]
        for i, n in enumerate(lengths):
            if not _is_int(n) or n < 0:
                V.fail("lengths", "non-negative Python ints", f"lengths[{i}] = {n!r}")
            cu.append(cu[-1] + n)
        return cls(tuple(cu))

    @classmethod
    def from_grids(cls, grids: Sequence[Tuple[int, int]], num_prefix_tokens: int) -> "PackedLayout":
        """Images of the given (Hp, Wp) grids, num_prefix_tokens + Hp*Wp tokens each."""
        V.check_nonneg_int(num_prefix_tokens, "num_prefix_tokens")
        if isinstance(grids, torch.Tensor) or not isinstance(grids, (tuple, list)) or len(grids) == 0:
            V.fail("grids", "a non-empty list of (Hp, Wp) pairs of Python ints", type(grids).__name__)
        hw = tuple(V.check_grid(g) for g in grids)
        cu = [0]
        for hp, wp in hw:
            cu.append(cu[-1] + num_prefix_tokens + hp * wp)
        return cls(tuple(cu), hw, num_prefix_tokens)

    @property
    def n(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def total(self) -> int:
        return self.cu_seqlens[-1]

    def derived(self, key: tuple, make):
        """make() once per key for this layout (device copies of host values: callers never write them)."""
        value = self._derived.get(key)
        if value is None:
            value = self._derived[key] = make()
        return value

    @property
    def flat_grids(self) -> Optional[list]:
        """[Hp_0, Wp_0, Hp_1, ...] (the ops' schema form), or None."""
        return None if self.grids is None else [v for g in self.grids for v in g]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_layout(layout, cu_seqlens: torch.Tensor, total: int, total_arg: str, *,
                 grids: Optional[torch.Tensor] = None, num_prefix_tokens: Optional[int] = None,
                 prefix_arg: str = "num_prefix_tokens") -> Optional[PackedLayout]:
    """A caller's layout against the tensors' shapes (no device read): same segment count as
    cu_seqlens, same total as `total_arg`, grids when the op rotates, same num_prefix_tokens."""
    if layout is None:
        return None
    if not isinstance(layout, PackedLayout):
        V.fail("layout", "a dinofast.PackedLayout or None", type(layout).__name__)
    n = cu_seqlens.shape[0] - 1
    if layout.n != n:
        V.fail("layout", f"{n} segments, as cu_seqlens (int32 [{n + 1}])",
               f"{layout.n} segments (layout.cu_seqlens holds {layout.n + 1} values)")
    if layout.total != total:
        V.fail("layout", f"{total} tokens in all, as {total_arg}", f"layout.cu_seqlens[-1] = {layout.total}")
    if grids is not None:
        if layout.grids is None:
            V.fail("layout", "per-image grids (PackedLayout.from_grids) to check grids against", "layout.grids = None")
        if num_prefix_tokens != layout.num_prefix_tokens:
            V.fail("layout", f"num_prefix_tokens = {num_prefix_tokens}, as {prefix_arg}",
                   f"layout.num_prefix_tokens = {layout.num_prefix_tokens}")
    return layout


def packed_grids(grids, layout, cu_seqlens: torch.Tensor, total: int, total_arg: str, num_prefix_tokens: int,
                 device: torch.device, *, grids_arg: str = "grids", prefix_arg: str = "num_prefix_tokens",
                 n: Optional[int] = None):
    """(grids tensor, layout, n) of a packed call: host (Hp, Wp) pairs are the layout (copied to the
    device once per layout); shapes/dtypes/devices checked, and the layout against the tensors."""
    if not isinstance(grids, torch.Tensor):
        given = check_layout(layout, cu_seqlens, total, total_arg)
        layout = PackedLayout.from_grids(grids, num_prefix_tokens)
        if given is not None and given != layout:
            V.fail("layout", f"the layout of {grids_arg} {layout.grids}", given)
        grids = grids_on(layout, device)
    n = V.check_packed_meta(cu_seqlens, grids, total, device, n)
    check_layout(layout, cu_seqlens, total, total_arg, grids=grids, num_prefix_tokens=num_prefix_tokens,
                 prefix_arg=prefix_arg)
    return grids, layout, n


def grids_on(layout: PackedLayout, device: torch.device) -> torch.Tensor:
    """int32 [n, 2] copy of layout.grids on `device`, made once per (layout, device): on CUDA from
    pinned memory without blocking the host."""
    return layout.derived(("grids", device), lambda: int32_on(layout.grids, device))


def int32_on(values, device: torch.device) -> torch.Tensor:
    """int32 tensor of host ints on `device`; on CUDA copied from pinned memory without blocking
    the host (a pageable copy would wait for the stream)."""
    host = torch.tensor(values, dtype=torch.int32)
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def flatten_layout(layout: Optional[PackedLayout]) -> Tuple[Optional[list], Optional[list]]:
    """(host_cu_seqlens [n+1], host_grids [2n] or None): a layout as the registered ops' int lists."""
    if layout is None:
        return None, None
    return list(layout.cu_seqlens), layout.flat_grids


def unflatten_layout(host_cu_seqlens, host_grids, num_prefix_tokens: int) -> Optional[PackedLayout]:
    """The inverse of flatten_layout (inside a registered op, where the lists hold Python ints)."""
    if host_cu_seqlens is None:
        return None
    hw = None if host_grids is None else tuple(zip(host_grids[0::2], host_grids[1::2]))
    return PackedLayout(tuple(host_cu_seqlens), hw, num_prefix_tokens if hw is not None else 0)
