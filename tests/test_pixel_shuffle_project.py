"""pixel_shuffle_project: every backend against the reference; the reference against the spec's
index map and nanoVLM's formula; gradients, module, torch.compile, bad input."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import dinofast
from dinofast import _backend
from dinofast.reference.pixel_shuffle_project import (
    pixel_shuffle, pixel_shuffle_project_reference, shuffle_source_rows)
from tests.conftest import (
    DEVICE, assert_close, assert_compiles_like_eager, assert_flash_rule, assert_nan_like, make_cu_seqlens, needs_C,
    randn, skip_unless_available, value_error_test, with_debug_checks)

# (grid, factor): rectangles for every s in {1, 2, 3, 4}
GRIDS = [((3, 5), 1), ((4, 6), 2), ((6, 3), 3), ((8, 4), 4)]
PACKED_GRIDS = [(4, 6), (2, 2), (6, 8), (2, 4)]


def params(out, K, dtype=torch.float32, bias=True, seed=0):
    """weight [out, K] scaled so that outputs are O(1), bias [out] or None."""
    w = (randn(out, K, seed=seed) / math.sqrt(K)).to(dtype)
    return w, (randn(out, dtype=dtype, seed=seed + 1) if bias else None)


def batched_inputs(B, grid, P, D, out, s, dtype=torch.float32, bias=True, seed=0):
    x = randn(B, P + grid[0] * grid[1], D, dtype=dtype, seed=seed)
    return (x, *params(out, D * s * s, dtype, bias, seed + 10))


def packed_inputs(grids, P, D, out, s, dtype=torch.float32, bias=True, seed=0):
    lengths = [P + h * w for h, w in grids]
    x = randn(sum(lengths), D, dtype=dtype, seed=seed)
    g = torch.tensor(grids, dtype=torch.int32, device=DEVICE)
    return (x, *params(out, D * s * s, dtype, bias, seed + 10), make_cu_seqlens(lengths), g)


def f64(*ts):
    return [t.double() if t is not None else None for t in ts]


# ---------------------------------------------------------------------------------------------
# the reference against the spec
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,s", GRIDS)
@pytest.mark.parametrize("P", [0, 5])
def test_reference_shuffle_is_the_spec_index_map(grid, s, P):
    Hp, Wp = grid
    Gh, Gw, D = Hp // s, Wp // s, 3
    x = randn(2, P + Hp * Wp, D, device="cpu", seed=4)
    got = pixel_shuffle(x, Hp, Wp, s, P)
    assert got.shape == (2, Gh * Gw, D * s * s)
    for b in range(2):
        for I in range(Gh):
            for J in range(Gw):
                for dy in range(s):
                    for dx in range(s):
                        src = x[b, P + (I * s + dy) * Wp + (J * s + dx)]
                        assert torch.equal(got[b, I * Gw + J, (dy * s + dx) * D:(dy * s + dx + 1) * D], src)
    rows = shuffle_source_rows(Hp, Wp, s, P)
    assert torch.equal(got, x[:, rows].flatten(2))
    assert sorted(rows.flatten().tolist()) == list(range(P, P + Hp * Wp)), "every patch row is used exactly once"


def nanovlm_modality_projector(x, weight, factor):
    """nanoVLM's ModalityProjector (square grid from sqrt(N), no prefix), written from its formula."""
    bsz, seq, embed_dim = x.size()
    side = int(seq ** 0.5)
    assert side * side == seq and side % factor == 0
    x = x.view(bsz, side, side, embed_dim)
    h_out = w_out = side // factor
    x = x.reshape(bsz, h_out, factor, w_out, factor, embed_dim).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(bsz, h_out * w_out, embed_dim * factor ** 2)
    return torch.nn.functional.linear(x, weight)


@pytest.mark.parametrize("side,s", [(4, 2), (8, 4), (6, 3), (3, 1)])
def test_square_without_prefix_equals_nanovlm(backend_name, side, s):
    x, w, _ = batched_inputs(2, (side, side), 0, 24, 40, s, bias=False)
    want = nanovlm_modality_projector(x.double(), w.double(), s)
    assert_close(pixel_shuffle_project_reference(x.double(), w.double(), grids=(side, side), factor=s), want,
                 torch.float64)
    assert_close(dinofast.pixel_shuffle_project(x, w, grids=(side, side), factor=s), want, torch.float32)


def test_design_notes_vector(backend_name):
    # 640x960 image, patch 16 -> (Hp, Wp) = (40, 60); s = 4 -> (Gh, Gw) = (10, 15) -> 150 tokens
    Hp, Wp = 640 // 16, 960 // 16
    assert dinofast.shuffled_grid(Hp, Wp, 4) == (10, 15)
    x, w, b = batched_inputs(1, (Hp, Wp), 5, 8, 24, 4)
    y = dinofast.pixel_shuffle_project(x, w, b, grids=(Hp, Wp), factor=4, num_prefix_tokens=5)
    assert y.shape == (1, 150, 24)
    assert_close(y, pixel_shuffle_project_reference(*f64(x, w, b), grids=(Hp, Wp), factor=4, num_prefix_tokens=5),
                 torch.float32)


