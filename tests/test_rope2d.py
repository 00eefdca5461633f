"""rope2d: every backend against the reference; the reference against transformers."""
import pytest
import torch
from hypothesis import given, strategies as st

import dinofast
from dinofast.reference.rope2d import inv_freq, rope2d_reference
from tests.conftest import (
    DEVICE,
    assert_close,
    assert_compiles_like_eager,
    assert_nan_like,
    make_cu_seqlens,
    needs_C,
    randn,
    skip_unless_available,
    value_error_test,
    with_debug_checks,
)

GRIDS = [(4, 4), (3, 7), (1, 6), (6, 1), (1, 1)]


def batched_inputs(B, H, grid, P, D, dtype=torch.float32, layout="bhnd", seed=0):
    N = P + grid[0] * grid[1]
    shape = (B, H, N, D) if layout == "bhnd" else (B, N, H, D)
    q, k = randn(*shape, dtype=dtype, seed=seed), randn(*shape, dtype=dtype, seed=seed + 1)
    if layout == "bnhd":  # a [B, N, H, D] buffer seen as [B, H, N, D], as transformers makes it
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    return q, k


def packed_inputs(grids, P, H, D, dtype=torch.float32, seed=0):
    lengths = [P + h * w for h, w in grids]
    cu = make_cu_seqlens(lengths)
    T = sum(lengths)
    g = torch.tensor(grids, dtype=torch.int32, device=DEVICE)
    return randn(T, H, D, dtype=dtype, seed=seed), randn(T, H, D, dtype=dtype, seed=seed + 1), cu, g


# ---------------------------------------------------------------------------------------------
# parity of every backend with the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("P", [0, 1, 5])
def test_batched_fp32(kernel_backend, D, layout, P):
    q, k = batched_inputs(2, 3, (5, 3), P, D, layout=layout)
    out_q, out_k = dinofast.rope2d(q, k, (5, 3), num_prefix_tokens=P)
    ref_q, ref_k = rope2d_reference(q, k, (5, 3), num_prefix_tokens=P)
    assert out_q.shape == q.shape and out_q.dtype == q.dtype
    assert_close(out_q, ref_q)
    assert_close(out_k, ref_k)
    assert torch.equal(out_q[:, :, :P], q[:, :, :P]), "prefix tokens must pass through untouched"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_low_precision_against_fp64(kernel_backend, dtype, D):
    q, k = batched_inputs(2, 2, (4, 6), 5, D, dtype=dtype, layout="bnhd")
    out_q, out_k = dinofast.rope2d(q, k, (4, 6), num_prefix_tokens=5)
    ref_q, ref_k = rope2d_reference(q.double(), k.double(), (4, 6), num_prefix_tokens=5)
    assert out_q.dtype == dtype
    assert_close(out_q, ref_q, dtype)
    assert_close(out_k, ref_k, dtype)


# The cpp row loops run in vectors (16 fp32 lanes with AVX-512, 8 with AVX2, a compile-time trip
# count for D/4 == 16) with remainder iterations: head dims whose D/4 lies below, at, between and
# across those widths, an odd token count, in every low-precision dtype, out of place and in place.
# AVX-512 bf16 rows go 32 channels at a time: at D 64 and 192 one such chunk takes its first 16
# angles from the row table and the next 16 from the column table.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [4, 8, 12, 20, 36, 60, 64, 68, 72, 128, 132, 192, 256])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("isa", ["native", "avx2", "baseline"])
def test_vector_widths(kernel_backend, D, dtype, layout, isa, monkeypatch):
    if isa != "native":  # the cpp kernel's narrower builds (a cap: a CPU without them runs its own)
        monkeypatch.setenv("DINOFAST_CPU_ISA", isa)
    grid, P = (3, 5), 2  # 17 tokens
    q, k = batched_inputs(2, 3, grid, P, D, dtype=dtype, layout=layout, seed=D)
    out_q, out_k = dinofast.rope2d(q, k, grid, num_prefix_tokens=P)
    ref_q, ref_k = rope2d_reference(q.double(), k.double(), grid, num_prefix_tokens=P)
    assert out_q.dtype == dtype and out_q.stride() == q.stride()
    assert_close(out_q, ref_q, dtype)
    assert_close(out_k, ref_k, dtype)
    assert torch.equal(out_q[:, :, :P], q[:, :, :P]) and torch.equal(out_k[:, :, :P], k[:, :, :P])
    q2, k2 = q.clone(), k.clone()  # same strides: the in-place rows alias their outputs
    dinofast.rope2d_(q2, k2, grid, num_prefix_tokens=P)
    assert torch.equal(q2, out_q) and torch.equal(k2, out_k), "in place must equal out of place bit for bit"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [12, 64, 72])
