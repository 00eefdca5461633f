"""patch_dinov3 / unpatch_dinov3 / encode_packed against transformers' own DINOv3 ViT (random weights)."""
import copy

import pytest
import torch

import dinofast
from dinofast.models.dinov3 import is_patched
from tests.conftest import DEVICE, MODEL_ATOL, assert_flash_rule
from tests.dinov3_models import images, max_diff, random_model

SIZES = [(224, 224), (512, 384), (768, 768)]  # the parity sizes (H, W): square, landscape, large
MIX = [(64, 64), (96, 32), (32, 112), (16, 16), (48, 80), (16, 64)]  # square, tall, wide, one-patch


def run(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw)


# ---------------------------------------------------------------------------------------------
# patching
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "swiglu"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_patched_equals_transformers(gated, size, monkeypatch):
    model = random_model(gated=gated, registers=4)
    x = images([size, size], seed=1)
    x = torch.stack(x)
    ref = run(model, x)
    assert dinofast.patch_dinov3(model) is model and is_patched(model)
    attended = _packed_calls(monkeypatch)
    out = run(model, x)
    # fp32 batches attend through the cpp kernel where its gemms are its own (else SDPA), per layer
    assert len(attended) == (2 if _batched_through_cpp_expected(torch.float32) else 0)
    assert max_diff(out.last_hidden_state, ref.last_hidden_state) <= MODEL_ATOL
    assert max_diff(out.pooler_output, ref.pooler_output) <= MODEL_ATOL
    assert ref.last_hidden_state.abs().max() > 1.0  # outputs of order 1: the bound means something


@pytest.mark.parametrize("registers", [0, 1, 4])
def test_any_number_of_registers(registers):
    model = random_model(registers=registers, layers=1)
    x = torch.stack(images([(48, 80)] * 2, seed=2))
    ref = run(model, x).last_hidden_state
    out = run(dinofast.patch_dinov3(model), x).last_hidden_state
    assert max_diff(out, ref) <= MODEL_ATOL


def test_every_backend(backend_name):
    """The model path through each rope2d backend (triton in the interpreter: small image)."""
    model = random_model(layers=1, hidden=64)
    x = torch.stack(images([(32, 48)] * 2, seed=3))
    ref = run(model, x).last_hidden_state
    dinofast.patch_dinov3(model)
    assert max_diff(run(model, x).last_hidden_state, ref) <= MODEL_ATOL
    feats = run_packed(model, images([(32, 48), (16, 32)], seed=4))
    dinofast.unpatch_dinov3(model)
    check_packed(model, images([(32, 48), (16, 32)], seed=4), feats)


