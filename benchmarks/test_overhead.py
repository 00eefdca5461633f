"""Per-call overhead of the Python layer: each public op and module against the raw compiled op
(torch.ops.dinofast_C.*) it ends in, on tiny CPU tensors where the kernel costs next to nothing.

"raw" is the least a hand-written caller must do: allocate the outputs and call the op with its
arguments ready (inverse frequencies, out_cu_seqlens precomputed). The two are measured
alternately in this process (blocks of calls, raw then wrapped, repeated), with one torch thread,
so that load from other jobs hits both alike; times are the thread's CPU time (time.thread_time:
on a shared machine the wall clock mostly measures the other jobs' time slices). The row records
the medians and their difference, which must stay within OVERHEAD_BUDGET_US. pytest-benchmark
also times the wrapped call itself (group `overhead`).
Run: pytest benchmarks/test_overhead.py --benchmark-only -s
"""
import statistics
import time

import pytest
import torch

import dinofast
from dinofast import _backend
from dinofast.ops.rope2d import rope_inv_freq

OVERHEAD_BUDGET_US = 15.0
BLOCKS, CALLS = 41, 100  # 41 alternated blocks of 100 calls each per side

P, H, D = 5, 2, 16
GRIDS = [(2, 2), (2, 4)]
LAYOUT = dinofast.PackedLayout.from_grids(GRIDS, P)