def test_nan_inf_in_vector_lanes(kernel_backend, dtype, D):
    """NaN and +-Inf in patch rows, at lanes inside a vector and in the remainder: NaN where the
    reference has NaN (a NaN rounds to NaN in bf16/fp16, never to a finite value), in place too."""
    q, k = batched_inputs(1, 2, (2, 3), 1, D, dtype=dtype, seed=12)
    q[0, 0, 2, 0], q[0, 1, 3, D // 2 + 1], q[0, 1, 4, D - 1] = float("nan"), float("inf"), float("-inf")
    k[0, 0, 5, D // 4], k[0, 1, 6, D // 2 - 1] = float("nan"), float("inf")
    out_q, out_k = dinofast.rope2d(q, k, (2, 3), num_prefix_tokens=1)
    ref_q, ref_k = rope2d_reference(q.double(), k.double(), (2, 3), num_prefix_tokens=1)
    assert_nan_like(out_q, ref_q)
    assert_nan_like(out_k, ref_k)
    assert out_q.isnan().any() and out_k.isnan().any()
    finite = ref_q.isfinite()
    assert_close(out_q[finite], ref_q[finite], dtype)
    q2, k2 = q.clone(), k.clone()
    dinofast.rope2d_(q2, k2, (2, 3), num_prefix_tokens=1)
    assert torch.equal(q2.isnan(), out_q.isnan()) and torch.equal(q2[~q2.isnan()], out_q[~out_q.isnan()])


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_bf16_denormals_are_kept(kernel_backend, D, layout):
    """bf16 results below fp32's normal range (|x| < 1.2e-38) round as torch rounds them, to bf16
    denormals, not to zero (a hardware conversion that flushes them would): rows of tiny values, one
    of them beside a NaN, must match the fp64 reference to one denormal step. Not Triton on a CPU:
    its interpreter converts bf16 denormals wrongly on load (3e-39 reads as 3.7e-40)."""
    if kernel_backend == "triton" and DEVICE.type == "cpu":
        pytest.skip(reason="the Triton interpreter mis-converts bf16 denormals")
    q, k = batched_inputs(1, 3, (2, 4), 1, D, dtype=torch.float32, layout=layout, seed=21)
    q, k = ((x.clamp(-2.5, 2.5) * 4e-39).bfloat16() for x in (q, k))
    assert (q.float().abs() < 1.17e-38).all() and (q != 0).float().mean() > 0.9  # denormal inputs
    q[0, 1, 3, 2] = float("nan")
    out_q, out_k = dinofast.rope2d(q, k, (2, 4), num_prefix_tokens=1)
    ref_q, ref_k = rope2d_reference(q.double(), k.double(), (2, 4), num_prefix_tokens=1)
    step = 2.0 ** -133  # bf16's denormal spacing
    for out, ref in ((out_q, ref_q), (out_k, ref_k)):
        assert_nan_like(out, ref)
        finite = ~ref.isnan()
        assert ((out.double() - ref)[finite].abs() <= step).all()
        assert (out.double()[finite & (ref.abs() > 2 * step)] != 0).all(), "denormal results flushed to zero"


@pytest.mark.parametrize("D", [64, 80])
def test_packed_equals_per_image_batched(kernel_backend, D):
    grids, P = [(3, 4), (1, 7), (5, 1), (2, 2)], 5
    q, k, cu, g = packed_inputs(grids, P, 3, D)
    out_q, out_k = dinofast.rope2d(q, k, g, num_prefix_tokens=P, cu_seqlens=cu)
    ref_q, ref_k = rope2d_reference(q, k, g, num_prefix_tokens=P, cu_seqlens=cu)
    assert_close(out_q, ref_q)
    assert_close(out_k, ref_k)
    for i, grid in enumerate(grids):
        s, e = cu[i].item(), cu[i + 1].item()
        one_q, one_k = dinofast.rope2d(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None], grid,
                                       num_prefix_tokens=P)
        assert_close(out_q[s:e], one_q[0].transpose(0, 1))
        assert_close(out_k[s:e], one_k[0].transpose(0, 1))


def test_inplace_equals_out_of_place(kernel_backend):
    q, k, cu, g = packed_inputs([(3, 5), (2, 2)], 1, 2, 64)
    ref_q, ref_k = rope2d_reference(q, k, g, num_prefix_tokens=1, cu_seqlens=cu)
    q2, k2 = q.clone(), k.clone()
    ret = dinofast.rope2d_(q2, k2, g, num_prefix_tokens=1, cu_seqlens=cu)
    assert ret[0] is q2 and ret[1] is k2
    assert_close(q2, ref_q)
    assert_close(k2, ref_k)


def test_periods_override_theta(kernel_backend):
    D = 64
    q, k = batched_inputs(1, 2, (4, 5), 5, D)
    # bf16-rounded periods, as the original release stores them: they must be used as given
    periods = (100.0 ** (torch.arange(D // 4, dtype=torch.float32) * 4 / D)).bfloat16().float().to(DEVICE)
    out_q, _ = dinofast.rope2d(q, k, (4, 5), num_prefix_tokens=5, periods=periods)
    ref_q, _ = rope2d_reference(q, k, (4, 5), num_prefix_tokens=5, periods=periods)
    theta_q, _ = rope2d_reference(q, k, (4, 5), num_prefix_tokens=5)
    assert_close(out_q, ref_q)
    assert (ref_q - theta_q).abs().max() > 1e-4, "bf16 periods must differ from theta's"


def test_periods_changed_in_place_are_rechecked_and_reinverted(kernel_backend):
    """The check and the inverse of a periods tensor are kept between calls (a checkpoint's periods go
    to every layer): a change in place must reach the next call, a bad value as a ValueError and new
    valid values in the result, out of place and in place (varlen_attention: its own test)."""
    D, grid, P = 64, (4, 5), 5
    q, k = batched_inputs(1, 2, grid, P, D)
    # on the host, where the check reads the values (on a GPU it is an asynchronous assertion)
    periods = 100.0 ** (torch.arange(D // 4, dtype=torch.float32) * 4 / D)
    first, _ = dinofast.rope2d(q, k, grid, num_prefix_tokens=P, periods=periods)
    assert_close(first, rope2d_reference(q, k, grid, num_prefix_tokens=P, periods=periods)[0])
    q128, k128 = batched_inputs(1, 2, grid, P, 2 * D)
    with pytest.raises(ValueError, match=r"periods.*\[32\]"):  # checked against each call's head dim
        dinofast.rope2d(q128, k128, grid, num_prefix_tokens=P, periods=periods)
    periods[3] = 0.0
    with pytest.raises(ValueError, match="periods"):
        dinofast.rope2d(q, k, grid, num_prefix_tokens=P, periods=periods)
    with pytest.raises(ValueError, match="periods"):
        dinofast.rope2d_(q.clone(), k.clone(), grid, num_prefix_tokens=P, periods=periods)
    periods.copy_(periods.new_tensor([1.5 ** i for i in range(D // 4)]))
    ref_q, ref_k = rope2d_reference(q, k, grid, num_prefix_tokens=P, periods=periods)
    out_q, out_k = dinofast.rope2d(q, k, grid, num_prefix_tokens=P, periods=periods)
    assert_close(out_q, ref_q)
    assert_close(out_k, ref_k)
    assert (out_q - first).abs().max() > 1e-2, "the new periods must rotate differently"
    q2, k2 = q.clone(), k.clone()
    dinofast.rope2d_(q2, k2, grid, num_prefix_tokens=P, periods=periods)
    assert torch.equal(q2, out_q) and torch.equal(k2, out_k)


def test_new_periods_tensors_each_get_their_own_values(kernel_backend):
    """Fresh periods tensors, one per call and freed after it, often come back at the address (and
    Python id) of the last one, with the same version: each must still rotate by its own values."""
    D, grid, P = 64, (3, 4), 1
    q, k = batched_inputs(1, 2, grid, P, D, seed=5)
    base = 100.0 ** (torch.arange(D // 4, dtype=torch.float32) * 4 / D)
    for i in range(12):
        periods = base * (1.0 + 0.25 * i)
        out_q, _ = dinofast.rope2d(q, k, grid, num_prefix_tokens=P, periods=periods)
        assert_close(out_q, rope2d_reference(q, k, grid, num_prefix_tokens=P, periods=periods)[0])
        del periods, out_q


def test_periods_first_seen_in_inference_mode_then_trained(kernel_backend):
    """The inverse kept for a periods tensor first used under inference_mode is a normal tensor: a
    later differentiable call saves it for its backward, and the gradient is the reference's."""
    D, grid, P = 64, (3, 4), 2
    q, k = batched_inputs(1, 2, grid, P, D, seed=4)
    periods = (100.0 ** (torch.arange(D // 4, dtype=torch.float32) * 4 / D)).bfloat16().float().to(DEVICE)
    with torch.inference_mode():
        dinofast.rope2d(q, k, grid, num_prefix_tokens=P, periods=periods)
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    out_q, out_k = dinofast.rope2d(qg, kg, grid, num_prefix_tokens=P, periods=periods)
    w = randn(*out_q.shape, seed=9)
    ((out_q * w).sum() + out_k.sum()).backward()
    qr, kr = q.double().requires_grad_(), k.double().requires_grad_()
    ref_q, ref_k = rope2d_reference(qr, kr, grid, num_prefix_tokens=P, periods=periods.double())
    ((ref_q * w.double()).sum() + ref_k.sum()).backward()
    assert_close(qg.grad, qr.grad, torch.float32)
    assert_close(kg.grad, kr.grad, torch.float32)


def test_coord_transform(kernel_backend):
    q, k, cu, g = packed_inputs([(3, 5), (4, 2), (1, 1)], 5, 2, 64)
    gen = torch.Generator().manual_seed(3)
    t = dinofast.sample_coord_transform(3, shift=0.2, jitter=1.3, rescale=2.0, generator=gen).to(DEVICE)
    out_q, out_k = dinofast.rope2d(q, k, g, num_prefix_tokens=5, cu_seqlens=cu, coord_transform=t)
    ref_q, ref_k = rope2d_reference(q, k, g, num_prefix_tokens=5, cu_seqlens=cu, coord_transform=t)
    plain_q, _ = rope2d_reference(q, k, g, num_prefix_tokens=5, cu_seqlens=cu)
    assert_close(out_q, ref_q)
    assert_close(out_k, ref_k)
    assert (plain_q - ref_q).abs().max() > 1e-3


@given(
    B=st.integers(1, 2), H=st.integers(1, 3), Hp=st.integers(1, 6), Wp=st.integers(1, 6),
    P=st.integers(0, 5), D=st.sampled_from([4, 12, 64, 80, 96, 128, 256]), layout=st.sampled_from(["bhnd", "bnhd"]),
)
def test_hypothesis_shapes(kernel_backend, B, H, Hp, Wp, P, D, layout):
    q, k = batched_inputs(B, H, (Hp, Wp), P, D, layout=layout, seed=Hp * 7 + Wp)
    out_q, out_k = dinofast.rope2d(q, k, (Hp, Wp), num_prefix_tokens=P)
    ref_q, ref_k = rope2d_reference(q, k, (Hp, Wp), num_prefix_tokens=P)
    assert_close(out_q, ref_q)
    assert_close(out_k, ref_k)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
def test_gradcheck_reference():
    q, k, cu, g = packed_inputs([(2, 3), (1, 2)], 1, 2, 8, dtype=torch.float64)
    q.requires_grad_(True)
    k.requires_grad_(True)
    with dinofast.backend("reference"):
        assert torch.autograd.gradcheck(
            lambda a, b: dinofast.rope2d(a, b, g, num_prefix_tokens=1, cu_seqlens=cu), (q, k))


@pytest.mark.parametrize("packed", [False, True])
def test_gradients_equal_reference(kernel_backend, packed):
    if packed:
        q, k, cu, g = packed_inputs([(3, 4), (2, 1)], 5, 2, 64)
        kw = dict(num_prefix_tokens=5, cu_seqlens=cu)
    else:
        q, k = batched_inputs(2, 2, (3, 4), 5, 64, layout="bnhd")
        g, kw = (3, 4), dict(num_prefix_tokens=5)
    dq_out, dk_out = randn(*q.shape, seed=7), randn(*k.shape, seed=8)

    def grads(backend):
        a, b = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        with dinofast.backend(backend):
            oq, ok = dinofast.rope2d(a, b, g, **kw)
        torch.autograd.backward((oq, ok), (dq_out, dk_out))
        return a.grad, b.grad

    got, want = grads(kernel_backend), grads("reference")
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    # the adjoint of a rotation is its inverse: grad = rotate(-angle) of the incoming grad
    inv_q, _ = rope2d_reference(dq_out, dk_out, g, inverse=True, **kw)
    assert_close(got[0], inv_q)


def test_inplace_rejects_autograd():
    q, k = batched_inputs(1, 1, (2, 2), 0, 8)
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="rope2d_"):
        dinofast.rope2d_(q, k, (2, 2), num_prefix_tokens=0)


# ---------------------------------------------------------------------------------------------
# head groups, many images, low-precision strided views, NaN/Inf, aliasing, metadata layouts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("H", [6, 12])  # the Triton kernel handles 4 heads per program: 2 and 3 groups
@pytest.mark.parametrize("packed", [False, True])
def test_many_heads(kernel_backend, H, packed):
    if packed:
        q, k, cu, g = packed_inputs([(2, 3), (1, 2)], 5, H, 16, seed=4)
        out_q, out_k = dinofast.rope2d(q, k, g, num_prefix_tokens=5, cu_seqlens=cu)
        ref_q, ref_k = rope2d_reference(q, k, g, num_prefix_tokens=5, cu_seqlens=cu)
    else:
        q, k = batched_inputs(2, H, (2, 3), 1, 16, layout="bnhd", seed=4)
        out_q, out_k = dinofast.rope2d(q, k, (2, 3), num_prefix_tokens=1)
        ref_q, ref_k = rope2d_reference(q, k, (2, 3), num_prefix_tokens=1)
    assert_close(out_q, ref_q)
    assert_close(out_k, ref_k)


def test_ten_packed_images(kernel_backend):
    grids = [(1 + i % 3, 1 + (2 * i) % 5) for i in range(10)]
    q, k, cu, g = packed_inputs(grids, 5, 2, 16, seed=5)
    out_q, out_k = dinofast.rope2d(q, k, g, num_prefix_tokens=5, cu_seqlens=cu)
    ref_q, ref_k = rope2d_reference(q, k, g, num_prefix_tokens=5, cu_seqlens=cu)
    assert_close(out_q, ref_q)
    assert_close(out_k, ref_k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_views_of_a_qkv_buffer(kernel_backend, dtype):
    """q, k as strided views of one [T, 3, H, D] projection (T and H strides not the packed ones)."""
    grids = [(3, 2), (1, 4)]
    _, _, cu, g = packed_inputs(grids, 1, 2, 64)
    qkv = randn(int(cu[-1]), 3, 2, 64, dtype=dtype, seed=6)
    q, k = qkv[:, 0], qkv[:, 1]
    assert not q.is_contiguous()
    out_q, out_k = dinofast.rope2d(q, k, g, num_prefix_tokens=1, cu_seqlens=cu)
    ref_q, ref_k = rope2d_reference(q.double(), k.double(), g, num_prefix_tokens=1, cu_seqlens=cu)
    assert_close(out_q, ref_q, dtype)
    assert_close(out_k, ref_k, dtype)
    q2 = q.clone()
    dinofast.rope2d_(q, k, g, num_prefix_tokens=1, cu_seqlens=cu)  # in place: interleaved views are fine
    assert torch.equal(q, out_q) and torch.equal(k, out_k)
    assert not torch.equal(q, q2)


@pytest.mark.parametrize("packed", [False, True])
def test_prefix_tokens_are_copied_bit_exactly(kernel_backend, packed):
    """An Inf or NaN in a CLS/register token must come out as it went in (not Inf*1 - x*0 = NaN)."""
    if packed:
        q, k, cu, g = packed_inputs([(2, 2), (1, 3)], 5, 2, 16, seed=7)
        q[cu[1] + 2, 1, 0], k[3, 0, 9] = float("inf"), float("nan")
        out_q, out_k = dinofast.rope2d(q, k, g, num_prefix_tokens=5, cu_seqlens=cu)
        ref_q, ref_k = rope2d_reference(q, k, g, num_prefix_tokens=5, cu_seqlens=cu)
        prefix = torch.cat([torch.arange(int(cu[i]), int(cu[i]) + 5) for i in range(2)])
        assert torch.equal(out_q[prefix], q[prefix]) and torch.equal(out_k[prefix].isnan(), k[prefix].isnan())
    else:
        q, k = batched_inputs(2, 2, (2, 3), 5, 16, seed=7)
        q[1, 0, 2, 0], k[0, 1, 4, 3] = float("-inf"), float("nan")
        out_q, out_k = dinofast.rope2d(q, k, (2, 3), num_prefix_tokens=5)
        ref_q, ref_k = rope2d_reference(q, k, (2, 3), num_prefix_tokens=5)
        assert torch.equal(out_q[:, :, :5], q[:, :, :5]) and torch.equal(out_k[:, :, :5].isnan(), k[:, :, :5].isnan())
    assert torch.equal(out_q.isnan(), ref_q.isnan()) and torch.equal(out_k.isnan(), ref_k.isnan())
    assert torch.equal(out_q.isinf(), ref_q.isinf())


def test_reference_copies_prefix_tokens_bit_exactly():
    q, k = batched_inputs(1, 2, (2, 2), 3, 8, seed=8)
    q[0, 1, 1, 0] = float("inf")
    out_q, _ = rope2d_reference(q, k, (2, 2), num_prefix_tokens=3)
    assert torch.equal(out_q[:, :, :3], q[:, :, :3])


def test_nan_patch_token_stays_in_its_row(kernel_backend):
    q, k = batched_inputs(1, 2, (2, 3), 1, 16, seed=9)
    q[0, 0, 3, 5] = float("nan")
    out_q, _ = dinofast.rope2d(q, k, (2, 3), num_prefix_tokens=1)
    ref_q, _ = rope2d_reference(q, k, (2, 3), num_prefix_tokens=1)
    assert_nan_like(out_q, ref_q)
    assert out_q[0, 0, 3].isnan().any() and not out_q[0, 1].isnan().any()


def _aliasing_cases():
    base = torch.randn(1, 2, 11, 8)
    buf = torch.randn(2 * 11 * 8 + 8)
    return {
        "same tensor": lambda: (base, base),
        "overlapping views": lambda: (buf[:176].view(1, 2, 11, 8), buf[8:184].view(1, 2, 11, 8)),
        "expanded heads": lambda: (torch.randn(1, 1, 11, 8).expand(1, 2, 11, 8), torch.randn(1, 2, 11, 8)),
        "as_strided rows overlap": lambda: (buf.as_strided((1, 2, 11, 8), (176, 88, 4, 1)), torch.randn(1, 2, 11, 8)),
        "k overlaps itself": lambda: (torch.randn(1, 2, 11, 8), buf.as_strided((1, 2, 11, 8), (0, 8, 8, 1))),
    }


@pytest.mark.parametrize("case", list(_aliasing_cases()))
def test_inplace_refuses_aliasing(case):
    q, k = _aliasing_cases()[case]()
    before = (q.clone(), k.clone())
    with pytest.raises(ValueError, match=r"(q|k).*expected (tensors that share no memory|a tensor whose elements are "
                                         r"distinct memory locations)"):
        dinofast.rope2d_(q, k, (2, 3), num_prefix_tokens=5)
    assert torch.equal(q, before[0]) and torch.equal(k, before[1]), "nothing may be written before the check"


def test_out_of_place_accepts_aliased_inputs(kernel_backend):
    """rope2d writes new tensors: q and k may be the same tensor or expanded views."""
    q = torch.randn(1, 1, 11, 8, device=DEVICE).expand(1, 2, 11, 8)
    out_q, out_k = dinofast.rope2d(q, q, (2, 3), num_prefix_tokens=5)
    ref_q, _ = rope2d_reference(q.contiguous(), q.contiguous(), (2, 3), num_prefix_tokens=5)
    assert_close(out_q, ref_q)
    assert_close(out_k, ref_q)


def test_non_contiguous_metadata_and_size_one_strides(kernel_backend):
    q, k, cu, g = packed_inputs([(2, 3), (1, 2)], 1, 2, 16, seed=10)
    cu_view = torch.stack([cu, cu], 1)[:, 0]  # stride 2
    g_view = torch.stack([g[:, 0], g[:, 0], g[:, 1]], 1)[:, ::2]  # strides (3, 2)
    assert not cu_view.is_contiguous() and not g_view.is_contiguous()
    out_q, _ = dinofast.rope2d(q, k, g_view, num_prefix_tokens=1, cu_seqlens=cu_view)
    assert_close(out_q, rope2d_reference(q, k, g, num_prefix_tokens=1, cu_seqlens=cu)[0])
    # a size-1 head axis with an arbitrary stride
    qb, kb = batched_inputs(2, 1, (2, 3), 1, 16, seed=11)
    q1 = qb.as_strided(qb.shape, (qb.stride(0), 12345, qb.stride(2), 1))
    out_q1, _ = dinofast.rope2d(q1, kb, (2, 3), num_prefix_tokens=1)
    assert_close(out_q1, rope2d_reference(qb, kb, (2, 3), num_prefix_tokens=1)[0])


def test_reference_packed_equals_per_image_batched():
    """The reference's packed path against its batched path (checked against transformers below)."""
    grids = [(3, 4), (1, 7), (5, 1)]
    q, k, cu, g = packed_inputs(grids, 5, 2, 16, seed=12)
    out_q, out_k = rope2d_reference(q, k, g, num_prefix_tokens=5, cu_seqlens=cu)
    for i, grid in enumerate(grids):
        s, e = int(cu[i]), int(cu[i + 1])
        one_q, one_k = rope2d_reference(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None], grid,
                                        num_prefix_tokens=5)
        assert torch.equal(out_q[s:e], one_q[0].transpose(0, 1))
        assert torch.equal(out_k[s:e], one_k[0].transpose(0, 1))


# ---------------------------------------------------------------------------------------------
# the reference against transformers (random small config, nothing downloaded)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(4, 4), (3, 7), (1, 6), (6, 1)])
@pytest.mark.parametrize("P", [0, 1, 5])
def test_reference_matches_transformers(grid, P):
    from transformers import DINOv3ViTConfig
    from transformers.models.dinov3_vit.modeling_dinov3_vit import (
        DINOv3ViTRopePositionEmbedding, apply_rotary_pos_emb)

    cfg = DINOv3ViTConfig(hidden_size=128, num_attention_heads=2, patch_size=4, rope_theta=100.0)
    rope = DINOv3ViTRopePositionEmbedding(cfg).eval()
    pixels = torch.zeros(1, 3, grid[0] * 4, grid[1] * 4)
    cos, sin = rope(pixels)
    q, k = (randn(2, 2, P + grid[0] * grid[1], 64, device="cpu", seed=s) for s in (1, 2))
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = rope2d_reference(q, k, grid, num_prefix_tokens=P)
    torch.testing.assert_close(got_q, want_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_k, want_k, atol=1e-6, rtol=0)


def test_coord_transform_reproduces_transformers_train_mode():
    from transformers import DINOv3ViTConfig
    from transformers.models.dinov3_vit.modeling_dinov3_vit import (
        DINOv3ViTRopePositionEmbedding, apply_rotary_pos_emb)

    cfg = DINOv3ViTConfig(hidden_size=128, num_attention_heads=2, patch_size=4, pos_embed_shift=0.1,
                          pos_embed_jitter=1.2, pos_embed_rescale=2.0)
    rope = DINOv3ViTRopePositionEmbedding(cfg).train()
    q, k = torch.randn(1, 2, 5 + 12, 64), torch.randn(1, 2, 5 + 12, 64)
    torch.manual_seed(11)
    cos, sin = rope(torch.zeros(1, 3, 12, 16))
    torch.manual_seed(11)
    t = dinofast.sample_coord_transform(1, shift=0.1, jitter=1.2, rescale=2.0)
    want_q, _ = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, _ = rope2d_reference(q, k, (3, 4), num_prefix_tokens=5, coord_transform=t)
    torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=0)


def test_inv_freq_matches_periods():
    D = 64
    periods = 100.0 ** (torch.arange(D // 4, dtype=torch.float64) * 4 / D)
    torch.testing.assert_close(inv_freq(D, 100.0, dtype=torch.float64), 1 / periods)


# ---------------------------------------------------------------------------------------------
# module and torch.compile
# ---------------------------------------------------------------------------------------------
def test_module(kernel_backend):
    m = dinofast.nn.RoPE2D(64, num_prefix_tokens=5)
    q, k = batched_inputs(1, 2, (2, 3), 5, 64)
    out_q, _ = m(q, k, (2, 3))
    assert_close(out_q, rope2d_reference(q, k, (2, 3), num_prefix_tokens=5)[0])
    with pytest.raises(ValueError, match="head dim"):
        m(q[..., :32], k[..., :32], (2, 3))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_torch_compile_fullgraph(backend):
    skip_unless_available(backend)
    q0, k0 = batched_inputs(2, 2, (3, 4), 5, 64, layout="bnhd")

    def f(q, k):
        rq, rk = dinofast.rope2d(q * 2, k, (3, 4), num_prefix_tokens=5)
        return (rq * rk).sum()

    with dinofast.backend(backend):
        assert_compiles_like_eager(f, [q0.cpu(), k0.cpu()])


# ---------------------------------------------------------------------------------------------
# bad input: ValueError naming the argument, in Python; TORCH_CHECK in C++
# ---------------------------------------------------------------------------------------------
def _bad_cases():
    q, k = batched_inputs(1, 2, (2, 3), 5, 64)
    pq, pk, cu, g = packed_inputs([(2, 3), (1, 2)], 5, 2, 64)
    bad_cu = cu.clone()
    bad_cu[1] += 1
    return [
        ("q", lambda: dinofast.rope2d(q[0], k[0], (2, 3), num_prefix_tokens=5)),
        ("head dim", lambda: dinofast.rope2d(q[..., :62], k[..., :62], (2, 3), num_prefix_tokens=5)),
        ("head dim", lambda: dinofast.rope2d(torch.randn(1, 1, 11, 260), torch.randn(1, 1, 11, 260), (2, 3),
                                             num_prefix_tokens=5)),
        ("N = num_prefix_tokens", lambda: dinofast.rope2d(q, k, (2, 4), num_prefix_tokens=5)),
        ("k", lambda: dinofast.rope2d(q, k.half(), (2, 3), num_prefix_tokens=5)),
        ("k", lambda: dinofast.rope2d(q, k[:, :1], (2, 3), num_prefix_tokens=5)),
        ("k", lambda: dinofast.rope2d(q, k.to("meta"), (2, 3), num_prefix_tokens=5)),  # device mismatch
        ("cu_seqlens", lambda: dinofast.rope2d(pq, pk, g, num_prefix_tokens=5, cu_seqlens=cu.to("meta"))),
        ("theta", lambda: dinofast.rope2d(q, k, (2, 3), num_prefix_tokens=5, theta=float("nan"))),
        ("theta", lambda: dinofast.rope2d(q, k, (2, 3), num_prefix_tokens=5, theta=float("inf"))),
        ("grids", lambda: dinofast.rope2d(q, k, (2, 3, 1), num_prefix_tokens=5)),
        ("periods", lambda: dinofast.rope2d(q, k, (2, 3), num_prefix_tokens=5, periods=torch.ones(8))),
        ("periods", lambda: dinofast.rope2d(q, k, (2, 3), num_prefix_tokens=5,
                                            periods=torch.tensor([1.0] * 15 + [0.0]))),
        ("periods", lambda: dinofast.rope2d(q, k, (2, 3), num_prefix_tokens=5,
                                            periods=torch.tensor([float("nan")] + [1.0] * 15))),
        ("periods", lambda: dinofast.rope2d(q, k, (2, 3), num_prefix_tokens=5, periods=-torch.ones(16))),
        ("head_dim", lambda: dinofast.nn.RoPE2D("8")),
        ("head_dim", lambda: dinofast.nn.RoPE2D(6)),
        ("jitter", lambda: dinofast.nn.RoPE2D(64, jitter=-1)),
        ("jitter", lambda: dinofast.nn.RoPE2D(64, jitter=0.5)),
        ("rescale", lambda: dinofast.nn.RoPE2D(64, rescale=float("nan"))),
        ("shift", lambda: dinofast.nn.RoPE2D(64, shift=-0.1)),
        ("num_prefix_tokens", lambda: dinofast.nn.RoPE2D(64, num_prefix_tokens=-1)),
        ("jitter", lambda: dinofast.sample_coord_transform(1, jitter=-1)),
        ("num_prefix_tokens", lambda: dinofast.rope2d(q, k, (2, 3), num_prefix_tokens=-1)),
        ("cu_seqlens", lambda: dinofast.rope2d(pq, pk, g, num_prefix_tokens=5, cu_seqlens=cu.long())),
        # bad values in device metadata: read back only under the debug switch
        ("cu_seqlens", with_debug_checks(lambda: dinofast.rope2d(pq, pk, g, num_prefix_tokens=5,
                                                                 cu_seqlens=cu + 1))),
        ("cu_seqlens", with_debug_checks(lambda: dinofast.rope2d(pq, pk, g, num_prefix_tokens=5,
                                                                 cu_seqlens=cu.flip(0)))),
        ("cu_seqlens", lambda: dinofast.rope2d(pq, pk, g, num_prefix_tokens=5, cu_seqlens=cu[:-1])),
        ("cu_seqlens", with_debug_checks(lambda: dinofast.rope2d(pq, pk, g, num_prefix_tokens=5,
                                                                 cu_seqlens=bad_cu))),
        ("grids", lambda: dinofast.rope2d(pq, pk, g[:1], num_prefix_tokens=5, cu_seqlens=cu)),
        ("grids", lambda: dinofast.rope2d(pq, pk, g.long(), num_prefix_tokens=5, cu_seqlens=cu)),
        ("coord_transform", lambda: dinofast.rope2d(pq, pk, g, num_prefix_tokens=5, cu_seqlens=cu,
                                                    coord_transform=torch.ones(3, 4))),
    ]


test_bad_input_raises_value_error = value_error_test(_bad_cases)


@needs_C
def test_cpp_checks_its_inputs():
    q = torch.randn(1, 7, 2, 64)
    freqs = inv_freq(64)
    op = torch.ops.dinofast_C.rope2d
    with pytest.raises(RuntimeError, match="N: expected"):
        op(q, q, q.clone(), q.clone(), freqs, None, None, 2, 2, None, 5, False)
    with pytest.raises(RuntimeError, match="head dim"):
        op(q[..., :62].contiguous(), q[..., :62].contiguous(), q[..., :62].contiguous(), q[..., :62].contiguous(),
           freqs, None, None, 1, 2, None, 5, False)
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)  # last != T
    grids = torch.tensor([[1, 1], [1, 1]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        op(q, q, q.clone(), q.clone(), freqs, cu, grids, 0, 0, None, 2, False)
    with pytest.raises(RuntimeError, match="grids"):
        op(q, q, q.clone(), q.clone(), freqs, torch.tensor([0, 3, 7], dtype=torch.int32),
           torch.tensor([[1, 0], [1, 1]], dtype=torch.int32), 0, 0, None, 2, False)
    with pytest.raises(RuntimeError, match="Hp\\*Wp: 4 \\* 4611686018427387906 overflows int64"):
        op(q, q, q.clone(), q.clone(), freqs, None, None, 4, 2**62 + 2, None, 5, False)
    with pytest.raises(RuntimeError, match="segment 0 expected num_prefix_tokens"):  # 3 != 2 + 1*2
        op(q, q, q.clone(), q.clone(), freqs, torch.tensor([0, 3, 7], dtype=torch.int32),
           torch.tensor([[1, 2], [1, 2]], dtype=torch.int32), 0, 0, None, 2, False)



def test_cached_frequencies_from_inference_mode_serve_autograd():
    """The default-theta frequencies are cached; a first call under inference_mode must not leave
    an inference tensor that a later differentiable call cannot save for backward."""
    head_dim, theta = 24, 123.0  # a (D, theta) pair no other test caches
    q, k = (randn(1, 2, 5 + 6, head_dim, seed=s) for s in (1, 2))
    with torch.inference_mode():
        dinofast.rope2d(q.clone(), k.clone(), (2, 3), num_prefix_tokens=5, theta=theta)
    qg = q.clone().requires_grad_(True)
    qr, _ = dinofast.rope2d(qg, k, (2, 3), num_prefix_tokens=5, theta=theta)
    qr.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
