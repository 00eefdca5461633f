"""The ops never read device metadata back to the host (no host sync): they run on meta tensors
given a host PackedLayout, compile with torch.compile(fullgraph=True, dynamic=True) without a
graph break, check a host layout against the tensors' shapes, and read device values only under
the debug switch (DINOFAST_DEBUG_CHECKS=1 / dinofast.debug_checks())."""
import pytest
import torch

import dinofast
from dinofast import PackedLayout
from tests.conftest import DEVICE, make_cu_seqlens, randn, value_error_test

GRIDS = [(2, 3), (4, 2), (1, 1)]
P, H, D = 5, 2, 16
LAYOUT = PackedLayout.from_grids(GRIDS, P)
T = LAYOUT.total


def _packed(device, dtype=torch.float32, requires_grad=False):
    q, k, v = (randn(T, H, D, seed=i).to(device=device, dtype=dtype).requires_grad_(requires_grad)
               for i in range(3))
    cu = make_cu_seqlens([P + h * w for h, w in GRIDS], device=device)
    grids = torch.tensor(GRIDS, dtype=torch.int32, device=device)
    return q, k, v, cu, grids


def _packed_calls(q, k, v, cu, grids, x, w, layout):
    """Every packed op once; returns the differentiable outputs."""
    rope = dinofast.RopeSpec(grids, P)
    return [
        *dinofast.rope2d(q, k, grids, num_prefix_tokens=P, cu_seqlens=cu, layout=layout),
        dinofast.varlen_attention(q, k, v, cu, layout.max_seqlen, layout=layout),
        dinofast.varlen_attention(q, k, v, cu, layout.max_seqlen, rope=rope, layout=layout),
        dinofast.varlen_attention_with_lse(q, k, v, cu, layout.max_seqlen, rope=rope, layout=layout)[0],
        dinofast.flash_attn_varlen_func(q, k, v, cu, cu, layout.max_seqlen, layout.max_seqlen),
        dinofast.pixel_shuffle_project(x, w, grids=grids, factor=1, num_prefix_tokens=P, cu_seqlens=cu,
                                       layout=layout)[0],
    ]


# ---------------------------------------------------------------------------------------------
# meta tensors: any read of a device value raises on them
# ---------------------------------------------------------------------------------------------
def test_packed_ops_run_on_meta_tensors_forward_and_backward():
    q, k, v, cu, grids = _packed("meta", requires_grad=True)
    x = torch.empty(T, D, device="meta", requires_grad=True)
    w = torch.empty(8, D, device="meta", requires_grad=True)
    outs = _packed_calls(q, k, v, cu, grids, x, w, LAYOUT)
    for out, like in zip(outs, [q, k, q, q, q, q]):
        assert out.device.type == "meta" and out.shape == like.shape
    psp = outs[-1]
    assert psp.shape == (sum(h * w for h, w in GRIDS), 8)
    sum(o.sum() for o in outs).backward()
    for t in (q, k, v, x, w):
        assert t.grad is not None and t.grad.device.type == "meta" and t.grad.shape == t.shape
    # in place, and a psp factor > 1 (rows from shapes alone: (T - n*P) / factor^2)
    with torch.no_grad():
        q2, k2 = q.detach(), k.detach()
        assert dinofast.rope2d_(q2, k2, grids, num_prefix_tokens=P, cu_seqlens=cu, layout=LAYOUT)[0] is q2
    grids2 = [(2, 4), (4, 2)]
    layout2 = PackedLayout.from_grids(grids2, P)
    x2 = torch.empty(layout2.total, D, device="meta")
    y, out_cu = dinofast.pixel_shuffle_project(x2, torch.empty(8, 4 * D, device="meta"), grids=grids2, factor=2,
                                               num_prefix_tokens=P, cu_seqlens=make_cu_seqlens([13, 13], "meta"))
    assert y.shape == (4, 8) and out_cu.shape == (3,)