def _case(name):
    """(wrapped call, raw call) for one row; tensors built once, outside the timed calls."""
    g = torch.Generator().manual_seed(0)
    C = torch.ops.dinofast_C
    freqs = rope_inv_freq(D, 100.0, None, torch.device("cpu"))
    # a checkpoint's periods (the release stores them bf16-rounded), passed to every call
    periods = (100.0 ** (torch.arange(D // 4, dtype=torch.float32) * 4 / D)).bfloat16().float()
    freqs_p = 1.0 / periods
    cu = torch.tensor(LAYOUT.cu_seqlens, dtype=torch.int32)
    grids = torch.tensor(GRIDS, dtype=torch.int32)
    T = LAYOUT.total
    qb, kb = (torch.randn(1, P + 6, H, D, generator=g).transpose(1, 2) for _ in range(2))  # [B, H, N, D] views
    qp, kp, vp = (torch.randn(T, H, D, generator=g) for _ in range(3))
    scale = D ** -0.5

    def raw_rope_batched(f=freqs):
        qo, ko = torch.empty_like(qb), torch.empty_like(kb)
        C.rope2d(qb.transpose(1, 2), kb.transpose(1, 2), qo.transpose(1, 2), ko.transpose(1, 2), f, None, None,
                 2, 3, None, P, False)
        return qo, ko

    def raw_rope_packed():
        qo, ko = torch.empty_like(qp), torch.empty_like(kp)
        C.rope2d(qp[None], kp[None], qo[None], ko[None], freqs, cu, grids, 0, 0, None, P, False)
        return qo, ko

    def raw_rope_inplace():
        C.rope2d(qp[None], kp[None], qp[None], kp[None], freqs, cu, grids, 0, 0, None, P, False)

    def raw_attention(rope, f=freqs):
        def call():
            out, lse = torch.empty_like(qp), torch.empty(H, T)
            if rope:
                C.varlen_attention_fwd(qp, kp, vp, out, lse, cu, LAYOUT.max_seqlen, scale, f, grids, None, P)
            else:
                C.varlen_attention_fwd(qp, kp, vp, out, lse, cu, LAYOUT.max_seqlen, scale, None, None, None, 0)
            return out
        return call

    x_b = torch.randn(2, P + 16, D, generator=g)
    x_p = torch.randn(T, D, generator=g)
    w = torch.randn(8, 4 * D, generator=g)
    out_cu = torch.tensor([0, 1, 3], dtype=torch.int32)

    def raw_psp_batched():
        y = x_b.new_empty(2 * 4, 8)
        C.pixel_shuffle_project(x_b, w, None, y, None, None, None, 4, 4, 2, P)
        return y.view(2, 4, 8)

    def raw_psp_packed():
        y = x_p.new_empty(3, 8)
        C.pixel_shuffle_project(x_p[None], w, None, y, cu, grids, out_cu, 0, 0, 2, P)
        return y, out_cu

    rope_module = dinofast.nn.RoPE2D(D, num_prefix_tokens=P).eval()
    projector = dinofast.nn.PixelShuffleProjector(D, 8, 2, num_prefix_tokens=P).eval().requires_grad_(False)
    wp = projector.proj.weight
    spec = dinofast.RopeSpec(grids, P)
    spec_p = dinofast.RopeSpec(grids, P, periods=periods)
    cases = {
        "rope2d batched": (lambda: dinofast.rope2d(qb, kb, (2, 3), num_prefix_tokens=P), raw_rope_batched),
        "rope2d packed": (lambda: dinofast.rope2d(qp, kp, grids, num_prefix_tokens=P, cu_seqlens=cu, layout=LAYOUT),
                          raw_rope_packed),
        "rope2d_ packed": (lambda: dinofast.rope2d_(qp, kp, grids, num_prefix_tokens=P, cu_seqlens=cu,
                                                    layout=LAYOUT), raw_rope_inplace),
        "rope2d batched periods": (lambda: dinofast.rope2d(qb, kb, (2, 3), num_prefix_tokens=P, periods=periods),
                                   lambda: raw_rope_batched(freqs_p)),
        "nn.RoPE2D batched": (lambda: rope_module(qb, kb, (2, 3)), raw_rope_batched),
        "varlen_attention": (lambda: dinofast.varlen_attention(qp, kp, vp, cu, LAYOUT.max_seqlen, layout=LAYOUT),
                             raw_attention(False)),
        "varlen_attention rope": (lambda: dinofast.varlen_attention(qp, kp, vp, cu, LAYOUT.max_seqlen, rope=spec,
                                                                    layout=LAYOUT), raw_attention(True)),
        "varlen_attention rope periods": (lambda: dinofast.varlen_attention(qp, kp, vp, cu, LAYOUT.max_seqlen,
                                                                            rope=spec_p, layout=LAYOUT),
                                          raw_attention(True, freqs_p)),
        "flash_attn_varlen_func": (lambda: dinofast.flash_attn_varlen_func(qp, kp, vp, cu, cu, LAYOUT.max_seqlen,
                                                                           LAYOUT.max_seqlen), raw_attention(False)),
        "pixel_shuffle_project batched": (lambda: dinofast.pixel_shuffle_project(x_b, w, grids=(4, 4), factor=2,
                                                                                 num_prefix_tokens=P), raw_psp_batched),
        "pixel_shuffle_project packed": (lambda: dinofast.pixel_shuffle_project(
            x_p, w, grids=grids, factor=2, num_prefix_tokens=P, cu_seqlens=cu, layout=LAYOUT), raw_psp_packed),
        "nn.PixelShuffleProjector batched": (lambda: projector(x_b, (4, 4)),
                                             lambda: _raw_psp_module(C, x_b, wp)),
    }
    return cases[name]


def _raw_psp_module(C, x, w):
    y = x.new_empty(2 * 4, 8)
    C.pixel_shuffle_project(x, w, None, y, None, None, None, 4, 4, 2, P)
    return y.view(2, 4, 8)


ROWS = ["rope2d batched", "rope2d packed", "rope2d_ packed", "rope2d batched periods", "nn.RoPE2D batched",
        "varlen_attention", "varlen_attention rope", "varlen_attention rope periods", "flash_attn_varlen_func",
        "pixel_shuffle_project batched", "pixel_shuffle_project packed", "nn.PixelShuffleProjector batched"]


def alternate(wrapped, raw):
    """Median CPU microseconds per call of (wrapped, raw), blocks of CALLS alternated BLOCKS times."""
    times = {"wrapped": [], "raw": []}
    for fn in (wrapped, raw) * 20:  # warm-up
        fn()
    for b in range(BLOCKS):
        order = (("raw", raw), ("wrapped", wrapped)) if b % 2 == 0 else (("wrapped", wrapped), ("raw", raw))
        for key, fn in order:
            t0 = time.thread_time_ns()
            for _ in range(CALLS):
                fn()
            times[key].append((time.thread_time_ns() - t0) / CALLS / 1e3)
    return statistics.median(times["wrapped"]), statistics.median(times["raw"])


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("row", ROWS)
def test_overhead(benchmark, row):
    if _backend.load_C() is None:
        pytest.skip(reason="dinofast._C is not built: no raw op to compare with")
    wrapped, raw = _case(row)
    assert _backend.select({"cpp": None, "reference": None}, torch.device("cpu"), row) == "cpp"  # automatic choice
    with torch.no_grad():
        wrapped_us, raw_us = alternate(wrapped, raw)
        benchmark.group = "overhead"
        benchmark.extra_info.update(raw_us=round(raw_us, 2), wrapped_us=round(wrapped_us, 2),
                                    overhead_us=round(wrapped_us - raw_us, 2), ratio=round(wrapped_us / raw_us, 2))
        print(f"\n{row:<34} raw {raw_us:7.2f} us   wrapped {wrapped_us:7.2f} us   overhead "
              f"{wrapped_us - raw_us:6.2f} us   ratio {wrapped_us / raw_us:5.2f}")
        benchmark.pedantic(wrapped, rounds=200, iterations=10, warmup_rounds=5)
    assert wrapped_us - raw_us <= OVERHEAD_BUDGET_US, (
        f"{row}: {wrapped_us - raw_us:.1f} us over the raw op (budget {OVERHEAD_BUDGET_US} us)")
