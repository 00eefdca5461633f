"""varlen_attention: every backend against the reference and against dense masked SDPA; fused RoPE
against rope2d + attention; gradients; torch.compile; bad input; launch grids within CUDA limits."""

import contextlib
import warnings

import pytest
import torch
from hypothesis import given, strategies as st

import dinofast
from dinofast import _backend
from dinofast.reference.rope2d import rope2d_reference
from dinofast.reference.varlen_attention import dense_masked_attention, varlen_attention_reference
from tests.conftest import (
    DEVICE, GRAD_FP32_ACCUM_ATOL, TOL, assert_close, assert_compiles_like_eager, assert_flash_rule, assert_nan_like,
    make_cu_seqlens, needs_C, randn, skip_unless_available, value_error_test, with_debug_checks)

# Backends that accumulate in fp32 and round once (no tensor-core rounding of P or of the tiles).
FP32_ACCUMULATING = ("reference", "cpp")

# Segment lengths: 1-token segments, lengths off every block size (16 interpreted, 64/128 on GPU,
# 128/256/512 in C++), an empty segment, a single segment, 100 tiny segments.
LENGTHS = {
    "mixed": [1, 17, 5, 40, 3],
    "empty-segment": [3, 0, 9],
    "single": [37],
    "long": [130, 1, 300],
    "100-tiny": [1 + (7 * i) % 4 for i in range(100)],
}


def packed_qkv(lengths, H, D, dtype=torch.float32, seed=0, requires_grad=False):
    T = sum(lengths)
    q, k, v = (randn(T, H, D, dtype=dtype, seed=seed + i) for i in range(3))
    if requires_grad:
        for x in (q, k, v):
            x.requires_grad_(True)
    return q, k, v, make_cu_seqlens(lengths)


def rope_case(grids, P, H, D, dtype=torch.float32, seed=0, requires_grad=False, **spec_kw):
    lengths = [P + h * w for h, w in grids]
    q, k, v, cu = packed_qkv(lengths, H, D, dtype, seed, requires_grad)
    g = torch.tensor(grids, dtype=torch.int32, device=DEVICE)
    return q, k, v, cu, dinofast.RopeSpec(g, P, **spec_kw), max(lengths)


def cpu_flags() -> set:
    """The CPU feature flags /proc/cpuinfo lists (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def cpp_low_precision_gemms(dtype) -> bool:
    """Whether the cpp backend computes fp16/bf16 attention on gemms of that dtype here (oneDNN's
    packed brgemm: AMX for bf16, AMX-FP16 for fp16, oneDNN enabled) instead of converting to fp32."""
    flag = {torch.bfloat16: "amx_bf16", torch.float16: "amx_fp16"}.get(dtype)
    return (flag is not None and flag in cpu_flags() and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled)


def assert_low_precision_close(got, oracle, baseline, dtype, gradients=False):
    """got (fp16/bf16) against the fp64 oracle. fp32-accumulating backends: one rounding of the dtype
    (TOL[dtype]; gradients: GRAD_FP32_ACCUM_ATOL absolute, since every backend reads the saved
    output O in the input dtype for delta = rowsum(dO * O)). Tensor-core backends, and cpp where it
    computes on fp16/bf16 gemms: flash-attention's rule, at most twice the error of `baseline`
    (PyTorch's same-dtype computation)."""
    name = _backend.forced_backend()
    if name in FP32_ACCUMULATING and not (name == "cpp" and cpp_low_precision_gemms(dtype)):
        tol = dict(TOL[dtype], atol=GRAD_FP32_ACCUM_ATOL) if gradients else TOL[dtype]
        err, bound = (got.double() - oracle.double()).abs(), tol["atol"] + tol["rtol"] * oracle.double().abs()
        assert (err <= bound).all(), f"max abs err {err.max().item():.3g}"
    else:
        assert_flash_rule(got, oracle, baseline)


def assert_lse_close(lse, ref_lse):
    """An fp32 log-sum-exp carries the rounding of the scores it sums, so its error grows with the
    score magnitude: TOL[float32] scaled by the largest |lse| (at least 1)."""
    assert_close(lse, ref_lse, torch.float32, scale=max(1.0, ref_lse.abs().max().item()))


def rope2d_then_attention(q, k, v, cu, spec, compute_dtype=None):
    """The definition of the fused op: rope2d in q's dtype (rounded there), then attention in
    compute_dtype (default q's)."""
    rq, rk = rope2d_reference(q, k, spec.grids, num_prefix_tokens=spec.num_prefix_tokens, cu_seqlens=cu,
                              periods=spec.periods, coord_transform=spec.coord_transform)
    ct = compute_dtype or q.dtype
    return varlen_attention_reference(rq.to(ct), rk.to(ct), v.to(ct), cu)[0]


# ---------------------------------------------------------------------------------------------
# forward parity
# ---------------------------------------------------------------------------------------------
# D 80 (masked half-rows) on the short cases only: the Triton interpreter is slow on long segments
FORWARD_CASES = [(case, 64) for case in LENGTHS] + [(case, 80) for case in ("mixed", "empty-segment", "single")]


@pytest.mark.parametrize("case, D", FORWARD_CASES, ids=[f"{c}-D{d}" for c, d in FORWARD_CASES])
def test_forward_matches_reference(kernel_backend, case, D):
    lengths = LENGTHS[case]
    q, k, v, cu = packed_qkv(lengths, 2, D)
    out, lse = dinofast.varlen_attention_with_lse(q, k, v, cu, max(lengths))
    ref, ref_lse = varlen_attention_reference(q, k, v, cu)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, q.shape[0]) and lse.dtype == torch.float32
    assert_close(out, ref)
    assert_lse_close(lse, ref_lse)