def test_batched_ops_run_on_meta_tensors_forward_and_backward():
    q = torch.empty(2, H, P + 6, D, device="meta", requires_grad=True)
    k = torch.empty(2, H, P + 6, D, device="meta", requires_grad=True)
    rq, rk = dinofast.rope2d(q, k, (2, 3), num_prefix_tokens=P)
    x = torch.empty(2, P + 16, D, device="meta", requires_grad=True)
    w = torch.empty(8, 4 * D, device="meta", requires_grad=True)
    y = dinofast.pixel_shuffle_project(x, w, grids=(4, 4), factor=2, num_prefix_tokens=P)
    assert rq.shape == q.shape and y.shape == (2, 4, 8)
    (rq.sum() + rk.sum() + y.sum()).backward()
    assert q.grad.shape == q.shape and x.grad.shape == x.shape and w.grad.shape == w.shape
    with torch.no_grad():
        q2 = q.detach()
        dinofast.rope2d_(q2, k.detach(), (2, 3), num_prefix_tokens=P)
    rope = dinofast.nn.RoPE2D(D, num_prefix_tokens=P)
    assert rope(q, k, (2, 3))[0].shape == q.shape
    proj = dinofast.nn.PixelShuffleProjector(D, 8, 2, num_prefix_tokens=P).to("meta")
    assert proj(x, (4, 4)).shape == (2, 4, 8)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True, dynamic=True): no graph break
# ---------------------------------------------------------------------------------------------
def _graph_breaks(fn, *args) -> int:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_break_count, explanation.graph_count


def test_packed_ops_compile_without_graph_break():
    q, k, v, cu, grids = _packed(DEVICE, requires_grad=True)
    x = randn(T, D, seed=5).requires_grad_()
    w = randn(8, D, seed=6).requires_grad_()

    def f(q, k, v, cu, grids, x, w):
        return sum(o.sum() for o in _packed_calls(q, k, v, cu, grids, x, w, LAYOUT))

    breaks, graphs = _graph_breaks(f, q, k, v, cu, grids, x, w)
    assert breaks == 0 and graphs == 1
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    got = compiled(q, k, v, cu, grids, x, w)
    got.backward()
    grads = [t.grad.clone() for t in (q, k, v, x, w)]
    for t in (q, k, v, x, w):
        t.grad = None
    want = f(q, k, v, cu, grids, x, w)
    want.backward()
    torch.testing.assert_close(got, want)
    for g, t in zip(grads, (q, k, v, x, w)):
        torch.testing.assert_close(g, t.grad)


def test_inplace_and_batched_ops_compile_without_graph_break():
    q, k, _, cu, grids = _packed(DEVICE)
    qb, kb = randn(2, H, P + 6, D, seed=7), randn(2, H, P + 6, D, seed=8)
    xb, wb = randn(2, P + 16, D, seed=9), randn(8, 4 * D, seed=10)

    def f(q, k, cu, grids, qb, kb, xb, wb):
        dinofast.rope2d_(q, k, grids, num_prefix_tokens=P, cu_seqlens=cu, layout=LAYOUT)
        rq, rk = dinofast.rope2d(qb, kb, (2, 3), num_prefix_tokens=P)
        return q.sum() + rq.sum() + dinofast.pixel_shuffle_project(xb, wb, grids=(4, 4), factor=2,
                                                                   num_prefix_tokens=P).sum()

    breaks, graphs = _graph_breaks(f, q.clone(), k.clone(), cu, grids, qb, kb, xb, wb)
    assert breaks == 0 and graphs == 1
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")(q.clone(), k.clone(), cu, grids, qb, kb,
                                                                              xb, wb)
    torch.testing.assert_close(got, f(q.clone(), k.clone(), cu, grids, qb, kb, xb, wb))