# ---------------------------------------------------------------------------------------------
# parity of every backend with the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,s", GRIDS)
@pytest.mark.parametrize("P", [0, 1, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_batched_fp32(kernel_backend, grid, s, P, bias):
    x, w, b = batched_inputs(2, grid, P, 24, 40, s, bias=bias)
    y = dinofast.pixel_shuffle_project(x, w, b, grids=grid, factor=s, num_prefix_tokens=P)
    want = pixel_shuffle_project_reference(x, w, b, grids=grid, factor=s, num_prefix_tokens=P)
    assert y.shape == want.shape and y.dtype == x.dtype
    assert_close(y, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_low_precision_against_fp64(kernel_backend, dtype, packed):
    s, P = 2, 5
    if packed:
        x, w, b, cu, g = packed_inputs(PACKED_GRIDS, P, 40, 48, s, dtype)
        y, _ = dinofast.pixel_shuffle_project(x, w, b, grids=g, factor=s, num_prefix_tokens=P, cu_seqlens=cu)
        want, _ = pixel_shuffle_project_reference(*f64(x, w, b), grids=g, factor=s, num_prefix_tokens=P,
                                                  cu_seqlens=cu)
    else:
        x, w, b = batched_inputs(2, (4, 6), P, 40, 48, s, dtype)
        y = dinofast.pixel_shuffle_project(x, w, b, grids=(4, 6), factor=s, num_prefix_tokens=P)
        want = pixel_shuffle_project_reference(*f64(x, w, b), grids=(4, 6), factor=s, num_prefix_tokens=P)
    assert y.dtype == dtype
    assert_close(y, want, dtype)


@pytest.mark.parametrize("P", [0, 1, 5])
@pytest.mark.parametrize("s", [1, 2])
def test_packed_equals_per_image(kernel_backend, P, s):
    x, w, b, cu, g = packed_inputs(PACKED_GRIDS, P, 24, 40, s)
    y, out_cu = dinofast.pixel_shuffle_project(x, w, b, grids=g, factor=s, num_prefix_tokens=P, cu_seqlens=cu)
    want, want_cu = pixel_shuffle_project_reference(x, w, b, grids=g, factor=s, num_prefix_tokens=P, cu_seqlens=cu)
    assert out_cu.dtype == torch.int32 and out_cu.tolist() == want_cu.tolist()
    assert out_cu.tolist() == [0] + list(torch.tensor([(h // s) * (w_ // s) for h, w_ in PACKED_GRIDS]).cumsum(0))
    assert_close(y, want)
    for i, grid in enumerate(PACKED_GRIDS):
        one = dinofast.pixel_shuffle_project(x[None, cu[i]:cu[i + 1]], w, b, grids=grid, factor=s,
                                             num_prefix_tokens=P)
        assert_close(y[out_cu[i]:out_cu[i + 1]], one[0])


@given(
    B=st.integers(1, 2), s=st.integers(1, 4), Gh=st.integers(1, 3), Gw=st.integers(1, 3), P=st.integers(0, 5),
    D=st.sampled_from([8, 24, 40]), out=st.sampled_from([1, 17, 40]), bias=st.booleans(),
)
def test_hypothesis_shapes(kernel_backend, B, s, Gh, Gw, P, D, out, bias):
    grid = (Gh * s, Gw * s)
    x, w, b = batched_inputs(B, grid, P, D, out, s, bias=bias, seed=Gh * 7 + Gw)
    y = dinofast.pixel_shuffle_project(x, w, b, grids=grid, factor=s, num_prefix_tokens=P)
    assert_close(y, pixel_shuffle_project_reference(x, w, b, grids=grid, factor=s, num_prefix_tokens=P))


def test_non_contiguous_inputs(kernel_backend):
    # x with a padded row stride (a slice of a wider buffer) and a transposed weight buffer
    wide = randn(2, 5 + 24, 40, seed=1)
    x = wide[..., 8:32]
    w_t = (randn(24 * 4, 40, seed=2) / math.sqrt(24 * 4)).t()  # scaled so that outputs are O(1)
    b = randn(40, seed=3)
    y = dinofast.pixel_shuffle_project(x, w_t, b, grids=(4, 6), factor=2, num_prefix_tokens=5)
    assert_close(y, pixel_shuffle_project_reference(x, w_t, b, grids=(4, 6), factor=2, num_prefix_tokens=5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_non_contiguous(kernel_backend, dtype):
    wide = randn(2, 5 + 24, 40, dtype=dtype, seed=4)
    x = wide[..., 8:32]  # padded row stride
    w, b = params(48, 24 * 4, dtype, seed=5)
    y = dinofast.pixel_shuffle_project(x, w, b, grids=(4, 6), factor=2, num_prefix_tokens=5)
    want = pixel_shuffle_project_reference(*f64(x, w, b), grids=(4, 6), factor=2, num_prefix_tokens=5)
    assert_close(y, want, dtype)


def test_ten_packed_images_and_two_m_tiles(kernel_backend):
    """10 images, M = 50 output rows: more than one 32-row tile of the interpreted Triton dW loop."""
    grids = [(2 * (1 + i % 3), 2 * (1 + (2 * i) % 3)) for i in range(10)]
    x, w, b, cu, g = packed_inputs(grids, 5, 8, 12, 2, seed=6)
    kw = dict(grids=g, factor=2, num_prefix_tokens=5, cu_seqlens=cu)
    M = sum((h // 2) * (w_ // 2) for h, w_ in grids)
    assert M > 32
    y, _ = dinofast.pixel_shuffle_project(x, w, b, **kw)
    want, _ = pixel_shuffle_project_reference(*f64(x, w, b), **kw)
    assert_close(y, want, torch.float32)
    grad_y = randn(M, 12, seed=7)
    got = _grads(lambda *a: dinofast.pixel_shuffle_project(*a, **kw), x, w, b, grad_y)
    want = _grads(lambda *a: pixel_shuffle_project_reference(*a, **kw), *f64(x, w, b), grad_y.double())
    for g_, w_ in zip(got, want):
        assert_close(g_, w_, torch.float32)


@pytest.mark.parametrize("B, out", [(0, 12), (2, 0), (0, 0)])
def test_empty_batch_or_no_outputs(backend_name, B, out):
    """Any B and out width: B = 0 or out = 0 give empty outputs, and zero (not missing) gradients."""
    x, w, b = batched_inputs(B, (4, 6), 5, 8, out, 2)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = dinofast.pixel_shuffle_project(x, w, b, grids=(4, 6), factor=2, num_prefix_tokens=5)
    assert y.shape == (B, 6, out)
    (y.sum() + 0 * w.sum()).backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and b.grad.shape == b.shape
    assert (x.grad == 0).all() and (w.grad == 0).all() and (b.grad == 0).all()


def test_size_one_feature_dim_with_any_stride_and_non_contiguous_metadata(backend_name):
    wide = randn(2, 5 + 24, 3, seed=8)
    x = wide[..., 1:2]  # D = 1, stride 3 on D
    assert x.stride(-1) == 1 or x.shape[-1] == 1
    x = x.as_strided(x.shape, x.stride()[:-1] + (7,), x.storage_offset())
    w, b = params(10, 4, seed=9)
    y = dinofast.pixel_shuffle_project(x, w, b, grids=(4, 6), factor=2, num_prefix_tokens=5)
    assert_close(y, pixel_shuffle_project_reference(*f64(x.contiguous(), w, b), grids=(4, 6), factor=2,
                                                    num_prefix_tokens=5), torch.float32)
    px, pw, pb, cu, g = packed_inputs([(4, 6), (2, 2)], 1, 8, 10, 2, seed=10)
    cu_view = torch.stack([cu, cu], 1)[:, 0]
    g_view = torch.stack([g[:, 0], g[:, 0], g[:, 1]], 1)[:, ::2]
    assert not cu_view.is_contiguous() and not g_view.is_contiguous()
    y, out_cu = dinofast.pixel_shuffle_project(px, pw, pb, grids=g_view, factor=2, num_prefix_tokens=1,
                                               cu_seqlens=cu_view)
    want, want_cu = pixel_shuffle_project_reference(*f64(px, pw, pb), grids=g, factor=2, num_prefix_tokens=1,
                                                    cu_seqlens=cu)
    assert_close(y, want, torch.float32)
    assert out_cu.tolist() == want_cu.tolist()


def test_nan_in_a_patch_reaches_only_its_output_row(kernel_backend):
    x, w, b = batched_inputs(1, (4, 6), 5, 8, 12, 2, seed=11)
    x[0, 5 + 0] = float("nan")  # patch (0, 0): output row 0 only
    x[0, 0] = float("inf")  # a prefix token: dropped
    y = dinofast.pixel_shuffle_project(x, w, b, grids=(4, 6), factor=2, num_prefix_tokens=5)
    want = pixel_shuffle_project_reference(*f64(x, w, b), grids=(4, 6), factor=2, num_prefix_tokens=5)
    assert_nan_like(y, want)
    assert y[0, 0].isnan().all() and not y[0, 1:].isnan().any()


# ---------------------------------------------------------------------------------------------
# cpp in fp16/bf16 past one scratch panel: the CPU kernel gathers at most CPU_PANEL_BYTES of the
# shuffled matrix at a time (kPanelBytes in csrc/pixel_shuffle_project.h, at least 256 rows), so
# these shapes (D 4096, s 4: K = 65536, 512 rows of 16-bit values per panel) cross panel
# boundaries in the middle of an image, after prefix tokens, in the forward, dx and dW passes.
# ---------------------------------------------------------------------------------------------
CPU_PANEL_BYTES = 64 << 20
WIDE_D, WIDE_S, WIDE_OUT, WIDE_P = 4096, 4, 24, 5
WIDE_BATCHED = (2, (64, 68))  # M = 2 * 16 * 17 = 544 rows: the boundary at row 512 is in image 1
WIDE_PACKED = [(64, 68), (64, 72), (8, 4)]  # 272 + 288 + 2 rows: the boundary is in image 1


@pytest.fixture
def cpp_cpu():
    reason = _backend.why_unavailable("cpp", "cpu")
    if reason or DEVICE.type != "cpu":
        pytest.skip(reason=f"the cpp backend on CPU: {reason or 'tests run on ' + DEVICE.type}")
    with dinofast.backend("cpp"):
        yield


def _wide_inputs(dtype, packed, seed=20, D=WIDE_D):
    if packed:
        x, w, b, cu, g = packed_inputs(WIDE_PACKED, WIDE_P, D, WIDE_OUT, WIDE_S, dtype, seed=seed)
        kw = dict(grids=g, factor=WIDE_S, num_prefix_tokens=WIDE_P, cu_seqlens=cu)
        images = [(int(cu[i]), hw) for i, hw in enumerate(WIDE_PACKED)]
        x3 = x[None]
    else:
        B, grid = WIDE_BATCHED
        x, w, b = batched_inputs(B, grid, WIDE_P, D, WIDE_OUT, WIDE_S, dtype, seed=seed)
        kw = dict(grids=grid, factor=WIDE_S, num_prefix_tokens=WIDE_P)
        images = [(0, grid)]
        x3 = x
    # the shuffled matrix in the input dtype (a permutation: exact), [M, K]
    shuffled = torch.cat([pixel_shuffle(x3[:, t0:t0 + WIDE_P + h * w_], h, w_, WIDE_S, WIDE_P).flatten(0, 1)
                          for t0, (h, w_) in images])
    assert shuffled.numel() * shuffled.element_size() > CPU_PANEL_BYTES, "the shape must span two panels"
    return x, w, b, kw, shuffled


def _fp64_rows(a, w, b=None, chunk=64):
    """a [M, K] @ w.T (+ b) in fp64, a few rows at a time (the whole fp64 copy would be 4x x)."""
    w64 = w.double()
    out = torch.cat([a[i:i + chunk].double() @ w64.t() for i in range(0, a.shape[0], chunk)])
    return out + b.double() if b is not None else out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_cpp_low_precision_across_panels(cpp_cpu, dtype, packed):
    x, w, b, kw, shuffled = _wide_inputs(dtype, packed)
    y = dinofast.pixel_shuffle_project(x, w, b, **kw)
    y = y[0] if packed else y.flatten(0, 1)
    assert y.dtype == dtype and y.shape == (shuffled.shape[0], WIDE_OUT)
    want = _fp64_rows(shuffled, w, b)
    assert_close(y, want, dtype)
    # and no worse than PyTorch's own GEMM in the dtype on the shuffled matrix
    assert_flash_rule(y, want, torch.nn.functional.linear(shuffled, w, b))


def test_cpp_bf16_panel_rows_of_any_byte_alignment(cpp_cpu):
    """D = 4100: runs of 8200 bytes, so multi-MiB panels (written with streaming stores) hold runs
    that start off 16-byte alignment and runs whose length is not a multiple of 64 bytes."""
    x, w, b, kw, shuffled = _wide_inputs(torch.bfloat16, packed=False, seed=25, D=4100)
    y = dinofast.pixel_shuffle_project(x, w, b, **kw).flatten(0, 1)
    assert_close(y, _fp64_rows(shuffled, w, b), torch.bfloat16)


def test_cpp_bf16_nan_in_the_second_panel_reaches_only_its_row(cpp_cpu):
    x, w, b, kw, _ = _wide_inputs(torch.bfloat16, packed=False)
    Gw, m = WIDE_BATCHED[1][1] // WIDE_S, 530 - 272  # output row 530 = image 1, row 258: (I, J) = (15, 3)
    I, J = divmod(m, Gw)
    x[1, WIDE_P + (I * WIDE_S + 1) * WIDE_BATCHED[1][1] + J * WIDE_S + 2, 7] = float("nan")  # slot (1, 2)
    x[1, 0, 0] = float("inf")  # a prefix token: dropped
    y = dinofast.pixel_shuffle_project(x, w, b, **kw)
    nan_rows = y.isnan().any(-1).nonzero().tolist()
    assert nan_rows == [[1, m]] and y[1, m].isnan().all()


@pytest.mark.parametrize("packed", [False, True])
def test_cpp_bf16_gradients_across_panels(cpp_cpu, packed):
    dtype = torch.bfloat16
    x, w, b, kw, shuffled = _wide_inputs(dtype, packed, seed=30)
    M = shuffled.shape[0]
    grad_y = randn(M, WIDE_OUT, dtype=dtype, seed=31)
    gx, gw, gb = _grads(lambda *a: dinofast.pixel_shuffle_project(*a, **kw), x, w, b,
                        grad_y if packed else grad_y.view(WIDE_BATCHED[0], -1, WIDE_OUT))
    # the oracle: dW = grad_y^T A and db = sum grad_y in fp64; dx = grad_y W un-shuffled onto the
    # patch rows (zero on the prefix rows), by autograd through the reference's shuffle in fp64
    assert_close(gw, _fp64_rows(grad_y.t(), shuffled.t()), dtype)
    assert_close(gb, grad_y.double().sum(0), dtype)
    x64 = x.double().requires_grad_()
    x3 = x64[None] if packed else x64
    images = ([(int(kw["cu_seqlens"][i]), hw) for i, hw in enumerate(WIDE_PACKED)] if packed
              else [(0, WIDE_BATCHED[1])])
    a64 = torch.cat([pixel_shuffle(x3[:, t0:t0 + WIDE_P + h * w_], h, w_, WIDE_S, WIDE_P).flatten(0, 1)
                     for t0, (h, w_) in images])
    a64.backward(grad_y.double() @ w.double())
    assert_close(gx, x64.grad, dtype)


# ---------------------------------------------------------------------------------------------
# the Triton forward at small M: split-K fills the GPU (grid math for an H100; interpreter parity)
# ---------------------------------------------------------------------------------------------
H100_SMS = 132
# VLM batches: 1..8 images of 640x960 at s=4 (150 rows each) through a ViT-B (D=768) into N=960
SMALL_M_SHAPES = [(M, 960, 768, 4) for M in (150, 300, 600, 1200)]


def _psp_kernels():
    pytest.importorskip("triton")
    from dinofast.kernels import pixel_shuffle_project as K

    return K


@pytest.mark.parametrize("M,N,D,s", SMALL_M_SHAPES)
def test_small_m_grids_fill_an_h100(M, N, D, s):
    """Every forward/dx/dW autotune config launches at least one wave of programs (132 SMs)."""
    K = _psp_kernels()
    rows = []
    for cfg in K.FWD_CONFIGS:
        tiles, split = K.fwd_grid(M, N, D, s, cfg.kwargs, H100_SMS)
        k_iters = s * s * math.ceil(D / cfg.kwargs["BLOCK_K"])
        assert split == 1 or tiles < H100_SMS, "split-K only when the tiles alone do not fill a wave"
        assert split * K.MIN_K_ITERS_PER_SPLIT <= k_iters
        rows.append((f"fwd {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_K']}",
                     tiles, split, tiles * split))
    for cfg in K.DX_CONFIGS:
        a, b = K.dx_grid(M, D, s, cfg.kwargs)
        rows.append((f"dx  {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_K']}", a * b, 1, a * b))
    for cfg in K.DW_CONFIGS:
        a, b = K.dw_grid(N, D, s, cfg.kwargs)
        rows.append((f"dW  {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_K']}", a * b, 1, a * b))
    print(f"\nM={M} N={N} K={D * s * s}: config, tiles, K splits, CTAs")
    for name, tiles, split, ctas in rows:
        print(f"  {name:<20} {tiles:5d} {split:3d} {ctas:5d}")
    assert all(ctas >= H100_SMS for *_, ctas in rows), rows
    # before split-K the default forward tile gave 16 CTAs at M=150
    if M == 150:
        assert K.fwd_grid(M, N, D, s, K.DEFAULT_FWD, H100_SMS) == (16, 9)


def test_forward_autotune_key_has_bucketed_m():
    K = _psp_kernels()
    assert "M_BUCKET" in K._fwd_tuned.keys
    assert [K.m_bucket(m) for m in (1, 16, 17, 150, 1200, 4096, 10**6)] == [16, 16, 32, 256, 2048, 4096, 4096]


# (batched grid or packed grids, P, D, out, s, bias): M of 12..16 rows, one or two output tiles of
# the interpreter's 32x32 tiles, K chunks that start inside a slot (D=40: 3 K tiles per slot)
SPLIT_CASES = [
    ((8, 8), 1, 40, 24, 2, True),
    ((4, 12), 0, 40, 48, 2, False),
    ([(4, 6), (2, 2), (4, 4)], 5, 40, 24, 2, True),
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=["batched-bias", "batched-2tiles", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_forward_matches_reference(case, dtype):
    if _backend.why_unavailable("triton", DEVICE.type):
        pytest.skip(reason=f"triton on {DEVICE.type}: {_backend.why_unavailable('triton', DEVICE.type)}")
    K = _psp_kernels()
    grids, P, D, out, s, bias = case
    packed = isinstance(grids, list)
    if packed:
        x, w, b, cu, g = packed_inputs(grids, P, D, out, s, dtype, bias=bias, seed=3)
        kw = dict(grids=g, factor=s, num_prefix_tokens=P, cu_seqlens=cu)
        M = sum((h // s) * (w_ // s) for h, w_ in grids)
    else:
        x, w, b = batched_inputs(1, grids, P, D, out, s, dtype, bias=bias, seed=3)
        kw = dict(grids=grids, factor=s, num_prefix_tokens=P)
        M = (grids[0] // s) * (grids[1] // s)
    wave = K.INTERPRETER_WAVE if K.triton_interpreted() else torch.cuda.get_device_properties(0).multi_processor_count
    configs = [dict(K.INTERPRETER, GROUP_M=4)] if K.triton_interpreted() else [c.kwargs for c in K.FWD_CONFIGS]
    assert max(K.fwd_grid(M, out, D, s, c, wave)[1] for c in configs) > 1, "the case must take the split-K path"
    with dinofast.backend("triton"):
        y = dinofast.pixel_shuffle_project(x, w, b, **kw)
    y = y[0] if packed else y
    want = pixel_shuffle_project_reference(*f64(x, w, b), **kw)
    want = want[0] if packed else want
    assert y.dtype == dtype
    assert_close(y, want, dtype)
    with dinofast.backend("triton"):  # same inputs, same split: bit-identical (no atomics)
        again = dinofast.pixel_shuffle_project(x, w, b, **kw)
    assert torch.equal(y, again[0] if packed else again)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_reference(packed):
    if packed:
        x, w, b, cu, g = packed_inputs([(2, 4), (2, 2)], 1, 3, 5, 2, dtype=torch.float64)
        kw = dict(grids=g, factor=2, num_prefix_tokens=1, cu_seqlens=cu)
    else:
        x, w, b = batched_inputs(2, (2, 4), 1, 3, 5, 2, dtype=torch.float64)
        kw = dict(grids=(2, 4), factor=2, num_prefix_tokens=1)
    args = [t.requires_grad_(True) for t in (x, w, b)]

    def f(*a):
        out = dinofast.pixel_shuffle_project(*a, **kw)
        return out[0] if packed else out

    with dinofast.backend("reference"):
        assert torch.autograd.gradcheck(f, args)


def _grads(fn, x, w, b, grad_y):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(*leaves)
    y = y[0] if isinstance(y, tuple) else y
    y.backward(grad_y)
    return [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("P", [0, 5])
@pytest.mark.parametrize("s", [2, 3])
def test_gradients_equal_reference(backend_name, packed, P, s):
    if packed:
        grids = [(h * s // 2, w * s // 2) for h, w in PACKED_GRIDS]
        x, w, b, cu, g = packed_inputs(grids, P, 24, 40, s)
        kw = dict(grids=g, factor=s, num_prefix_tokens=P, cu_seqlens=cu)
        M = sum((h // s) * (w_ // s) for h, w_ in grids)
        grad_y = randn(M, 40, seed=9)
        prefix_rows = [int(c) + p for c in cu[:-1] for p in range(P)]
    else:
        x, w, b = batched_inputs(2, (2 * s, 3 * s), P, 24, 40, s)
        kw = dict(grids=(2 * s, 3 * s), factor=s, num_prefix_tokens=P)
        grad_y = randn(2, 6, 40, seed=9)
    got = _grads(lambda *a: dinofast.pixel_shuffle_project(*a, **kw), x, w, b, grad_y)
    # the oracle's gradients come from plain autograd through reshape/permute, in fp64
    want = _grads(lambda *a: pixel_shuffle_project_reference(*a, **kw), *f64(x, w, b), grad_y.double())
    for g_, w_ in zip(got, want):
        assert_close(g_, w_, torch.float32)
    dx = got[0]
    if packed:
        assert (dx[prefix_rows] == 0).all(), "prefix rows must get zero gradient"
    else:
        assert (dx[:, :P] == 0).all(), "prefix rows must get zero gradient"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_against_fp64(backend_name, dtype):
    x, w, b, cu, g = packed_inputs(PACKED_GRIDS, 5, 40, 48, 2, dtype)
    kw = dict(grids=g, factor=2, num_prefix_tokens=5, cu_seqlens=cu)
    grad_y = randn(sum((h // 2) * (w_ // 2) for h, w_ in PACKED_GRIDS), 48, dtype=dtype, seed=9)
    got = _grads(lambda *a: dinofast.pixel_shuffle_project(*a, **kw), x, w, b, grad_y)
    want = _grads(lambda *a: pixel_shuffle_project_reference(*a, **kw), *f64(x, w, b), grad_y.double())
    for g_, w_ in zip(got, want):
        assert g_.dtype == dtype
        assert_close(g_, w_, dtype)


def test_frozen_input_gets_weight_grads_only(backend_name):
    # a frozen vision tower: x does not require grad; weight does; no bias
    x, w, _ = batched_inputs(2, (4, 6), 5, 24, 40, 2, bias=False)
    w = w.requires_grad_()
    y = dinofast.pixel_shuffle_project(x, w, grids=(4, 6), factor=2, num_prefix_tokens=5)
    grad_y = randn(*y.shape, seed=3)
    y.backward(grad_y)
    assert x.grad is None
    want = pixel_shuffle(x.double(), 4, 6, 2, 5).flatten(0, 1).t() @ grad_y.double().flatten(0, 1)
    assert_close(w.grad, want.t(), torch.float32)


# ---------------------------------------------------------------------------------------------
# module and helpers
# ---------------------------------------------------------------------------------------------
class NanoVLMModalityProjector(torch.nn.Module):
    """The layout of nanoVLM's ModalityProjector: `proj` = Linear(in*s*s, out, bias=False)."""

    def __init__(self, in_dim, out_dim, factor):
        super().__init__()
        self.factor = factor
        self.proj = torch.nn.Linear(in_dim * factor * factor, out_dim, bias=False)

    def forward(self, x):
        return nanovlm_modality_projector(x, self.proj.weight, self.factor)


def test_module_loads_nanovlm_checkpoint(backend_name):
    torch.manual_seed(0)
    theirs = NanoVLMModalityProjector(24, 40, 4).to(DEVICE)
    ours = dinofast.nn.PixelShuffleProjector(24, 40, 4).to(DEVICE)
    assert set(ours.state_dict()) == {"proj.weight"}
    assert ours.proj.weight.shape == (40, 24 * 16)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = randn(2, 64, 24, seed=5)
    assert_close(ours(x, (8, 8)), nanovlm_modality_projector(x.double(), theirs.proj.weight.double(), 4),
                 torch.float32)
    assert_close(ours(x, (8, 8)), theirs(x))
    assert set(dinofast.nn.PixelShuffleProjector(24, 40, 4, bias=True).state_dict()) == {"proj.weight", "proj.bias"}


def test_module_packed_with_prefix(backend_name):
    m = dinofast.nn.PixelShuffleProjector(24, 40, 2, bias=True, num_prefix_tokens=5).to(DEVICE)
    torch.nn.init.normal_(m.proj.bias)
    x, _, _, cu, g = packed_inputs(PACKED_GRIDS, 5, 24, 40, 2)
    y, out_cu = m(x, g, cu_seqlens=cu)
    want, want_cu = pixel_shuffle_project_reference(x, m.proj.weight.detach(), m.proj.bias.detach(), grids=g,
                                                    factor=2, num_prefix_tokens=5, cu_seqlens=cu)
    assert_close(y, want)
    assert torch.equal(out_cu, want_cu)
    with pytest.raises(ValueError, match="in_dim = 24"):
        m(x[:, :16], g, cu_seqlens=cu)


def test_shuffled_grid():
    assert dinofast.shuffled_grid(40, 60, 4) == (10, 15)
    assert dinofast.shuffled_grid(32, 32, 2) == (16, 16)
    assert dinofast.shuffled_grid(7, 5, 1) == (7, 5)
    with pytest.raises(ValueError, match=r"grids.*divisible by factor 4.*\(41, 60\)"):
        dinofast.shuffled_grid(41, 60, 4)
    with pytest.raises(ValueError, match=r"factor"):
        dinofast.shuffled_grid(40, 60, 0)
    with pytest.raises(ValueError, match=r"grids"):
        dinofast.shuffled_grid(0, 60, 4)


# ---------------------------------------------------------------------------------------------
# torch.compile (CPU, through the reference and C++ registrations)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("packed", [False, True])
def test_torch_compile_fullgraph(backend, packed):
    skip_unless_available(backend)
    if packed:
        x0, w0, b0, cu, g = (t.cpu() for t in packed_inputs([(4, 6), (2, 4)], 5, 24, 40, 2))
        kw = dict(grids=g, factor=2, num_prefix_tokens=5, cu_seqlens=cu)
    else:
        x0, w0, b0 = (t.cpu() for t in batched_inputs(2, (4, 6), 5, 24, 40, 2))
        kw = dict(grids=(4, 6), factor=2, num_prefix_tokens=5)

    def f(x, w, b):
        y = dinofast.pixel_shuffle_project(x * 2, w, b, **kw)
        y = y[0] if packed else y
        return (y * y).sum()

    with dinofast.backend(backend):
        assert_compiles_like_eager(f, [x0, w0, b0])


# ---------------------------------------------------------------------------------------------
# bad input: ValueError naming the argument and the numbers, in Python; TORCH_CHECK in C++
# ---------------------------------------------------------------------------------------------
def _bad_cases():
    x, w, b = batched_inputs(1, (4, 6), 5, 8, 12, 2)
    px, pw, pb, cu, g = packed_inputs([(4, 6), (2, 2)], 5, 8, 12, 2)
    bad_cu = cu.clone()
    bad_cu[1] += 1
    op = dinofast.pixel_shuffle_project
    return [
        (r"grids.*divisible by factor 4.*\(4, 6\)", lambda: op(x, randn(12, 8 * 16), grids=(4, 6), factor=4,
                                                              num_prefix_tokens=5)),
        (r"weight.*D\*s\*s = 8\*2\*2 = 32.*\(12, 24\)", lambda: op(x, w[:, :24], grids=(4, 6), factor=2,
                                                                  num_prefix_tokens=5)),
        (r"x: expected N = num_prefix_tokens \+ Hp\*Wp = 5 \+ 4\*4 = 21.*29", lambda: op(x, w, grids=(4, 4),
                                                                                       factor=2, num_prefix_tokens=5)),
        (r"x: expected N = num_prefix_tokens \+ Hp\*Wp = 1 \+ 4\*6 = 25", lambda: op(x, w, grids=(4, 6), factor=2,
                                                                                   num_prefix_tokens=1)),
        (r"weight: expected dtype", lambda: op(x, w.half(), grids=(4, 6), factor=2, num_prefix_tokens=5)),
        (r"bias: expected dtype", lambda: op(x, w, b.double(), grids=(4, 6), factor=2, num_prefix_tokens=5)),
        (r"bias: expected \[out\] = \[12\]", lambda: op(x, w, b[:5], grids=(4, 6), factor=2, num_prefix_tokens=5)),
        (r"x: expected a 3-D", lambda: op(x[0], w, grids=(4, 6), factor=2, num_prefix_tokens=5)),
        (r"x: expected dtype", lambda: op(x.int(), w, grids=(4, 6), factor=2, num_prefix_tokens=5)),
        (r"factor: expected a positive int", lambda: op(x, w, grids=(4, 6), factor=0, num_prefix_tokens=5)),
        (r"factor: expected a positive int", lambda: op(x, w, grids=(4, 6), factor=2.0, num_prefix_tokens=5)),
        (r"num_prefix_tokens", lambda: op(x, w, grids=(4, 6), factor=2, num_prefix_tokens=-1)),
        (r"grids: expected \(Hp, Wp\)", lambda: op(x, w, grids=(4, 6, 1), factor=2, num_prefix_tokens=5)),
        # packed metadata
        (r"cu_seqlens", lambda: op(px, pw, grids=g, factor=2, num_prefix_tokens=5, cu_seqlens=cu.long())),
        (r"cu_seqlens.*segment 0 of num_prefix_tokens \+ Hp\*Wp = 5 \+ 4\*6 = 29 tokens.*30",
         with_debug_checks(lambda: op(px, pw, grids=g, factor=2, num_prefix_tokens=5, cu_seqlens=bad_cu))),
        (r"cu_seqlens", lambda: op(px, pw, grids=g, factor=2, num_prefix_tokens=5, cu_seqlens=cu[:-1])),
        (r"x: expected T - n\*num_prefix_tokens = 37 - 2\*5 patch tokens, a multiple of factor\^2 = 4",
         lambda: op(px[:-1], pw, grids=g, factor=2, num_prefix_tokens=5, cu_seqlens=cu)),
        (r"cu_seqlens\[-1\] == 34", with_debug_checks(lambda: op(px[:-4], pw, grids=g, factor=2, num_prefix_tokens=5,
                                                                  cu_seqlens=cu))),
        (r"grids.*image 1 both divisible by factor 2.*\(1, 4\)",
         with_debug_checks(lambda: op(px, pw, grids=torch.tensor([[4, 6], [1, 4]], dtype=torch.int32, device=DEVICE),
                                      factor=2, num_prefix_tokens=5, cu_seqlens=cu))),
        (r"grids", lambda: op(px, pw, grids=g[:1], factor=2, num_prefix_tokens=5, cu_seqlens=cu)),
        (r"grids", lambda: op(px, pw, grids=g.long(), factor=2, num_prefix_tokens=5, cu_seqlens=cu)),
        (r"x: expected a 2-D", lambda: op(px[None], pw, grids=g, factor=2, num_prefix_tokens=5, cu_seqlens=cu)),
    ]


test_bad_input_raises_value_error = value_error_test(_bad_cases)


@needs_C
def test_cpp_checks_its_inputs():
    op = torch.ops.dinofast_C.pixel_shuffle_project
    x, w = torch.randn(1, 29, 8), torch.randn(12, 32)
    y = torch.empty(6, 12)
    with pytest.raises(RuntimeError, match="N: expected"):
        op(x, w, None, y, None, None, None, 4, 4, 2, 5)
    with pytest.raises(RuntimeError, match="in-features"):
        op(x, torch.randn(12, 24), None, y, None, None, None, 4, 6, 2, 5)
    with pytest.raises(RuntimeError, match="divisible"):
        op(x, w, None, y, None, None, None, 3, 8, 2, 5)
    with pytest.raises(RuntimeError, match="rows"):
        op(x, w, None, torch.empty(5, 12), None, None, None, 4, 6, 2, 5)
    cu = torch.tensor([0, 29], dtype=torch.int32)
    g = torch.tensor([[4, 6]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="out_cu_seqlens"):
        op(x, w, None, y, cu, g, torch.tensor([0, 5], dtype=torch.int32), 0, 0, 2, 5)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        op(x, w, None, y, torch.tensor([0, 28], dtype=torch.int32), g, torch.tensor([0, 6], dtype=torch.int32),
           0, 0, 2, 5)
    with pytest.raises(RuntimeError, match="grad_x"):
        torch.ops.dinofast_C.pixel_shuffle_project_backward(y, x, w, torch.empty(1, 28, 8), None, None, None, None,
                                                            None, 4, 6, 2, 5)
    # sizes that wrap around int64 must not pass the size checks (this one used to segfault)
    with pytest.raises(RuntimeError, match=r"Hp\*Wp: 4 \* 4611686018427387906 overflows int64"):
        torch.ops.dinofast_C.pixel_shuffle_project_backward(y, x, w, None, torch.empty_like(w), None, None, None,
                                                            None, 4, 2**62 + 2, 2, 5)
    with pytest.raises(RuntimeError, match=r"factor\*factor: .* overflows int64"):
        op(x, w, None, y, None, None, None, 2**32, 2**32, 2**32, 5)
    with pytest.raises(RuntimeError, match=r"N: expected num_prefix_tokens \+ Hp\*Wp = 4611686018427387909"):
        op(x, torch.randn(12, 8), None, y, None, None, None, 2**31, 2**31, 1, 5)