def test_unpatch_restores_transformers_exactly():
    model = random_model()
    x = torch.stack(images([(64, 48)] * 2))
    ref = run(model, x).last_hidden_state
    keys = {k: (v.shape, v.data_ptr()) for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    dinofast.patch_dinov3(model)
    dinofast.patch_dinov3(model)  # idempotent
    assert {k: (v.shape, v.data_ptr()) for k, v in model.state_dict().items()} == keys
    assert any(type(m).__name__.startswith("Dinofast") for m in model.modules())
    dinofast.unpatch_dinov3(model)
    assert [type(m) for m in model.modules()] == classes and not is_patched(model)
    assert torch.equal(run(model, x).last_hidden_state, ref)


def test_stored_periods_are_used():
    """A model whose rope inv_freq is not transformers' default (e.g. bf16-rounded periods loaded
    from a checkpoint): patched and unpatched agree, and differ from the default periods."""
    model = random_model()
    rope = model.rope_embeddings
    periods = (1 / rope.inv_freq).to(torch.bfloat16).float() * 1.3
    x = torch.stack(images([(64, 96)] * 2))
    default = run(model, x).last_hidden_state
    rope.inv_freq = 1 / periods
    ref = run(model, x).last_hidden_state
    assert max_diff(ref, default) > 100 * MODEL_ATOL
    assert max_diff(run(dinofast.patch_dinov3(model), x).last_hidden_state, ref) <= MODEL_ATOL


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_stored_periods_checked_once(monkeypatch, mode):
    """A checkpoint's periods go to every layer's rope call: they are checked (and inverted) in the
    first call only, also when the first forward runs under inference_mode (whose tensors have no
    version counter to key a cache by), and the results stay the unpatched model's."""
    from dinofast import _validate

    model = random_model()
    rope = model.rope_embeddings
    rope.inv_freq = 1 / ((1 / rope.inv_freq).to(torch.bfloat16).float() * 1.3)
    x = torch.stack(images([(64, 96)] * 2))
    ref = run(model, x).last_hidden_state
    dinofast.patch_dinov3(model)
    calls = []
    check = _validate.check_periods
    monkeypatch.setattr(_validate, "check_periods", lambda *a, **kw: (calls.append(a), check(*a, **kw)))
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    for _ in range(2):
        with context():
            assert max_diff(model(x).last_hidden_state, ref) <= MODEL_ATOL
    layers = model.config.num_hidden_layers
    assert len(calls) == 1, f"periods checked {len(calls)} times in 2 forwards of {layers} layers"


def test_train_mode_reproduces_coordinate_augmentation():
    model = random_model(pos_embed_shift=0.1, pos_embed_jitter=1.2, pos_embed_rescale=2.0).train()
    x = torch.stack(images([(64, 96)] * 2))
    torch.manual_seed(7)
    ref = run(model, x).last_hidden_state
    eval_out = run(model.eval(), x).last_hidden_state
    assert max_diff(ref, eval_out) > 100 * MODEL_ATOL  # the augmentation really changes the output
    dinofast.patch_dinov3(model).train()
    torch.manual_seed(7)
    assert max_diff(run(model, x).last_hidden_state, ref) <= MODEL_ATOL


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_equal_transformers(monkeypatch):
    model = random_model(gated=True, pos_embed_shift=0.05).train()
    x = torch.stack(images([(48, 64)] * 2)).requires_grad_()
    w = torch.randn(2, 4 + 1 + 12, 128, generator=torch.Generator().manual_seed(9)).to(DEVICE)

    def step(seed):
        model.zero_grad()
        x.grad = None
        torch.manual_seed(seed)
        (model(x).last_hidden_state * w).sum().backward()
        return _grads(model), x.grad.clone()

    ref, ref_x = step(3)
    dinofast.patch_dinov3(model)
    attended = _packed_calls(monkeypatch)
    got, got_x = step(3)
    assert len(attended) == (2 if _batched_through_cpp_expected(torch.float32) else 0)  # and its backward
    assert ref.keys() == got.keys() and len(ref) == len(list(model.parameters())) - 1  # all but mask_token
    for name in ref:
        scale = ref[name].abs().max().item()
        assert max_diff(got[name], ref[name]) <= MODEL_ATOL * max(1.0, scale), name
    assert max_diff(got_x, ref_x) <= MODEL_ATOL * max(1.0, ref_x.abs().max().item())


def test_backbone_feature_maps():
    model = random_model(backbone=True, out_indices=[1, 2], layers=2)
    x = torch.stack(images([(64, 96)] * 2))
    ref = run(model, x)
    out = run(dinofast.patch_dinov3(model), x)
    assert len(out.feature_maps) == 2
    for a, b in zip(out.feature_maps, ref.feature_maps):
        assert a.shape == (2, 128, 4, 6) and max_diff(a, b) <= MODEL_ATOL


def test_state_dict_round_trip_between_patched_and_plain():
    plain = random_model(seed=1)
    patched = dinofast.patch_dinov3(random_model(seed=2))
    patched.load_state_dict(plain.state_dict())
    x = torch.stack(images([(32, 32)] * 2))
    assert max_diff(run(patched, x).last_hidden_state, run(plain, x).last_hidden_state) <= MODEL_ATOL


def test_model_built_in_inference_mode():
    with torch.inference_mode():
        model = random_model(layers=1)
        x = torch.stack(images([(32, 48)] * 2))
        ref = model(x).last_hidden_state
        out = dinofast.patch_dinov3(model)(x).last_hidden_state
        feats = dinofast.encode_packed(model, list(x))
    assert max_diff(out, ref) <= MODEL_ATOL
    assert max_diff(feats[1].patches.flatten(0, 1), ref[1, 5:]) <= MODEL_ATOL


def test_deepcopy_of_patched_model_stays_patched():
    """Also after a forward, whose derived weights (fused, scaled, oneDNN-packed) are not copied."""
    model = dinofast.patch_dinov3(random_model(layers=1))
    x = torch.stack(images([(32, 32)] * 2))
    ref = run(model, x).last_hidden_state
    clone = copy.deepcopy(model)
    assert is_patched(clone)
    assert torch.equal(run(clone, x).last_hidden_state, ref)


# ---------------------------------------------------------------------------------------------
# encode_packed
# ---------------------------------------------------------------------------------------------
def run_packed(model, imgs, layers=None):
    with torch.no_grad():
        return dinofast.encode_packed(model, imgs, output_layers=layers)


def check_packed(model, imgs, feats, layers=(), registers=4):
    """Every image's features against transformers run on that image alone."""
    assert len(feats) == len(imgs)
    P = 1 + registers
    for img, f in zip(imgs, feats):
        out = run(model, img[None], output_hidden_states=True)
        hp, wp = img.shape[1] // 16, img.shape[2] // 16
        seq = out.last_hidden_state[0]
        assert f.cls.shape == (seq.shape[-1],) and f.registers.shape == (registers, seq.shape[-1])
        assert f.patches.shape == (hp, wp, seq.shape[-1])
        assert max_diff(f.cls, seq[0]) <= MODEL_ATOL
        assert max_diff(f.registers, seq[1:P]) <= MODEL_ATOL
        assert max_diff(f.patches, seq[P:].reshape(hp, wp, -1)) <= MODEL_ATOL
        assert sorted(f.layers) == sorted(layers)
        for i in layers:
            h = out.hidden_states[i % (len(out.hidden_states) - 1) + 1][0]  # [0] is the embedding output
            g = f.layers[i]
            assert max_diff(g.cls, h[0]) <= MODEL_ATOL and max_diff(g.registers, h[1:P]) <= MODEL_ATOL
            assert max_diff(g.patches, h[P:].reshape(hp, wp, -1)) <= MODEL_ATOL


@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "swiglu"])
@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("patched", [False, True], ids=["plain", "patched"])
def test_encode_packed_equals_per_image(gated, registers, patched):
    model = random_model(gated=gated, registers=registers, layers=3)
    if patched:
        dinofast.patch_dinov3(model)
    imgs = images(MIX, seed=5)
    feats = run_packed(model, imgs, layers=[0, -1, 1])
    dinofast.unpatch_dinov3(model)
    check_packed(model, imgs, feats, layers=[0, -1, 1], registers=registers)