# ---------------------------------------------------------------------------------------------
# a host layout that disagrees with the tensors: ValueError naming both (no debug switch needed)
# ---------------------------------------------------------------------------------------------
def _layout_mismatches():
    q, k, v, cu, grids = _packed(DEVICE)
    x, w = randn(T, D, seed=5), randn(8, D, seed=6)
    two = PackedLayout.from_grids(GRIDS[:2], P)                   # 2 segments, cu_seqlens holds 3
    shifted = PackedLayout.from_grids([(2, 3), (4, 2), (1, 2)], P)  # 3 segments, one token more
    no_grids = PackedLayout.from_lengths([P + h * w for h, w in GRIDS])
    other_prefix = PackedLayout.from_grids([(1, 11), (1, 13), (2, 3)], 0)  # same lengths, no prefix
    rope = dinofast.RopeSpec(grids, P)
    r2d = dinofast.rope2d
    return [
        (r"layout: expected 3 segments, as cu_seqlens.*got 2 segments",
         lambda: r2d(q, k, grids, num_prefix_tokens=P, cu_seqlens=cu, layout=two)),
        (r"layout: expected 3 segments, as cu_seqlens.*got 2 segments",
         lambda: dinofast.varlen_attention(q, k, v, cu, 32, layout=two)),
        (r"layout: expected 3 segments, as cu_seqlens.*got 2 segments",
         lambda: dinofast.pixel_shuffle_project(x, w, grids=grids, factor=1, num_prefix_tokens=P, cu_seqlens=cu,
                                                layout=two)),
        (rf"layout: expected {T} tokens in all, as q.shape\[0\] \(T\), got layout.cu_seqlens\[-1\] = {T + 1}",
         lambda: r2d(q, k, grids, num_prefix_tokens=P, cu_seqlens=cu, layout=shifted)),
        (rf"layout: expected {T} tokens in all, as x.shape\[0\] \(T\)",
         lambda: dinofast.pixel_shuffle_project(x, w, grids=grids, factor=1, num_prefix_tokens=P, cu_seqlens=cu,
                                                layout=shifted)),
        (r"layout: expected per-image grids", lambda: dinofast.varlen_attention(q, k, v, cu, 32, rope=rope,
                                                                                layout=no_grids)),
        (r"layout: expected num_prefix_tokens = 5, as rope.num_prefix_tokens, got layout.num_prefix_tokens = 0",
         lambda: dinofast.varlen_attention(q, k, v, cu, 32, rope=rope, layout=other_prefix)),
        (r"max_seqlen: expected >= the longest segment \(13 tokens, from layout\), got 12",
         lambda: dinofast.varlen_attention(q, k, v, cu, 12, layout=LAYOUT)),
        (r"layout: expected the layout of grids", lambda: r2d(q, k, [(2, 3), (4, 2), (1, 2)], num_prefix_tokens=P,
                                                              cu_seqlens=cu, layout=LAYOUT)),
        (r"layout: expected a dinofast.PackedLayout", lambda: dinofast.varlen_attention(q, k, v, cu, 32,
                                                                                       layout=[0, 11, 24, 30])),
        (r"grids.*image 0 both divisible by factor 2",
         lambda: dinofast.pixel_shuffle_project(x, randn(8, 4 * D), grids=grids, factor=2, num_prefix_tokens=P,
                                                cu_seqlens=cu, layout=LAYOUT)),
    ]


test_layout_that_disagrees_with_the_tensors_raises = value_error_test(_layout_mismatches)


def test_layout_checks_its_own_values():
    with pytest.raises(ValueError, match=r"layout.cu_seqlens: expected non-decreasing"):
        PackedLayout((0, 5, 3))
    with pytest.raises(ValueError, match=r"layout.cu_seqlens: expected segment 1 of num_prefix_tokens \+ Hp\*Wp"):
        PackedLayout((0, 11, 20), ((2, 3), (4, 2)), 5)
    with pytest.raises(ValueError, match=r"layout.grids: expected \(Hp, Wp\)"):
        PackedLayout((0, 11), ((2, 0),), 5)
    with pytest.raises(ValueError, match=r"grids: expected \(Hp, Wp\)"):
        PackedLayout.from_grids([(2, 3.0)], 5)
    assert LAYOUT.cu_seqlens == (0, 11, 24, 30) and LAYOUT.max_seqlen == 13 and LAYOUT.n == 3


