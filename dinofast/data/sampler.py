"""Batching for the packed encoder: `pack` (a list of images -> one packed batch with its metadata)
and `TokenBudgetSampler` (indices -> batches whose summed tokens fit a budget)."""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch

from dinofast._layout import PackedLayout
from dinofast._validate import FLOAT_DTYPES, check_nonneg_int, check_positive_int, check_tensor, fail


@dataclass
class Packed:
    """A packed batch of n images.

    images:      list of n float tensors [3, H_i, W_i] (what `dinofast.encode_packed` takes).
    cu_seqlens:  int32 [n + 1], token offsets of each image's sequence in the packed encoder input
                 (num_prefix_tokens + Hp_i * Wp_i tokens per image).
    grids:       int32 [n, 2], (Hp_i, Wp_i) patch grid of each image.
    num_prefix_tokens: CLS + register tokens per image counted in cu_seqlens.
    max_seqlen:  the longest image sequence, in tokens.
    layout:      the host copy of cu_seqlens and grids (a dinofast.PackedLayout): pass it to the
                 ops (`layout=`) so they check the tensors without reading them back.
    """

    images: List[torch.Tensor]
    cu_seqlens: torch.Tensor
    grids: torch.Tensor
    num_prefix_tokens: int
    max_seqlen: int
    layout: Optional[PackedLayout] = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def total_tokens(self) -> int:
        return self.layout.total if self.layout is not None else int(self.cu_seqlens[-1])

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "Packed":
        """Images moved/cast (metadata moved); a new Packed."""
        return Packed(
            [im.to(device=device, dtype=dtype, non_blocking=non_blocking) for im in self.images],
            self.cu_seqlens.to(device=device, non_blocking=non_blocking),
            self.grids.to(device=device, non_blocking=non_blocking),
            self.num_prefix_tokens,
            self.max_seqlen,
            self.layout,
        )


def pack(pixels_list: Sequence[torch.Tensor], patch_size: int = 16, num_prefix_tokens: int = 5) -> Packed:
    """Check a list of processed images and compute the packed-sequence metadata.

    pixels_list: n float tensors [3, H_i, W_i], sides multiples of `patch_size`, one dtype and
    device (what `ImageProcessor` returns). num_prefix_tokens: CLS + registers per image (5 for
    the released DINOv3 models). Returns a `Packed`; the pixels are not copied.
    """
    if isinstance(pixels_list, torch.Tensor) or not isinstance(pixels_list, (list, tuple)):
        fail("pixels_list", "a list of [3, H, W] tensors", type(pixels_list).__name__)
    if len(pixels_list) == 0:
        fail("pixels_list", "at least one image", "an empty list")
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size <= 0:
        fail("patch_size", "a positive int", patch_size)
    check_nonneg_int(num_prefix_tokens, "num_prefix_tokens")
    first = pixels_list[0]
    grids = []
    for i, im in enumerate(pixels_list):
        arg = f"pixels_list[{i}]"
        check_tensor(im, arg, ndim=3, dtypes=FLOAT_DTYPES)
        if im.dtype != first.dtype or im.device != first.device:
            fail(arg, f"dtype {first.dtype} on {first.device} (as pixels_list[0])", f"{im.dtype} on {im.device}")
        c, h, w = im.shape
        if c != 3 or h == 0 or w == 0 or h % patch_size or w % patch_size:
            fail(arg, f"[3, H, W] with H, W positive multiples of patch_size={patch_size}", f"shape {tuple(im.shape)}")
        hp, wp = h // patch_size, w // patch_size
        grids.append((hp, wp))
    layout = PackedLayout.from_grids(grids, num_prefix_tokens)
    device = first.device
    return Packed(
        images=list(pixels_list),
        cu_seqlens=torch.tensor(layout.cu_seqlens, dtype=torch.int32, device=device),
        grids=torch.tensor(grids, dtype=torch.int32, device=device),
        num_prefix_tokens=num_prefix_tokens,
        max_seqlen=layout.max_seqlen,
        layout=layout,
    )


class TokenBudgetSampler:
    """Batches of dataset indices whose summed token counts stay within a budget.

    Indices are ordered by token count (ties in a seeded random order when shuffle) and cut
    greedily into batches, so images of similar size share a batch and little of the budget is
    lost. With shuffle, the order of the batches is shuffled too (seed + epoch; call
    `set_epoch`). Batches are dealt to ranks round-robin: across all ranks every index appears
    exactly once per epoch (no padding, no duplicates), and ranks hold batch counts within one of
    each other. An image whose count alone exceeds the budget forms its own batch (with a warning).

    Use as a DataLoader `batch_sampler`; iterating yields lists of indices for this rank.
    """

    def __init__(
        self,
        token_counts: Sequence[int],
        max_tokens_per_batch: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if isinstance(token_counts, torch.Tensor):
            token_counts = token_counts.tolist()
        try:
            counts = [int(c) for c in token_counts]
        except (TypeError, ValueError):
            fail("token_counts", "a sequence of positive ints", type(token_counts).__name__)
        bad = [(i, c) for i, c in enumerate(counts) if c <= 0 or c != token_counts[i]]
        if bad:
            fail("token_counts", "positive ints", f"token_counts[{bad[0][0]}] = {token_counts[bad[0][0]]!r}")
        check_positive_int(max_tokens_per_batch, "max_tokens_per_batch")
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size <= 0:
            fail("world_size", "a positive int", world_size)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
            fail("rank", f"an int in [0, world_size={world_size})", rank)
        if not isinstance(seed, int) or isinstance(seed, bool):
            fail("seed", "an int", seed)
        self.token_counts = counts
        self.max_tokens_per_batch = max_tokens_per_batch
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        oversize = [i for i, c in enumerate(counts) if c > max_tokens_per_batch]
        if oversize:
            warnings.warn(
                f"TokenBudgetSampler: {len(oversize)} image(s) exceed max_tokens_per_batch="
                f"{max_tokens_per_batch} on their own (e.g. index {oversize[0]} with "
                f"{counts[oversize[0]]} tokens); each forms a batch of its own",
                RuntimeWarning,
                stacklevel=2,
            )

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle for `epoch` (call before iterating, on every rank, with the same value)."""
        check_nonneg_int(epoch, "epoch")
        self.epoch = epoch

    def all_batches(self) -> List[List[int]]:
        """This epoch's batches for every rank, before dealing (same on every rank)."""
        n = len(self.token_counts)
        order = list(range(n))
        rng = random.Random(self.seed * 1_000_003 + self.epoch) if self.shuffle else None
        if rng is not None:
            rng.shuffle(order)  # random tie order; the stable sort below keeps it among equal counts
        order.sort(key=lambda i: self.token_counts[i])
        batches: List[List[int]] = []
        current: List[int] = []
        used = 0
        for i in order:
            c = self.token_counts[i]
            if current and used + c > self.max_tokens_per_batch:
                batches.append(current)
                current, used = [], 0
            current.append(i)
            used += c
        if current:
            batches.append(current)
        if rng is not None:
            rng.shuffle(batches)
        return batches

    def batches_for_rank(self, rank: Optional[int] = None) -> List[List[int]]:
        rank = self.rank if rank is None else rank
        return self.all_batches()[rank :: self.world_size]

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self.batches_for_rank())

    def __len__(self) -> int:
        return len(self.batches_for_rank())