def test_encode_packed_single_and_large_images():
    model = random_model(layers=1)
    check_packed(model, images([(16, 16)]), run_packed(model, images([(16, 16)])))
    imgs = images([(512, 384), (224, 224), (16, 16)], seed=6)
    check_packed(model, imgs, run_packed(model, imgs))


def test_encode_packed_train_mode_draws_like_a_loop():
    model = random_model(pos_embed_shift=0.1, pos_embed_jitter=1.1, pos_embed_rescale=2.0).train()
    imgs = images(MIX[:4], seed=7)
    torch.manual_seed(11)
    feats = run_packed(model, imgs)
    torch.manual_seed(11)
    for img, f in zip(imgs, feats):  # the loop draws the augmentation image after image
        ref = run(model, img[None]).last_hidden_state[0]
        assert max_diff(f.cls, ref[0]) <= MODEL_ATOL
        assert max_diff(f.patches.flatten(0, 1), ref[5:]) <= MODEL_ATOL


def test_encode_packed_gradients():
    model = random_model(gated=True)
    imgs = [t.requires_grad_() for t in images(MIX[:4], seed=8)]
    feats = dinofast.encode_packed(model, imgs, output_layers=[0])
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(f.patches.shape, generator=g).to(DEVICE) for f in feats]
    loss = sum((f.patches * w).sum() + f.cls.sum() + f.layers[0].registers.sum() for f, w in zip(feats, ws))
    loss.backward()
    got, got_x = _grads(model), [t.grad.clone() for t in imgs]
    model.zero_grad()
    for t in imgs:
        t.grad = None
    loss = 0
    for t, w in zip(imgs, ws):
        out = model(t[None], output_hidden_states=True)
        seq = out.last_hidden_state[0]
        loss = loss + (seq[5:].reshape(w.shape) * w).sum() + seq[0].sum() + out.hidden_states[1][0, 1:5].sum()
    loss.backward()
    ref, ref_x = _grads(model), [t.grad for t in imgs]
    assert ref.keys() == got.keys()
    for name in ref:
        assert max_diff(got[name], ref[name]) <= MODEL_ATOL * max(1.0, ref[name].abs().max().item()), name
    for a, b in zip(got_x, ref_x):
        assert max_diff(a, b) <= MODEL_ATOL * max(1.0, b.abs().max().item())