# ---------------------------------------------------------------------------------------------
# the debug switch: device values read back and checked; off, they are not read
# ---------------------------------------------------------------------------------------------
def _bad_device_values():
    q, k, v, cu, grids = _packed(DEVICE)
    x, w = randn(T, D, seed=5), randn(8, D, seed=6)
    bad_cu = cu.clone()
    bad_cu[1] += 1  # segments 12 + 12 + 6: sum right, per-image lengths wrong
    bad_grids = grids.clone()
    bad_grids[2, 1] = 2
    rope = dinofast.RopeSpec(grids, P)
    return [
        (r"cu_seqlens: expected segment 0 of num_prefix_tokens \+ Hp\*Wp = 5 \+ 2\*3 = 11 tokens, got 12",
         lambda: dinofast.rope2d(q, k, grids, num_prefix_tokens=P, cu_seqlens=bad_cu)),
        (r"cu_seqlens: expected segment 2 of .* = 7 tokens, got 6",
         lambda: dinofast.varlen_attention(q, k, v, cu, 13, rope=dinofast.RopeSpec(bad_grids, P))),
        (r"max_seqlen: expected >= the longest segment \(13 tokens\), got 12",
         lambda: dinofast.varlen_attention(q, k, v, cu, 12, rope=rope)),
        (r"cu_seqlens: expected segment 0",
         lambda: dinofast.pixel_shuffle_project(x, w, grids=grids, factor=1, num_prefix_tokens=P, cu_seqlens=bad_cu)),
        # a layout whose values disagree with the device tensors' (same shapes): named both ways
        (r"layout: expected the values of cu_seqlens \[0, 12, 24, 30\], got layout.cu_seqlens = \[0, 11, 24, 30\]",
         lambda: dinofast.varlen_attention(q, k, v, bad_cu, 13, layout=LAYOUT)),
    ]


@pytest.mark.parametrize("how", ["context manager", "environment"])
@pytest.mark.parametrize("case", range(len(_bad_device_values())))
def test_debug_switch_reads_and_checks_device_values(case, how, monkeypatch):
    pattern, call = _bad_device_values()[case]
    if how == "environment":
        monkeypatch.setenv("DINOFAST_DEBUG_CHECKS", "1")
        with pytest.raises(ValueError, match=pattern):
            call()
    else:
        with pytest.raises(ValueError, match=pattern):
            with dinofast.debug_checks():
                call()


def test_without_the_debug_switch_device_values_are_not_read(monkeypatch):
    """Off (the default), no op reads device metadata: reading it is made to fail."""
    monkeypatch.delenv("DINOFAST_DEBUG_CHECKS", raising=False)
    from dinofast import _debug

    def refuse(*args, **kwargs):
        raise AssertionError("device metadata read back without the debug switch")

    monkeypatch.setattr(_debug, "read_device_metadata", refuse)
    monkeypatch.setattr(_debug, "read_device_ints", refuse)
    q, k, v, cu, grids = _packed(DEVICE)
    x, w = randn(T, D, seed=5), randn(8, D, seed=6)
    _packed_calls(q, k, v, cu, grids, x, w, LAYOUT)
    with dinofast.debug_checks(False):
        monkeypatch.setenv("DINOFAST_DEBUG_CHECKS", "1")
        _packed_calls(q, k, v, cu, grids, x, w, LAYOUT)
    with dinofast.debug_checks(), pytest.raises(AssertionError, match="without the debug switch"):
        _packed_calls(q, k, v, cu, grids, x, w, LAYOUT)