@pytest.mark.parametrize("D", [64, 128])
def test_matches_dense_masked_sdpa(backend_name, D):
    lengths = [9, 1, 23, 16]
    q, k, v, cu = packed_qkv(lengths, 3, D, seed=4)
    out = dinofast.varlen_attention(q, k, v, cu, 23, softmax_scale=0.3)
    dense = dense_masked_attention(q.double(), k.double(), v.double(), cu, softmax_scale=0.3)
    assert_close(out, dense)


def test_max_seqlen_larger_than_needed(kernel_backend):
    q, k, v, cu = packed_qkv(LENGTHS["mixed"], 2, 64, seed=2)
    out = dinofast.varlen_attention(q, k, v, cu, 500)
    assert_close(out, varlen_attention_reference(q, k, v, cu)[0])


def test_strided_views_of_packed_qkv(kernel_backend):
    """q, k, v sliced from one [T, 3, H, D] projection, as a fused qkv Linear produces them."""
    lengths = [7, 20]
    qkv = randn(sum(lengths), 3, 2, 64, seed=9)
    q, k, v = qkv.unbind(1)
    cu = make_cu_seqlens(lengths)
    out = dinofast.varlen_attention(q, k, v, cu, 20)
    assert_close(out, varlen_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), cu)[0])


def torch_attention_same_dtype(q, k, v, cu, softmax_scale=None):
    """The flash rule's baseline, as flash-attention's tests compute it (attention_ref, upcast=False):
    scores in the input dtype, softmax in fp32 rounded back to the input dtype, then P @ V."""
    T, H, D = q.shape
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=q.device), (cu[1:] - cu[:-1]).long(),
                                  output_size=T)
    qt, kt, vt = (x.transpose(0, 1) for x in (q, k, v))  # [H, T, D]
    scores = (qt @ kt.transpose(1, 2)) * scale
    scores = scores.masked_fill(seg[:, None] != seg[None, :], float("-inf"))
    p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return (p @ vt).transpose(0, 1)


def qkv_views(q, k, v):
    """The same values as strided views of one [T, 3, H, D] buffer (as a fused qkv Linear makes them)."""
    qkv = torch.stack([q, k, v], 1)
    return qkv[:, 0], qkv[:, 1], qkv[:, 2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "qkv-views"])
def test_low_precision_against_fp64(kernel_backend, dtype, rope, layout):
    if rope:
        q, k, v, cu, spec, max_len = rope_case([(3, 5), (1, 1), (6, 4)], 5, 2, 64, dtype=dtype)
    else:
        q, k, v, cu = packed_qkv([20, 1, 33], 2, 64, dtype=dtype)
        spec, max_len = None, 33
    if layout == "qkv-views":
        q, k, v = qkv_views(q, k, v)
        assert not q.is_contiguous()
    out = dinofast.varlen_attention(q, k, v, cu, max_len, rope=spec)
    if rope:
        ref = rope2d_then_attention(q, k, v, cu, spec, torch.float64)
        rq, rk = rope2d_reference(q, k, spec.grids, num_prefix_tokens=5, cu_seqlens=cu)
        baseline = torch_attention_same_dtype(rq, rk, v, cu)
    else:
        ref, _ = varlen_attention_reference(q.double(), k.double(), v.double(), cu)
        baseline = torch_attention_same_dtype(q, k, v, cu)
    assert out.dtype == dtype
    assert_low_precision_close(out, ref, baseline, dtype)


# ---------------------------------------------------------------------------------------------
# NaN / Inf in, NaN out (as the reference: SDPA in fp32)
# ---------------------------------------------------------------------------------------------
# nan-query-late: a NaN query in a later segment, among the rows that pad the earlier ones' last tiles
NAN_CASES = ["nan-query", "nan-query-late", "nan-key", "inf-key", "nan-value", "scale-1e38"]


def poison(q, k, v, case):
    """Puts the NaN/Inf of `case` into q, k or v (one token of the segments [5, 1, 7+, 3]); returns
    the softmax_scale of the case (1e38 for scale-1e38, else None)."""
    if case == "nan-query":
        q[2, 0, 3] = float("nan")
    elif case == "nan-query-late":
        q[9, 0, 3] = float("nan")
    elif case == "nan-key":
        k[8, 1, 0] = float("nan")
    elif case == "inf-key":
        k[8, 1, 0] = float("inf")
    elif case == "nan-value":
        v[13, 0, 5] = float("nan")
    return 1e38 if case == "scale-1e38" else None


@pytest.mark.parametrize("case", NAN_CASES)
def test_nan_and_inf_propagate_as_in_the_reference(kernel_backend, case):
    lengths = [5, 1, 7, 3]
    q, k, v, cu = packed_qkv(lengths, 2, 16, seed=30)
    scale = poison(q, k, v, case)
    out, lse = dinofast.varlen_attention_with_lse(q, k, v, cu, 7, softmax_scale=scale)
    ref, ref_lse = varlen_attention_reference(q, k, v, cu, softmax_scale=scale if scale else 16**-0.5)
    assert ref.isnan().any()
    assert_nan_like(out, ref)
    if scale is None:  # elsewhere the values are those of the reference
        finite = ~ref.isnan()
        assert_close(out[finite], ref[finite])
    if case != "nan-value":  # lse does not see V; a row with a +Inf score has lse +Inf or NaN
        assert torch.equal(lse.isfinite(), ref_lse.isfinite())


def test_ten_images_with_rope(kernel_backend):
    grids = [(1 + i % 3, 1 + (2 * i) % 5) for i in range(10)]
    q, k, v, cu, spec, max_len = rope_case(grids, 5, 2, 16, seed=31)
    out = dinofast.varlen_attention(q, k, v, cu, max_len, rope=spec)
    assert_close(out, rope2d_then_attention(q, k, v, cu, spec))