def test_encode_packed_casts_pixels_like_transformers():
    model = random_model(layers=1)
    imgs = images([(32, 48), (16, 16)], dtype=torch.float64)
    check_packed(model, imgs, run_packed(model, imgs))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_not_a_dinov3_model():
    for fn in (dinofast.patch_dinov3, dinofast.unpatch_dinov3):
        with pytest.raises(ValueError, match="model: expected a transformers DINOv3ViTModel.*got Linear"):
            fn(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model: expected a transformers DINOv3ViTModel"):
        dinofast.encode_packed(torch.nn.Linear(2, 2), images([(16, 16)]))


@pytest.mark.parametrize("case, match", [
    ("empty", r"images: expected a non-empty list"),
    ("not_list", r"images: expected a list of \[3, H, W\] tensors, got Tensor"),
    ("side", r"images\[1\]: expected H and W positive multiples of the patch size 16x16, got size 40x32"),
    ("channels", r"images\[0\]: expected \[3, H, W\]"),
    ("ndim", r"images\[0\]: expected a 3-D tensor"),
    ("dtype", r"images\[1\]: expected dtype torch.float32 \(as images\[0\]\), got torch.float16"),
    ("device", r"images\[1\]: expected device cpu \(as images\[0\]\), got meta"),
    ("int", r"images\[0\]: expected dtype in"),
    ("layers", r"output_layers: expected ints in \[-2, 1\]"),
])
def test_encode_packed_bad_input(case, match):
    if DEVICE.type != "cpu" and case == "device":
        pytest.skip(reason="written for CPU images")
    model = random_model()
    good = images([(32, 32)])[0]
    bad = {
        "empty": [], "not_list": good, "side": [good, torch.randn(3, 40, 32)],
        "channels": [torch.randn(1, 32, 32)], "ndim": [good[None]], "dtype": [good, good.half()],
        "device": [good, torch.empty(3, 32, 32, device="meta")], "int": [good.to(torch.uint8)],
    }
    with pytest.raises(ValueError, match=match):
        if case == "layers":
            dinofast.encode_packed(model, [good], output_layers=[2])
        else:
            dinofast.encode_packed(model, bad[case])


def test_encode_packed_refuses_packed_dropout_in_train_mode():
    model = random_model(drop_path_rate=0.1).train()
    with pytest.raises(ValueError, match="drop_path_rate=0.1"):
        dinofast.encode_packed(model, images([(32, 32)]))


def test_patched_attention_alone_needs_the_plan():
    model = dinofast.patch_dinov3(random_model(layers=1))
    attn = model.model.layer[0].attention
    with pytest.raises(ValueError, match="position_embeddings: expected the plan"):
        attn(torch.randn(1, 5, 128), position_embeddings=(torch.ones(1), torch.ones(1)))


# ---------------------------------------------------------------------------------------------
# compilers, attention maps, the fused q|k|v weight
# ---------------------------------------------------------------------------------------------
def _forward(model, x, seed):
    torch.manual_seed(seed)  # train mode draws the RoPE augmentation: same draws in every run
    return model(x).last_hidden_state


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("compiler", ["compile", "export"])
def test_compiled_patched_equals_transformers(compiler, train, grad):
    """torch.compile(fullgraph=True) (Inductor) and torch.export(strict=False) of a patched model:
    outputs (and with grad, every parameter's gradient) equal the plain eager transformers model.
    fallback_random: Inductor then draws the train-mode augmentation with torch's RNG, as eager."""
    torch._dynamo.reset()
    plain = random_model(layers=2, hidden=64, gated=train, pos_embed_shift=0.1, pos_embed_jitter=1.2,
                         pos_embed_rescale=2.0).train(train)
    patched = dinofast.patch_dinov3(copy.deepcopy(plain))
    x = torch.stack(images([(32, 48)] * 2, seed=12))
    w = torch.randn(2, 5 + 6, 64, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    with torch.set_grad_enabled(grad):
        ref = _forward(plain, x, 5)
        if compiler == "compile":
            fn = torch.compile(patched, fullgraph=True)
        else:
            fn = torch.export.export(patched, (x,), strict=False).module()
        with torch._inductor.config.patch(fallback_random=True):
            out = _forward(fn, x, 5)
            assert max_diff(out, ref) <= MODEL_ATOL
            if train:  # a second call draws new augmentation, as eager does
                assert max_diff(_forward(fn, x, 6), _forward(plain, x, 6)) <= MODEL_ATOL
    if grad:
        (ref * w).sum().backward()
        (out * w).sum().backward()
        if compiler == "compile":
            got = _grads(patched)
        else:
            got = {n: p.grad for n, p in fn.named_parameters() if p.grad is not None}
        ref_grads = _grads(plain)
        assert got.keys() == ref_grads.keys() and len(ref_grads) > 10
        for name, g in ref_grads.items():
            assert max_diff(got[name], g) <= MODEL_ATOL * max(1.0, g.abs().max().item()), name


def test_compiled_inference_keeps_the_eager_cpu_fast_path(monkeypatch):
    """Eager CPU fp32 inference still runs the oneDNN epilogue path; a compiled model does not."""
    if DEVICE.type != "cpu":
        pytest.skip(reason="CPU-only path")
    from dinofast.models import dinov3 as D

    if not D._onednn_linear_available():
        pytest.skip(reason="this torch build has no oneDNN linear post-ops")
    calls = []
    real = D._scaled_linear_add
    monkeypatch.setattr(D, "_scaled_linear_add", lambda *a: calls.append(1) or real(*a))
    model = dinofast.patch_dinov3(random_model(layers=2, hidden=64))
    x = torch.stack(images([(32, 32)] * 2, seed=14))
    ref = run(model, x).last_hidden_state
    assert len(calls) == 4  # two GEMMs with the residual in their epilogue, per layer
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True)(x).last_hidden_state
    assert len(calls) == 4 and max_diff(out, ref) <= MODEL_ATOL


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_output_attentions_like_transformers(impl):
    """Eager attention returns one map [B, H, N, N] per layer (patched computes them explicitly);
    sdpa returns none, in transformers as patched. Hidden states agree too."""
    plain = random_model(layers=2, hidden=64)
    plain.config._attn_implementation = impl
    patched = dinofast.patch_dinov3(copy.deepcopy(plain))
    x = torch.stack(images([(32, 48)] * 2, seed=15))
    ref = run(plain, x, output_attentions=True, output_hidden_states=True)
    out = run(patched, x, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == len(ref.attentions) == (2 if impl == "eager" else 0)
    for a, b in zip(out.attentions, ref.attentions):
        assert a.shape == (2, 2, 5 + 6, 5 + 6) and max_diff(a, b) <= MODEL_ATOL
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert max_diff(a, b) <= MODEL_ATOL
    assert run(patched, x).attentions is None  # not asked: not computed
    if impl != "eager":
        return  # transformers refuses config.output_attentions with sdpa
    for m in (plain, patched):  # asked through the config instead of the call
        m.config.output_attentions = True
    ref, out = run(plain, x), run(patched, x)
    assert len(out.attentions) == len(ref.attentions) == 2
    for a, b in zip(out.attentions, ref.attentions):
        assert max_diff(a, b) <= MODEL_ATOL


def test_fused_qkv_weight_is_cached_and_follows_updates():
    """The fused q|k|v weight is built once, then rebuilt only when a parameter changes: an
    in-place edit, an optimizer step (train mode, autograd through the cached weight),
    load_state_dict."""
    plain = random_model(layers=1, hidden=64)
    patched = dinofast.patch_dinov3(copy.deepcopy(plain))
    attn = patched.model.layer[0].attention
    x = torch.stack(images([(32, 32)] * 2, seed=16))
    assert max_diff(run(patched, x).last_hidden_state, run(plain, x).last_hidden_state) <= MODEL_ATOL
    from dinofast.models import dinov3 as D

    # eager CPU inference keeps the oneDNN-packed fused weight, every other path the plain one
    slot = "_dinofast_qkv_onednn" if DEVICE.type == "cpu" and torch.float32 in D._onednn_dtypes() else "_dinofast_qkv"
    fused = attn.__dict__[slot].value
    run(patched, x)
    assert attn.__dict__[slot].value is fused  # not rebuilt by a second forward

    with torch.no_grad():  # in-place edit
        for m in (plain, patched):
            m.model.layer[0].attention.k_proj.weight.mul_(1.5)
            m.model.layer[0].attention.v_proj.bias.add_(0.3)
    assert max_diff(run(patched, x).last_hidden_state, run(plain, x).last_hidden_state) <= MODEL_ATOL

    for m in (plain, patched):  # one SGD step each, same loss
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        (_forward(m, x, 17) ** 2).mean().backward()
        opt.step()
        m.eval()
    changed = run(patched, x).last_hidden_state
    assert max_diff(changed, run(plain, x).last_hidden_state) <= MODEL_ATOL

    patched.load_state_dict(random_model(layers=1, hidden=64, seed=3).state_dict())
    assert max_diff(run(patched, x).last_hidden_state, changed) > 100 * MODEL_ATOL
    plain.load_state_dict(patched.state_dict())
    assert max_diff(run(patched, x).last_hidden_state, run(plain, x).last_hidden_state) <= MODEL_ATOL


@pytest.mark.parametrize("compiler", ["compile", "export"])
def test_compiled_patched_backbone_feature_maps(compiler):
    torch._dynamo.reset()
    plain = random_model(backbone=True, out_indices=[1, 2], layers=2, hidden=64)
    patched = dinofast.patch_dinov3(copy.deepcopy(plain))
    x = torch.stack(images([(32, 48)] * 2, seed=18))
    with torch.no_grad():
        ref = plain(x).feature_maps
        fn = torch.compile(patched, fullgraph=True) if compiler == "compile" else \
            torch.export.export(patched, (x,), strict=False).module()
        out = fn(x).feature_maps
    assert len(out) == len(ref) == 2
    for a, b in zip(out, ref):
        assert a.shape == (2, 64, 2, 3) and max_diff(a, b) <= MODEL_ATOL


# ---------------------------------------------------------------------------------------------
# bf16: flash-attention's rule against an fp64 oracle, transformers' own bf16 run as the baseline
# ---------------------------------------------------------------------------------------------
def _bf16_models(**config_kw):
    """(plain bf16, patched bf16, plain fp64) copies of one random model: the fp64 one holds the
    same bf16-rounded weights, so it is the exact computation both bf16 runs approximate."""
    plain = random_model(**config_kw).to(torch.bfloat16)
    return plain, dinofast.patch_dinov3(copy.deepcopy(plain)), copy.deepcopy(plain).double()


def _onednn_calls(monkeypatch):
    """A list that grows by one per GEMM with the residual in its epilogue (the CPU oneDNN path)."""
    from dinofast.models import dinov3 as D

    calls = []
    real = D._scaled_linear_add
    monkeypatch.setattr(D, "_scaled_linear_add", lambda *a: calls.append(1) or real(*a))
    return calls


def _bf16_onednn_expected() -> bool:
    from dinofast.models import dinov3 as D

    return DEVICE.type == "cpu" and torch.bfloat16 in D._onednn_dtypes()


def _packed_calls(monkeypatch):
    """A list that grows by one per attention that goes through varlen_attention."""
    from dinofast.models import dinov3 as D

    calls = []
    real = D._attend_packed
    monkeypatch.setattr(D, "_attend_packed", lambda *a: calls.append(1) or real(*a))
    return calls


def _batched_through_cpp_expected(dtype=torch.bfloat16, head_dim=64) -> bool:
    """Whether a batch of images attends through the cpp kernel here: bf16 where its forward runs on
    AMX tiles, fp32 where its gemms are its own AVX-512 kernels."""
    name = "cpu_bf16_attention_on_amx" if dtype == torch.bfloat16 else "cpu_fp32_attention_own_kernels"
    probe = getattr(dinofast._C, name, None) if hasattr(dinofast, "_C") else None
    return DEVICE.type == "cpu" and probe is not None and probe(head_dim)


@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "swiglu"])
@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_cpu_inference_in_bounded_allocations(gated, packed, monkeypatch):
    """The CPU inference path with its allocation bound scaled down to these small models (as a real
    packed batch meets it): Q, K and V come from three GEMMs and the MLP runs in row chunks (several,
    the last one short), and the result is still transformers'."""
    from dinofast.models import dinov3 as D

    if DEVICE.type != "cpu" or not D._onednn_linear_available():
        pytest.skip(reason="the oneDNN CPU inference path is not available here")
    model = random_model(gated=gated, layers=2)
    patched = dinofast.patch_dinov3(copy.deepcopy(model))
    monkeypatch.setattr(D, "_ONE_ALLOCATION_BYTES", 1 << 16)  # 64 rows of the 256-wide MLP hidden in fp32
    chunks, gemms = [], []
    real_mlp, real_linear = D._mlp_residual, D._onednn_linear
    monkeypatch.setattr(D, "_mlp_residual", lambda layer, h: chunks.append(h.shape[0]) or real_mlp(layer, h))
    monkeypatch.setattr(D, "_onednn_linear", lambda x, params, *a: gemms.append(params[0].shape[0]) or
                        real_linear(x, params, *a))
    imgs = images([(224, 224), (96, 160)], seed=24)
    if packed:
        feats = run_packed(patched, imgs)
        check_packed(model, imgs, feats)
        tokens = sum(5 + h * w // 256 for h, w in [(224, 224), (96, 160)])
    else:
        x = torch.stack(images([(224, 224)], seed=24))
        got, ref = run(patched, x), run(model, x)
        assert max_diff(got.last_hidden_state, ref.last_hidden_state) <= MODEL_ATOL
        tokens = 5 + 14 * 14
    per_layer = -(-tokens // 64)
    assert chunks == ([64] * (per_layer - 1) + [tokens - 64 * (per_layer - 1)]) * 2 and tokens % 64 != 0
    assert gemms.count(128) >= 2 * 3 and 3 * 128 not in gemms  # q, k, v projections apart, never fused


@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "swiglu"])
@pytest.mark.parametrize("size", [(224, 224), (768, 768)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_patched_bf16_within_flash_rule_of_transformers(gated, size, monkeypatch):
    """Patched bf16 (on CPUs with native bf16: the oneDNN path, epilogues rounding once) is at
    most twice as far from the fp64 computation as transformers' own bf16 forward."""
    plain, patched, oracle = _bf16_models(gated=gated, layers=2)
    x = torch.stack(images([size], seed=21))
    calls, attended = _onednn_calls(monkeypatch), _packed_calls(monkeypatch)
    got = run(patched, x.bfloat16())
    assert len(calls) == (4 if _bf16_onednn_expected() else 0)
    assert len(attended) == (2 if _batched_through_cpp_expected() else 0)
    ref = run(oracle, x.double())
    base = run(plain, x.bfloat16())
    assert ref.last_hidden_state.abs().max() > 1.0
    assert_flash_rule(got.last_hidden_state, ref.last_hidden_state, base.last_hidden_state)
    assert_flash_rule(got.pooler_output, ref.pooler_output, base.pooler_output)


def test_patched_bf16_gradients_on_amx_attention_within_flash_rule(monkeypatch):
    """Training a patched bf16 model on a batch (train mode, no dropout): where attention goes through
    the cpp kernel (AMX), the input gradient is at most twice as far from fp64's as transformers' bf16
    one; DINOFAST_CPU_ISA=avx512 sends the same batch through SDPA, which must pass too."""
    if not _batched_through_cpp_expected():
        pytest.skip(reason="needs a CPU where the cpp bf16 attention forward runs on AMX tiles")
    plain, patched, oracle = _bf16_models(gated=False, layers=2)
    for m in (plain, patched, oracle):
        m.train()
    x = torch.stack(images([(160, 192), (160, 192)], seed=23))

    def input_grad(model, dtype):
        xi = x.to(dtype).requires_grad_()
        out = model(pixel_values=xi).last_hidden_state
        out.backward(torch.ones_like(out))
        return xi.grad

    attended = _packed_calls(monkeypatch)
    got = input_grad(patched, torch.bfloat16)
    assert len(attended) == 2
    monkeypatch.setenv("DINOFAST_CPU_ISA", "avx512")
    via_sdpa = input_grad(patched, torch.bfloat16)
    assert len(attended) == 2
    ref, base = input_grad(oracle, torch.float64), input_grad(plain, torch.bfloat16)
    assert_flash_rule(got, ref, base)
    assert_flash_rule(via_sdpa, ref, base)


@pytest.mark.parametrize("patched", [False, True], ids=["plain", "patched"])
def test_encode_packed_bf16_within_flash_rule_of_transformers(patched):
    """encode_packed in bf16 against each image run alone in fp64; baseline: transformers' bf16
    forward of that image."""
    plain, patched_model, oracle = _bf16_models(gated=False, layers=3)
    imgs = images(MIX + [(224, 160)], seed=22)
    feats = run_packed(patched_model if patched else plain, [i.bfloat16() for i in imgs], layers=[0])
    for img, f in zip(imgs, feats):
        ref = run(oracle, img[None].double(), output_hidden_states=True)
        base = run(plain, img[None].bfloat16(), output_hidden_states=True)
        for got, r, b in ((torch.cat([f.cls[None], f.registers, f.patches.flatten(0, 1)]),
                           ref.last_hidden_state[0], base.last_hidden_state[0]),
                          (torch.cat([f.layers[0].cls[None], f.layers[0].registers,
                                      f.layers[0].patches.flatten(0, 1)]),
                           ref.hidden_states[1][0], base.hidden_states[1][0])):
            assert got.dtype == torch.bfloat16
            assert_flash_rule(got, r, b)


@pytest.mark.parametrize("compiler", ["compile", "export"])
def test_compiled_patched_bf16_within_flash_rule(compiler):
    """torch.compile(fullgraph=True) and torch.export of a patched bf16 model (the plain path: no
    oneDNN op while tracing) stay within flash-attention's rule of transformers' eager bf16."""
    torch._dynamo.reset()
    plain, patched, oracle = _bf16_models(layers=2, hidden=64)
    x = torch.stack(images([(32, 48)] * 2, seed=23)).bfloat16()
    with torch.no_grad():
        fn = torch.compile(patched, fullgraph=True) if compiler == "compile" else \
            torch.export.export(patched, (x,), strict=False).module()
        got = fn(x).last_hidden_state
    assert got.dtype == torch.bfloat16
    assert_flash_rule(got, run(oracle, x.double()).last_hidden_state, run(plain, x).last_hidden_state)
