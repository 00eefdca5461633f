"""TokenBudgetSampler properties (partition across ranks, budget, size grouping, determinism) and
pack (metadata, checks)."""
import warnings

import pytest
import torch
from hypothesis import given, strategies as st

import dinofast

sampler_args = dict(
    counts=st.lists(st.integers(1, 300), min_size=1, max_size=80),
    budget=st.integers(1, 1000),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**31),
    world_size=st.integers(1, 4),
)


def make(counts, budget, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return dinofast.TokenBudgetSampler(counts, budget, **kw)


@given(**sampler_args)
def test_partition_budget_and_grouping(counts, budget, shuffle, seed, world_size):
    per_rank = [list(make(counts, budget, shuffle=shuffle, seed=seed, rank=r, world_size=world_size))
                for r in range(world_size)]
    # every index exactly once across ranks
    seen = sorted(i for batches in per_rank for b in batches for i in b)
    assert seen == list(range(len(counts)))
    # batch counts per rank within one of each other, and len() agrees
    sizes = [len(b) for b in per_rank]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == [len(make(counts, budget, shuffle=shuffle, seed=seed, rank=r, world_size=world_size))
                     for r in range(world_size)]
    batches = [b for bs in per_rank for b in bs]
    for b in batches:
        assert b, "empty batch"
        total = sum(counts[i] for i in b)
        # within budget, or a single image larger than the budget on its own
        assert total <= budget or (len(b) == 1 and counts[b[0]] > budget)
    # images of similar size together: batches cover disjoint ranges of token counts
    ranges = sorted((min(counts[i] for i in b), max(counts[i] for i in b)) for b in batches)
    for (_, hi), (lo, _) in zip(ranges[:-1], ranges[1:]):
        assert hi <= lo
    # and greedily full: the next image (in size order) did not fit in the batch before it
    # (among batches of equal counts the greedy cut leaves the short one last)
    by_size = sorted(batches, key=lambda b: (min(counts[i] for i in b), max(counts[i] for i in b), -len(b)))
    for a, b in zip(by_size[:-1], by_size[1:]):
        assert sum(counts[i] for i in a) + min(counts[i] for i in b) > budget


@given(**sampler_args)
def test_deterministic_for_a_seed(counts, budget, shuffle, seed, world_size):
    a = make(counts, budget, shuffle=shuffle, seed=seed, world_size=world_size)
    b = make(counts, budget, shuffle=shuffle, seed=seed, world_size=world_size)
    assert list(a) == list(b)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)


def test_shuffle_changes_with_epoch_and_seed_not_without():
    counts = [(i * 37) % 200 + 1 for i in range(200)]
    s = dinofast.TokenBudgetSampler(counts, 400, shuffle=True, seed=1)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1
    assert list(dinofast.TokenBudgetSampler(counts, 400, seed=2)) != e0
    fixed = dinofast.TokenBudgetSampler(counts, 400, shuffle=False)
    first = list(fixed)
    fixed.set_epoch(5)
    assert list(fixed) == first
    # without shuffle: batches in increasing size order, indices in increasing count order
    flat = [i for b in first for i in b]
    assert [counts[i] for i in flat] == sorted(counts)


def test_equal_counts_fill_batches():
    s = dinofast.TokenBudgetSampler([5] * 8, 15, shuffle=True, seed=3)
    assert sorted(len(b) for b in s) == [2, 3, 3]


def test_oversize_image_warns_and_is_alone():
    counts = [10, 500, 20, 30]
    with pytest.warns(RuntimeWarning, match="exceed max_tokens_per_batch=100"):
        s = dinofast.TokenBudgetSampler(counts, 100, shuffle=False)
    assert list(s) == [[0, 2, 3], [1]]


def test_works_as_a_dataloader_batch_sampler():
    counts = [5, 9, 3, 7, 2, 8]
    data = list(range(100, 106))
    s = dinofast.TokenBudgetSampler(counts, 12, shuffle=False)
    loader = torch.utils.data.DataLoader(data, batch_sampler=s, collate_fn=list)
    got = list(loader)
    assert sorted(x for b in got for x in b) == data
    assert got == [[104, 102, 100], [103], [105], [101]]


@pytest.mark.parametrize("kwargs,arg", [
    (dict(token_counts=[1, 0, 3]), "token_counts"),
    (dict(token_counts=[1, 2.5]), "token_counts"),
    (dict(token_counts=None), "token_counts"),
    (dict(max_tokens_per_batch=0), "max_tokens_per_batch"),
    (dict(world_size=0), "world_size"),
    (dict(rank=2, world_size=2), "rank"),
    (dict(seed=1.5), "seed"),
])
def test_sampler_bad_arguments(kwargs, arg):
    args = dict(token_counts=[1, 2, 3], max_tokens_per_batch=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        dinofast.TokenBudgetSampler(**args)


# ---- pack ----------------------------------------------------------------------------------------

def test_pack_metadata_from_processor_outputs():
    from PIL import Image
    proc = dinofast.ImageProcessor(max_side=128)
    sizes = [(64, 96), (17, 200), (128, 128), (5, 5)]
    pixels = [proc(Image.new("RGB", (w, h), (i * 40, 3, 7)))[0] for i, (h, w) in enumerate(sizes)]
    p = dinofast.pack(pixels, patch_size=16, num_prefix_tokens=5)
    grids = [(px.shape[1] // 16, px.shape[2] // 16) for px in pixels]
    assert p.grids.tolist() == [list(g) for g in grids] and p.grids.dtype == torch.int32
    lengths = [5 + h * w for h, w in grids]
    assert p.cu_seqlens.tolist() == [0] + [sum(lengths[: i + 1]) for i in range(len(lengths))]
    assert p.cu_seqlens.dtype == torch.int32
    assert p.max_seqlen == max(lengths) and p.total_tokens == sum(lengths) and len(p) == 4
    assert all(a is b for a, b in zip(p.images, pixels))
    q = p.to(dtype=torch.float64)
    assert q.images[0].dtype == torch.float64 and torch.equal(q.cu_seqlens, p.cu_seqlens)


def test_pack_bad_input():
    good = torch.randn(3, 32, 48)
    with pytest.raises(ValueError, match="at least one image"):
        dinofast.pack([])
    with pytest.raises(ValueError, match=r"pixels_list\[1\].*multiples of patch_size=16.*\(3, 32, 40\)"):
        dinofast.pack([good, torch.randn(3, 32, 40)])
    with pytest.raises(ValueError, match=r"pixels_list\[1\].*float32"):
        dinofast.pack([good, good.double()])
    with pytest.raises(ValueError, match=r"pixels_list\[0\]"):
        dinofast.pack([torch.randn(32, 48)])
    with pytest.raises(ValueError, match=r"pixels_list\[0\]"):
        dinofast.pack([torch.randn(1, 32, 48)])
    with pytest.raises(ValueError, match="pixels_list"):
        dinofast.pack(good)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        dinofast.pack([good], num_prefix_tokens=-1)