def test_non_contiguous_metadata(kernel_backend):
    q, k, v, cu, spec, max_len = rope_case([(2, 3), (1, 2), (3, 1)], 1, 2, 16, seed=32)
    cu_view = torch.stack([cu, cu], 1)[:, 0]
    g_view = torch.stack([spec.grids[:, 0], spec.grids[:, 0], spec.grids[:, 1]], 1)[:, ::2]
    assert not cu_view.is_contiguous() and not g_view.is_contiguous()
    out = dinofast.varlen_attention(q, k, v, cu_view, max_len, rope=dinofast.RopeSpec(g_view, 1))
    assert_close(out, rope2d_then_attention(q, k, v, cu, spec))


# ---------------------------------------------------------------------------------------------
# fused RoPE
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("P", [0, 5])
def test_fused_rope_equals_rope2d_then_attention(kernel_backend, D, P):
    q, k, v, cu, spec, max_len = rope_case([(3, 5), (1, 1), (4, 7), (2, 1)], P, 2, D)
    out = dinofast.varlen_attention(q, k, v, cu, max_len, rope=spec)
    want = rope2d_then_attention(q, k, v, cu, spec)
    assert_close(out, want)
    plain = dinofast.varlen_attention(q, k, v, cu, max_len)
    assert (plain - want).abs().max() > 1e-3, "the rotation must change the result"