# ---------------------------------------------------------------------------------------------
# encode_packed: host metadata once per forward, no device read in any layer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grad", [False, True])
def test_encode_packed_builds_its_metadata_once_and_reads_none_back(monkeypatch, grad):
    from dinofast import _debug, _layout
    from tests.dinov3_models import images, random_model

    model = dinofast.patch_dinov3(random_model(layers=3))
    imgs = images([(32, 48), (16, 16), (48, 32)])
    built = []
    real_from_grids = _layout.PackedLayout.from_grids.__func__

    def counting_from_grids(cls, grids, num_prefix_tokens):
        built.append(grids)
        return real_from_grids(cls, grids, num_prefix_tokens)

    def refuse(*args, **kwargs):
        raise AssertionError("device metadata read back without the debug switch")

    monkeypatch.setattr(_layout.PackedLayout, "from_grids", classmethod(counting_from_grids))
    monkeypatch.setattr(_debug, "read_device_metadata", refuse)
    monkeypatch.setattr(_debug, "read_device_ints", refuse)
    monkeypatch.delenv("DINOFAST_DEBUG_CHECKS", raising=False)
    with torch.set_grad_enabled(grad):
        feats = dinofast.encode_packed(model, imgs)
    assert len(built) == 1 and len(feats) == 3  # one layout for 3 layers
    assert feats[0].patches.shape[:2] == (2, 3)
    with dinofast.debug_checks(), pytest.raises(AssertionError, match="without the debug switch"):
        dinofast.encode_packed(model, imgs)


def test_pack_holds_the_host_layout_of_its_tensors():
    packed = dinofast.pack([randn(3, 32, 48, seed=1), randn(3, 16, 16, seed=2)], patch_size=16, num_prefix_tokens=5)
    layout = packed.layout
    assert list(layout.cu_seqlens) == packed.cu_seqlens.tolist() == [0, 11, 17]
    assert [list(g) for g in layout.grids] == packed.grids.tolist() and layout.max_seqlen == packed.max_seqlen
    assert packed.to(DEVICE).layout == layout and packed.total_tokens == 17
    q = randn(17, 2, 16, seed=3)
    out = dinofast.varlen_attention(q, q, q, packed.cu_seqlens, packed.max_seqlen,
                                    rope=dinofast.RopeSpec(packed.grids, 5), layout=layout)
    with dinofast.debug_checks():  # the layout agrees with the device values
        torch.testing.assert_close(out, dinofast.varlen_attention(q, q, q, packed.cu_seqlens, packed.max_seqlen,
                                                                  rope=dinofast.RopeSpec(packed.grids, 5)))


@pytest.mark.parametrize("strict", [False, True])
def test_packed_ops_export_and_run(strict):
    layout = PackedLayout.from_grids([(2, 4), (4, 2)], P)
    cu = torch.tensor(layout.cu_seqlens, dtype=torch.int32, device=DEVICE)
    grids = torch.tensor(layout.grids, dtype=torch.int32, device=DEVICE)

    class Packed(torch.nn.Module):
        def forward(self, q, k, v, x, w, cu, grids):
            a = dinofast.varlen_attention(q, k, v, cu, layout.max_seqlen, rope=dinofast.RopeSpec(grids, P),
                                          layout=layout)
            rq, _ = dinofast.rope2d(q, k, grids, num_prefix_tokens=P, cu_seqlens=cu, layout=layout)
            y, out_cu = dinofast.pixel_shuffle_project(x, w, grids=grids, factor=2, num_prefix_tokens=P,
                                                       cu_seqlens=cu, layout=layout)
            return a + rq, y, out_cu

    args = (*(randn(layout.total, H, D, seed=i) for i in range(3)), randn(layout.total, 8, seed=3),
            randn(4, 32, seed=4), cu, grids)
    program = torch.export.export(Packed(), args, strict=strict)
    for got, want in zip(program.module()(*args), Packed()(*args)):
        torch.testing.assert_close(got, want)