def test_fused_rope_periods_and_coord_transform(kernel_backend):
    D = 64
    periods = (100.0 ** (torch.arange(D // 4, dtype=torch.float32) * 4 / D)).bfloat16().float().to(DEVICE)
    gen = torch.Generator().manual_seed(3)
    t = dinofast.sample_coord_transform(3, shift=0.2, jitter=1.3, rescale=2.0, generator=gen).to(DEVICE)
    q, k, v, cu, spec, max_len = rope_case([(3, 5), (4, 2), (1, 1)], 5, 2, D, periods=periods, coord_transform=t)
    out = dinofast.varlen_attention(q, k, v, cu, max_len, rope=spec)
    assert_close(out, rope2d_then_attention(q, k, v, cu, spec))
    assert (out - rope2d_then_attention(q, k, v, cu, dinofast.RopeSpec(spec.grids, 5))).abs().max() > 1e-4


def test_fused_rope_periods_changed_in_place(kernel_backend):
    """The check and the inverse of rope.periods are kept between calls (a checkpoint's periods go to
    every layer): a change in place reaches the next call, a NaN as a ValueError, new values in the
    result. The periods live on the host, where the check reads them."""
    D = 64
    periods = 100.0 ** (torch.arange(D // 4, dtype=torch.float32) * 4 / D)
    q, k, v, cu, spec, max_len = rope_case([(3, 5), (2, 2)], 1, 2, D, periods=periods)
    first = dinofast.varlen_attention(q, k, v, cu, max_len, rope=spec)
    assert_close(first, rope2d_then_attention(q, k, v, cu, spec))
    periods[0] = float("nan")
    with pytest.raises(ValueError, match="rope.periods"):
        dinofast.varlen_attention(q, k, v, cu, max_len, rope=spec)
    periods.copy_(periods.new_tensor([1.5 ** i for i in range(D // 4)]))
    out = dinofast.varlen_attention(q, k, v, cu, max_len, rope=spec)
    assert_close(out, rope2d_then_attention(q, k, v, cu, spec))
    assert (out - first).abs().max() > 1e-3, "the new periods must rotate differently"


def test_rope_grids_as_list(backend_name):
    q, k, v, cu, spec, max_len = rope_case([(2, 3), (1, 4)], 1, 2, 64)
    out = dinofast.varlen_attention(q, k, v, cu, max_len, rope=dinofast.RopeSpec([(2, 3), (1, 4)], 1))
    # oracle: the per-image rotations, then dense masked SDPA in fp64 (no varlen code involved)
    rq, rk = [], []
    for i, grid in enumerate([(2, 3), (1, 4)]):
        s, e = int(cu[i]), int(cu[i + 1])
        a, b = rope2d_reference(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None], grid, num_prefix_tokens=1)
        rq.append(a[0].transpose(0, 1))
        rk.append(b[0].transpose(0, 1))
    assert_close(out, dense_masked_attention(torch.cat(rq).double(), torch.cat(rk).double(), v.double(), cu))


@given(
    lengths=st.lists(st.integers(0, 33), min_size=1, max_size=4).filter(lambda ls: sum(ls) > 0),
    H=st.integers(1, 3), D=st.sampled_from([8, 16, 24, 64, 80, 128]), extra=st.integers(0, 20),
    scale=st.sampled_from([None, 0.05, 1.0]),
)
def test_hypothesis_shapes(kernel_backend, lengths, H, D, extra, scale):
    q, k, v, cu = packed_qkv(lengths, H, D, seed=sum(lengths) + D)
    out, lse = dinofast.varlen_attention_with_lse(q, k, v, cu, max(lengths) + extra, softmax_scale=scale)
    ref, ref_lse = varlen_attention_reference(q, k, v, cu, softmax_scale=scale)
    assert_close(out, ref)
    assert_lse_close(lse, ref_lse)


@given(grids=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3),
       P=st.integers(0, 5), D=st.sampled_from([16, 64, 80]))
def test_hypothesis_rope(kernel_backend, grids, P, D):
    q, k, v, cu, spec, max_len = rope_case(grids, P, 2, D, seed=P + D)
    out = dinofast.varlen_attention(q, k, v, cu, max_len, rope=spec)
    assert_close(out, rope2d_then_attention(q, k, v, cu, spec))


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
def _grads(fn, inputs, grad_out):
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*xs)
    return torch.autograd.grad(out, xs, grad_out)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("D", [64, 80])
def test_gradients_equal_autograd_of_reference(backend_name, rope, D):
    if rope:
        gen = torch.Generator().manual_seed(5)
        t = dinofast.sample_coord_transform(4, shift=0.1, jitter=1.2, rescale=2.0, generator=gen).to(DEVICE)
        q, k, v, cu, spec, max_len = rope_case([(3, 5), (1, 1), (4, 5), (2, 2)], 5, 2, D, coord_transform=t)
    else:
        q, k, v, cu = packed_qkv([1, 17, 40, 3], 2, D)
        spec, max_len = None, 40
    grad_out = randn(*q.shape, seed=11)
    got = _grads(lambda a, b, c: dinofast.varlen_attention(a, b, c, cu, max_len, rope=spec), (q, k, v), grad_out)
    want = _grads(lambda a, b, c: varlen_attention_reference(a, b, c, cu, rope=spec)[0], (q, k, v), grad_out)
    for g, w in zip(got, want):
        assert_close(g, w, scale=2.0)  # scale: gradients sum L terms; still 2e-5 absolute


def test_gradients_against_dense_masked_sdpa_fp64(backend_name):
    """An oracle independent of the reference: autograd through one dense masked SDPA in fp64."""
    q, k, v, cu = packed_qkv([5, 1, 21], 2, 64, seed=3)
    grad_out = randn(*q.shape, seed=12)
    got = _grads(lambda a, b, c: dinofast.varlen_attention(a, b, c, cu, 21), (q, k, v), grad_out)
    want = _grads(lambda a, b, c: dense_masked_attention(a, b, c, cu), (q.double(), k.double(), v.double()),
                  grad_out.double())
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32, scale=2.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients(backend_name, dtype):
    q, k, v, cu, spec, max_len = rope_case([(3, 4), (1, 1), (5, 3)], 5, 2, 64, dtype=dtype)
    grad_out = randn(*q.shape, dtype=dtype, seed=13)
    got = _grads(lambda a, b, c: dinofast.varlen_attention(a, b, c, cu, max_len, rope=spec), (q, k, v), grad_out)
    want = _grads(lambda a, b, c: varlen_attention_reference(a, b, c, cu, rope=spec)[0],
                  (q.double(), k.double(), v.double()), grad_out.double())

    def same_dtype_torch(a, b, c):  # PyTorch's own computation in the input dtype: the flash rule's baseline
        ra, rb = rope2d_reference(a, b, spec.grids, num_prefix_tokens=5, cu_seqlens=cu)
        return torch_attention_same_dtype(ra, rb, c, cu)

    baseline = _grads(same_dtype_torch, (q, k, v), grad_out)
    for g, w, b in zip(got, want, baseline):
        assert g.dtype == dtype
        assert_low_precision_close(g, w, b, dtype, gradients=True)


def test_gradcheck_reference_fp64():
    """The oracle itself: its autograd against finite differences."""
    q, k, v, cu = packed_qkv([3, 1, 4], 2, 8, dtype=torch.float64, requires_grad=True)
    spec = dinofast.RopeSpec(torch.tensor([[1, 2], [1, 0 + 1], [1, 3]], dtype=torch.int32, device=DEVICE), 1)
    assert torch.autograd.gradcheck(lambda a, b, c: varlen_attention_reference(a, b, c, cu, rope=spec)[0],
                                    (q, k, v))


# ---------------------------------------------------------------------------------------------
# flash-attn drop-in
# ---------------------------------------------------------------------------------------------
def test_flash_attn_varlen_func(kernel_backend):
    q, k, v, cu = packed_qkv([4, 19, 1], 2, 64)
    out = dinofast.flash_attn_varlen_func(q, k, v, cu, cu.clone(), 19, 19, softmax_scale=0.2)
    assert_close(out, varlen_attention_reference(q, k, v, cu, softmax_scale=0.2)[0])


@pytest.mark.parametrize("max_q, max_k", [(19, 40), (64, 19), (19, 19)])
@pytest.mark.parametrize("same_tensor", [True, False])
def test_flash_attn_varlen_func_max_seqlens_are_upper_bounds(max_q, max_k, same_tensor):
    """flash-attn takes the same cu_seqlens for q and k with different max_seqlen_q/_k (both bounds)."""
    q, k, v, cu = packed_qkv([4, 19, 1], 2, 64, seed=21)
    out = dinofast.flash_attn_varlen_func(q, k, v, cu, cu if same_tensor else cu.clone(), max_q, max_k)
    assert_close(out, dense_masked_attention(q.double(), k.double(), v.double(), cu))


@pytest.mark.parametrize("kwargs, what", [
    (dict(dropout_p=0.1), "dropout"),
    (dict(causal=True), "causal"),
    (dict(window_size=(8, 8)), "window_size"),
    (dict(return_attn_probs=True), "return_attn_probs"),
])
def test_flash_attn_varlen_func_refuses(kwargs, what):
    q, k, v, cu = packed_qkv([4, 5], 2, 64)
    with pytest.raises(NotImplementedError, match=what):
        dinofast.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, **kwargs)


def test_flash_attn_varlen_func_refuses_cross_attention():
    q, k, v, cu = packed_qkv([4, 5], 2, 64)
    cu_k = make_cu_seqlens([5, 4])
    with pytest.raises(NotImplementedError, match="different q and k lengths"):
        with dinofast.debug_checks():  # same shapes, different values: seen only by reading them
            dinofast.flash_attn_varlen_func(q, k, v, cu, cu_k, 5, 5)
    with pytest.raises(NotImplementedError, match="different q and k lengths"):
        dinofast.flash_attn_varlen_func(q, k[:8], v[:8], cu, make_cu_seqlens([4, 4]), 5, 4)
    with pytest.raises(NotImplementedError, match="MQA/GQA"):
        dinofast.flash_attn_varlen_func(q, k[:, :1], v[:, :1], cu, cu, 5, 5)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="flash-attn runs on CUDA only")
def test_matches_flash_attn_where_installed():
    flash_attn = pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    q, k, v, cu = packed_qkv([100, 1, 257], 4, 64, dtype=torch.float16)
    want = flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, 257, 257)
    got = dinofast.varlen_attention(q, k, v, cu, 257)
    ref, _ = varlen_attention_reference(q.double(), k.double(), v.double(), cu)
    assert_close(want, ref, "attention:float16")
    assert_close(got, ref, "attention:float16")


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("rope", [False, True])
def test_torch_compile_fullgraph(backend, rope):
    skip_unless_available(backend)
    grids = torch.tensor([[3, 4], [1, 2]], dtype=torch.int32)
    spec = dinofast.RopeSpec(grids, 5) if rope else None
    cu = make_cu_seqlens([17, 7], device="cpu")
    q0, k0, v0 = (randn(24, 2, 64, device="cpu", seed=s) for s in (1, 2, 3))

    def f(q, k, v):
        return (dinofast.varlen_attention(q * 2, k, v, cu, 17, rope=spec) ** 2).sum()

    with dinofast.backend(backend):
        assert_compiles_like_eager(f, [q0, k0, v0])


# ---------------------------------------------------------------------------------------------
# bad input: ValueError naming the argument, in Python; TORCH_CHECK in C++
# ---------------------------------------------------------------------------------------------
def _bad_cases():
    q, k, v, cu = packed_qkv([4, 6], 2, 64)
    g = torch.tensor([[1, 1], [1, 3]], dtype=torch.int32, device=DEVICE)
    bad_sum = cu.clone()
    bad_sum[-1] += 1
    decreasing = make_cu_seqlens([4, 6])
    decreasing[1] = 8
    decreasing[2] = 10
    decreasing = torch.tensor([0, 8, 7, 10], dtype=torch.int32, device=DEVICE)
    va = dinofast.varlen_attention
    return [
        ("q", lambda: va(q[0], k[0], v[0], cu, 6)),
        ("q", lambda: va(q.double(), k.double(), v.double(), cu, 6)),
        ("k", lambda: va(q, k.half(), v, cu, 6)),
        ("v", lambda: va(q, k, v[:5], cu, 6)),
        ("k", lambda: va(q, k[:, :1], v, cu, 6)),
        ("head dim", lambda: va(q[..., :60], k[..., :60], v[..., :60], cu, 6)),
        ("head dim", lambda: va(*(torch.randn(10, 1, 264, device=DEVICE) for _ in range(3)), cu, 6)),
        ("cu_seqlens", lambda: va(q, k, v, cu.long(), 6)),
        ("cu_seqlens", lambda: va(q, k, v, cu[:1], 6)),
        ("cu_seqlens", with_debug_checks(lambda: va(q, k, v, cu + 1, 6))),
        ("cu_seqlens", with_debug_checks(lambda: va(q, k, v, bad_sum, 6))),
        ("cu_seqlens", with_debug_checks(lambda: va(q, k, v, decreasing, 6))),
        ("max_seqlen", with_debug_checks(lambda: va(q, k, v, cu, 5))),
        ("max_seqlen", lambda: va(q, k, v, cu, -1)),
        ("softmax_scale", lambda: va(q, k, v, cu, 6, softmax_scale=float("nan"))),
        ("softmax_scale", lambda: va(q, k, v, cu, 6, softmax_scale=0.0)),
        ("softmax_scale", lambda: va(q, k, v, cu, 6, softmax_scale=1e300)),  # inf in float32
        ("rope.periods", lambda: va(q, k, v, cu, 6, rope=dinofast.RopeSpec(g, 1, periods=torch.zeros(16)))),
        ("rope.periods", lambda: va(q, k, v, cu, 6, rope=dinofast.RopeSpec(
            g, 1, periods=torch.full((16,), float("nan"))))),
        ("q", lambda: dinofast.flash_attn_varlen_func(None, k, v, cu, cu, 6, 6)),
        ("cu_seqlens_k", lambda: dinofast.flash_attn_varlen_func(q, k, v, cu, None, 6, 6)),
        ("max_seqlen_k", lambda: dinofast.flash_attn_varlen_func(q, k, v, cu, cu, 6, None)),
        ("rope", lambda: va(q, k, v, cu, 6, rope=(g, 1))),
        ("grids", lambda: va(q, k, v, cu, 6, rope=dinofast.RopeSpec(g[:1], 1))),
        ("cu_seqlens", with_debug_checks(lambda: va(q, k, v, cu, 6, rope=dinofast.RopeSpec(g, 2)))),
        ("rope.periods", lambda: va(q, k, v, cu, 6, rope=dinofast.RopeSpec(g, 1, periods=torch.ones(8)))),
        ("rope.coord_transform",
         lambda: va(q, k, v, cu, 6, rope=dinofast.RopeSpec(g, 1, coord_transform=torch.ones(3, 4)))),
    ]


test_bad_input_raises_value_error = value_error_test(_bad_cases)


def test_max_seqlen_error_names_the_numbers():
    q, k, v, cu = packed_qkv([4, 6], 2, 64)
    with pytest.raises(ValueError, match=r"max_seqlen: expected >= the longest segment \(6 tokens\), got 5"):
        with dinofast.debug_checks():
            dinofast.varlen_attention(q, k, v, cu, 5)
    with pytest.raises(ValueError, match=r"max_seqlen: expected >= the longest segment \(6 tokens, from layout\), "
                       "got 5"):
        dinofast.varlen_attention(q, k, v, cu, 5, layout=dinofast.PackedLayout.from_lengths([4, 6]))


@needs_C
def test_cpp_checks_its_inputs():
    op = torch.ops.dinofast_C.varlen_attention_fwd
    q = torch.randn(10, 2, 64)
    lse = torch.empty(2, 10)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="head dim"):
        x = torch.randn(10, 2, 60)
        op(x, x, x, x.clone(), lse, cu, 6, 0.1, None, None, None, 0)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        op(q, q, q, q.clone(), lse, torch.tensor([0, 4, 11], dtype=torch.int32), 7, 0.1, None, None, None, 0)
    with pytest.raises(RuntimeError, match="max_seqlen"):
        op(q, q, q, q.clone(), lse, cu, 5, 0.1, None, None, None, 0)
    with pytest.raises(RuntimeError, match="lse"):
        op(q, q, q, q.clone(), torch.empty(10, 2), cu, 6, 0.1, None, None, None, 0)
    with pytest.raises(RuntimeError, match="grids"):
        op(q, q, q, q.clone(), lse, cu, 6, 0.1, torch.ones(16), torch.tensor([[1, 0], [1, 5]], dtype=torch.int32),
           None, 1)
    with pytest.raises(RuntimeError, match="k"):
        op(q, q[:9], q, q.clone(), lse, cu, 6, 0.1, None, None, None, 0)
    with pytest.raises(RuntimeError, match="softmax_scale: expected a finite positive number representable"):
        op(q, q, q, q.clone(), lse, cu, 6, 1e300, None, None, None, 0)
    with pytest.raises(RuntimeError, match="overflows int64"):  # num_prefix_tokens + Hp*Wp
        op(q, q, q, q.clone(), lse, cu, 6, 0.1, torch.ones(16), torch.tensor([[1, 1], [2**30, 2**30]],
                                                                             dtype=torch.int32), None, 2**62 * 2 - 1)


# ---------------------------------------------------------------------------------------------
# launch grids: any pack stays within CUDA's grid limits; shapes crossing the GPU tile sizes
# ---------------------------------------------------------------------------------------------
def test_work_grid_within_cuda_limits():
    """The numbering of (tile, head, segment) items for huge packs: 70,000 segments, max_seqlen far
    past T, many heads. The grid has one axis of at most 2^31 - 1 programs, and the item -> (tile,
    head, segment) map (kernels/rope2d.py: work_item) is a bijection onto every item."""
    from dinofast.kernels import rope2d as R
    from dinofast.kernels import varlen_attention as K

    for n_segments, max_seqlen, T, H in [(70_000, 2**31 - 1, 70_000, 16), (70_000, 1, 70_000, 16),
                                         (3, 2**30, 2**30, 64), (1_000_000, 300, 2**31 - 1, 1024)]:
        for block in (16, 64, 128):
            tiles = K._tiles(max_seqlen, T, block)
            n_work = tiles * H * n_segments
            grid = R.work_grid(n_work)
            assert len(grid) == 1 and 1 <= grid[0] <= 2**31 - 1
            assert tiles * block >= min(max_seqlen, T)  # every row of the longest possible segment
            w = torch.tensor([0, n_work // 3, n_work - 1], dtype=torch.int64)
            rest = w // tiles  # work_item, evaluated in int64 as the kernels do for huge counts
            tile, h, seg = w - rest * tiles, rest % H, rest // H
            assert ((tile >= 0) & (tile < tiles) & (h >= 0) & (h < H) & (seg >= 0) & (seg < n_segments)).all()
            assert torch.equal((seg * H + h) * tiles + tile, w)


@pytest.mark.parametrize("grid_x_limit", [None, 7])
def test_tiles_cross_gpu_block_sizes(backend_name, monkeypatch, grid_x_limit):
    """Shapes past the GPU tiles (128-row query blocks, 64-row key blocks): a segment of several
    query blocks, 9 packed images, more heads than one rope2d program handles (4); with the grid
    capped at 7 programs, each program loops over many work items."""
    if backend_name != "triton" and grid_x_limit is not None:
        pytest.skip(reason="grid_x_limit: the grid cap is a triton launch detail")
    if grid_x_limit is not None:
        from dinofast.kernels import rope2d as R

        monkeypatch.setattr(R, "MAX_GRID_X", grid_x_limit)
    grids = [(1, 1), (2, 3), (1, 4), (3, 1), (2, 2), (1, 2), (5, 3), (1, 1), (14, 10)]  # last: 141 tokens
    q, k, v, cu, spec, max_len = rope_case(grids, 1, 5, 64, seed=21)
    grad_out = randn(*q.shape, seed=22)
    got = _grads(lambda a, b, c: dinofast.varlen_attention(a, b, c, cu, max_len + 3, rope=spec), (q, k, v),
                 grad_out)
    want = _grads(lambda a, b, c: varlen_attention_reference(a, b, c, cu, rope=spec)[0], (q, k, v), grad_out)
    out = dinofast.varlen_attention(q, k, v, cu, max_len + 3, rope=spec)
    assert_close(out, rope2d_then_attention(q, k, v, cu, spec))
    for g, w in zip(got, want):
        assert_close(g, w, scale=2.0)


# ---------------------------------------------------------------------------------------------
# the CPU kernel's fp16/bf16 paths: low-precision gemms (oneDNN brgemm, AMX) and the fp32 one
# ---------------------------------------------------------------------------------------------
# Images whose token counts (P=5 prefix tokens) cross the C++ tiles: 256-query forward tiles,
# 512-key forward tiles, 256-row backward tiles, 64-column packed gemm blocks; odd counts (the gemms
# take pairs of keys/queries), a 6-token image.
CPU_TILE_GRIDS = [(20, 30), (1, 1), (8, 9), (16, 32), (10, 25)]  # 605, 6, 77, 517, 255 tokens
CPU_TILE_GRIDS_BWD = [(14, 21), (1, 1), (8, 9), (12, 21)]  # 299, 6, 77, 257 tokens


@pytest.fixture(params=["low-precision-gemms", "brgemm-only", "fp32-gemms"])
def cpu_gemm_path(request, monkeypatch):
    """The cpp backend on CPU tensors. "low-precision-gemms": as it runs by default (with AMX, the
    bf16 forward, and the backward's S^T and dP^T at D 64, on AMX tiles of its own where D is a multiple
    of 32, brgemm elsewhere); "brgemm-only": DINOFAST_CPU_ISA=avx512, which leaves every gemm to
    oneDNN's brgemm;
    "fp32-gemms": oneDNN disabled, which makes fp16/bf16 take the fp32 conversion path (the only
    one on CPUs without AMX)."""
    reason = _backend.why_unavailable("cpp", "cpu")
    if reason:
        pytest.skip(reason=f"cpp on cpu: {reason}")
    if request.param == "brgemm-only":
        monkeypatch.setenv("DINOFAST_CPU_ISA", "avx512")
    with dinofast.backend("cpp"), onednn(enabled=request.param != "fp32-gemms"):
        yield request.param


@contextlib.contextmanager
def onednn(enabled: bool):
    """torch.backends.mkldnn.flags(enabled=enabled), without torch's warning (on every use of flags())
    that oneDNN TF32 needs an Intel GPU."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=enabled):
            yield


def cpu_rope_case(grids, D, dtype, seed, rope):
    """q, k, v [T, 3, D] on the CPU for images `grids` with 5 prefix tokens; without RoPE (spec
    None) an empty segment follows the first image."""
    lengths = [5 + h * w for h, w in grids]
    if not rope:
        lengths.insert(1, 0)
    q, k, v = (randn(sum(lengths), 3, D, dtype=dtype, device="cpu", seed=seed + i) for i in range(3))
    cu = make_cu_seqlens(lengths, device="cpu")
    spec = dinofast.RopeSpec(torch.tensor(grids, dtype=torch.int32), 5) if rope else None
    return q, k, v, cu, spec, max(lengths)


def rotated(q, k, cu, spec):
    if spec is None:
        return q, k
    return rope2d_reference(q, k, spec.grids, num_prefix_tokens=spec.num_prefix_tokens, cu_seqlens=cu)


# D a multiple of 32 (one to four 64-column O chunks): the AMX-tile forward; 72, 40: brgemm only
CPU_LP_CASES = [(64, False), (64, True), (128, False), (72, True), (40, False), (256, False), (96, False), (32, True)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D, rope", CPU_LP_CASES, ids=[f"D{d}-{'rope' if r else 'plain'}" for d, r in CPU_LP_CASES])
def test_cpu_low_precision_forward_across_tiles(cpu_gemm_path, dtype, D, rope):
    q, k, v, cu, spec, max_len = cpu_rope_case(CPU_TILE_GRIDS, D, dtype, seed=40 + D, rope=rope)
    q, k, v = qkv_views(q, k, v)  # strided rows, as a fused qkv projection makes them
    out, lse = dinofast.varlen_attention_with_lse(q, k, v, cu, max_len, rope=spec)
    rq, rk = rotated(q, k, cu, spec)
    ref, _ = varlen_attention_reference(rq.double(), rk.double(), v.double(), cu)
    assert out.dtype == dtype
    baseline = torch_attention_same_dtype(rq, rk, v, cu)
    if rope:  # the fused rotation rounds a few elements one ulp off rope2d's (fp32 sin/cos differ):
        assert_flash_rule(out, ref, baseline)  # beyond one rounding of the output, on any path
    else:
        assert_low_precision_close(out, ref, baseline, dtype)
    # lse: fp32 sums of exact products of the rounded inputs, as the reference's fp32 computation
    assert_lse_close(lse, varlen_attention_reference(rq, rk, v, cu)[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D, rope", CPU_LP_CASES, ids=[f"D{d}-{'rope' if r else 'plain'}" for d, r in CPU_LP_CASES])
def test_cpu_low_precision_gradients_across_tiles(cpu_gemm_path, dtype, D, rope):
    q, k, v, cu, spec, max_len = cpu_rope_case(CPU_TILE_GRIDS_BWD, D, dtype, seed=50 + D, rope=rope)
    grad_out = randn(*q.shape, dtype=dtype, device="cpu", seed=59)
    got = _grads(lambda a, b, c: dinofast.varlen_attention(a, b, c, cu, max_len, rope=spec), (q, k, v), grad_out)
    want = _grads(lambda a, b, c: varlen_attention_reference(a, b, c, cu, rope=spec)[0],
                  (q.double(), k.double(), v.double()), grad_out.double())

    def same_dtype_torch(a, b, c):  # the flash rule's baseline: PyTorch in the input dtype
        ra, rb = rotated(a, b, cu, spec)
        return torch_attention_same_dtype(ra, rb, c, cu)

    baseline = _grads(same_dtype_torch, (q, k, v), grad_out)
    for g, w, b in zip(got, want, baseline):
        assert g.dtype == dtype
        if rope:  # as in the forward test: the fused rotation's one-ulp differences
            assert_flash_rule(g, w, b)
        else:
            assert_low_precision_close(g, w, b, dtype, gradients=True)


@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("case", NAN_CASES)
def test_cpu_low_precision_nan_and_inf_propagate(cpu_gemm_path, case, D):
    """bf16 inputs: NaN exactly where the reference (fp32 on the bf16 values) has NaN, forward and
    backward; lse finite where the reference's is. softmax_scale=1e38 overflows some scores to +-inf:
    the product must be rounded before the row max is subtracted, as in the reference."""
    lengths = [5, 1, 70, 3]
    q, k, v = (randn(sum(lengths), 2, D, dtype=torch.bfloat16, device="cpu", seed=60 + i) for i in range(3))
    cu = make_cu_seqlens(lengths, device="cpu")
    scale = poison(q, k, v, case)
    grad_out = randn(*q.shape, dtype=torch.bfloat16, device="cpu", seed=64)
    fn = lambda a, b, c: dinofast.varlen_attention(a, b, c, cu, 70, softmax_scale=scale)  # noqa: E731
    ref_fn = lambda a, b, c: varlen_attention_reference(a, b, c, cu, softmax_scale=scale)[0]  # noqa: E731
    out, lse = dinofast.varlen_attention_with_lse(q, k, v, cu, 70, softmax_scale=scale)
    ref, ref_lse = varlen_attention_reference(q, k, v, cu, softmax_scale=scale)
    assert ref.isnan().any()
    assert_nan_like(out, ref)
    if case != "nan-value":
        assert torch.equal(lse.isfinite(), ref_lse.isfinite())
    for g, w in zip(_grads(fn, (q, k, v), grad_out), _grads(ref_fn, (q, k, v), grad_out)):
        assert_nan_like(g, w)


def test_cpu_bf16_takes_the_low_precision_gemms():
    """Where the CPU has AMX, bf16 attention rounds P (and dS) to bf16 for its gemms: its result is
    not the fp32 path's (oneDNN disabled), and both meet their accuracy bars."""
    if _backend.why_unavailable("cpp", "cpu") or not cpp_low_precision_gemms(torch.bfloat16):
        pytest.skip(reason="needs the cpp backend and a CPU with AMX-BF16 (oneDNN enabled)")
    q, k, v, cu, spec, max_len = cpu_rope_case([(8, 9), (16, 20)], 64, torch.bfloat16, seed=70, rope=False)
    with dinofast.backend("cpp"):
        low = dinofast.varlen_attention(q, k, v, cu, max_len)
        with onednn(enabled=False):
            assert not cpp_low_precision_gemms(torch.bfloat16)
            fp32 = dinofast.varlen_attention(q, k, v, cu, max_len)
    ref, _ = varlen_attention_reference(q.double(), k.double(), v.double(), cu)
    assert not torch.equal(low, fp32)
    assert_flash_rule(low, ref, torch_attention_same_dtype(q, k, v, cu))
    assert_close(fp32, ref, torch.bfloat16)


# fp32 on the cpp backend across the same tiles (256-query, 512-key; row tails off the 6-row blocks,
# column tails off the 64-column strips, a 6-token image): with AVX-512 and D a multiple of 64, the
# forward's gemms are its own FMA kernels; D 72 and DINOFAST_CPU_ISA=avx2 take MKL's sgemm.
@pytest.fixture(params=["native", "avx2"])
def cpu_fp32_path(request, monkeypatch):
    """The cpp backend's fp32 gemms: "native" (its own FMA kernels where the CPU has AVX-512 and D is
    a multiple of 64) or DINOFAST_CPU_ISA=avx2 (MKL's sgemm)."""
    reason = _backend.why_unavailable("cpp", "cpu")
    if reason:
        pytest.skip(reason=f"cpp on cpu: {reason}")
    if request.param != "native":
        monkeypatch.setenv("DINOFAST_CPU_ISA", request.param)
    return request.param


@pytest.mark.parametrize("D, rope", [(64, False), (64, True), (128, False), (72, True), (192, False)])
def test_cpu_fp32_forward_across_tiles(cpu_fp32_path, D, rope):
    q, k, v, cu, spec, max_len = cpu_rope_case(CPU_TILE_GRIDS, D, torch.float32, seed=70 + D, rope=rope)
    q, k, v = qkv_views(q, k, v)  # strided rows, as a fused qkv projection makes them
    with dinofast.backend("cpp"):
        out, lse = dinofast.varlen_attention_with_lse(q, k, v, cu, max_len, rope=spec)
    rq, rk = rotated(q, k, cu, spec)
    ref, ref_lse = varlen_attention_reference(rq.double(), rk.double(), v.double(), cu)
    assert_close(out, ref)
    assert_lse_close(lse, ref_lse)


@pytest.mark.parametrize("D, rope", [(64, False), (64, True), (128, False), (72, False)])
def test_cpu_fp32_gradients_across_tiles(cpu_fp32_path, D, rope):
    """The fp32 backward across its 256-row tiles, on both gemm paths (own kernels: native with D a
    multiple of 64; MKL: avx2 or D 72): error against fp64 within flash-attention's rule, against
    PyTorch's own fp32 computation."""
    q, k, v, cu, spec, max_len = cpu_rope_case(CPU_TILE_GRIDS_BWD, D, torch.float32, seed=80 + D, rope=rope)
    grad_out = randn(*q.shape, device="cpu", seed=89)
    with dinofast.backend("cpp"):
        got = _grads(lambda a, b, c: dinofast.varlen_attention(a, b, c, cu, max_len, rope=spec), (q, k, v), grad_out)
    want = _grads(lambda a, b, c: varlen_attention_reference(a, b, c, cu, rope=spec)[0],
                  (q.double(), k.double(), v.double()), grad_out.double())

    def same_dtype_torch(a, b, c):
        ra, rb = rotated(a, b, cu, spec)
        return torch_attention_same_dtype(ra, rb, c, cu)

    for g, w, b in zip(got, want, _grads(same_dtype_torch, (q, k, v), grad_out)):
        assert_flash_rule(g, w, b)


def test_cpu_bf16_forward_on_amx_tiles(monkeypatch):
    """Where the CPU has AMX, the bf16 forward (D a multiple of 32) runs on AMX tiles of its own by
    default: its probabilities are rounded against a lazily moved row shift, so its result is not
    the brgemm forward's (DINOFAST_CPU_ISA=avx512), and both meet flash-attention's rule."""
    if _backend.why_unavailable("cpp", "cpu") or not cpp_low_precision_gemms(torch.bfloat16):
        pytest.skip(reason="needs the cpp backend and a CPU with AMX-BF16 (oneDNN enabled)")
    q, k, v, cu, spec, max_len = cpu_rope_case(CPU_TILE_GRIDS, 64, torch.bfloat16, seed=80, rope=False)
    with dinofast.backend("cpp"):
        tiles = dinofast.varlen_attention(q, k, v, cu, max_len)
        monkeypatch.setenv("DINOFAST_CPU_ISA", "avx512")
        brgemm = dinofast.varlen_attention(q, k, v, cu, max_len)
    ref, _ = varlen_attention_reference(q.double(), k.double(), v.double(), cu)
    assert not torch.equal(tiles, brgemm)
    baseline = torch_attention_same_dtype(q, k, v, cu)
    for out in (tiles, brgemm):
        assert_flash_rule(out, ref, baseline)
