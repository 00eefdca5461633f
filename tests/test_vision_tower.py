"""VisionTower and encode_patches against an independent per-image oracle: processor -> unpatched
transformers DINOv3ViTModel in float64 on each image alone -> nanoVLM's reshape/permute pixel
shuffle on (Hp, Wp) + Linear (random weights, nothing downloaded)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dinofast
from dinofast.ops import pixel_shuffle_project as psp_module
from tests.conftest import DEVICE, MODEL_ATOL
from tests.dinov3_models import images as float_images
from tests.dinov3_models import max_diff, random_model

S, LM = 4, 96  # pixel-shuffle factor, LM width
P = 5  # CLS + 4 registers (random_model's default)


def processor(**kw):
    return dinofast.ImageProcessor(patch_size=16, max_side=960, factor=S, **kw)


def pil(h, w, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def u8(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def mixed_inputs():
    """Square, tall, wide, one-cell and 640x960 raw images plus one already-processed float image."""
    return [pil(300, 300, 1), pil(500, 200, 2), u8(100, 400, 3), pil(30, 40, 4), u8(640, 960, 5),
            float_images([(128, 192)], seed=6)[0]]


def make_tower(keep_cls=False, bias=False, proc=None, seed=0, **model_kw):
    model = random_model(seed=seed, **model_kw)
    torch.manual_seed(seed + 1)
    projector = dinofast.nn.PixelShuffleProjector(model.config.hidden_size, LM, S, bias=bias, num_prefix_tokens=P)
    tower = dinofast.VisionTower(model, projector.to(DEVICE), proc or processor(), keep_cls=keep_cls)
    with torch.no_grad():  # healthy scales: a wrong row or a dropped bias would show
        for p in list(projector.parameters()) + list(tower.cls_proj.parameters() if keep_cls else []):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 7)) / p.shape[-1] ** 0.5)
    return tower


def oracle(tower, inputs, proc=None, weight=None, cls_weight=None):
    """Per image: processor -> unpatched transformers model (float64, one image) -> nanoVLM's
    reshape/permute + Linear; with keep_cls the projected CLS after the image's tokens."""
    proc = proc or tower.processor
    model = dinofast.unpatch_dinov3(copy.deepcopy(tower.model)).double()
    lin = tower.projector.proj
    weight = lin.weight.double() if weight is None else weight
    bias = None if lin.bias is None else lin.bias.double()
    outs, grids = [], []
    for img in inputs:
        if isinstance(img, torch.Tensor) and img.is_floating_point():
            pixels = img
            Hp, Wp = img.shape[1] // 16, img.shape[2] // 16
        else:
            pixels, grid = proc(img)
            Hp, Wp = grid.Hp, grid.Wp
        with torch.no_grad():
            seq = model(pixels[None].to(DEVICE, torch.float64)).last_hidden_state  # [1, P + Hp*Wp, D]
        D = seq.shape[-1]
        x = seq[:, P:].reshape(1, Hp, Wp, D)  # nanoVLM: view as the (Hp, Wp) grid, then 2D pixel shuffle
        x = x.reshape(1, Hp // S, S, Wp // S, S, D).permute(0, 1, 3, 2, 4, 5).reshape(1, -1, D * S * S)
        y = F.linear(x, weight, bias)[0]
        if tower.keep_cls:
            cw = tower.cls_proj.weight.double() if cls_weight is None else cls_weight
            cb = None if tower.cls_proj.bias is None else tower.cls_proj.bias.double()
            y = torch.cat([y, F.linear(seq[:, 0], cw, cb)])
        outs.append(y)
        grids.append((Hp, Wp, Hp // S, Wp // S))
    return outs, grids


def check_against_oracle(tokens, want, grids, keep_cls):
    assert [tuple(g) for g in tokens.grids] == grids
    counts = [g[2] * g[3] + int(keep_cls) for g in grids]
    assert tokens.num_tokens == counts
    assert tokens.cu_seqlens.dtype == torch.int32 and tokens.cu_seqlens.tolist() == np.cumsum([0] + counts).tolist()
    assert tokens.embeds.shape == (sum(counts), LM)
    assert max_diff(tokens.embeds, torch.cat(want)) <= MODEL_ATOL
    assert torch.cat(want).abs().max() > 0.5  # outputs of order 1: the bound means something
    for got, w in zip(tokens.split(), want):
        assert got.shape == w.shape


# ---------------------------------------------------------------------------------------------
# parity with the per-image reference path
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_cls", [False, True], ids=["patches", "keep_cls"])
@pytest.mark.parametrize("patched", [False, True], ids=["plain", "patched"])
def test_mixed_images_equal_per_image_reference(keep_cls, patched):
    tower = make_tower(keep_cls=keep_cls, bias=keep_cls)
    if patched:
        dinofast.patch_dinov3(tower.model)
    inputs = mixed_inputs()
    with torch.no_grad():
        tokens = tower(inputs)
    want, grids = oracle(tower, inputs)
    assert grids[4] == (40, 60, 10, 15) and grids[3] == (4, 4, 1, 1)  # 640x960: 150 tokens; one cell
    assert [g[2] * g[3] for g in grids] == [25, 24, 12, 1, 150, 6]
    check_against_oracle(tokens, want, grids, keep_cls)


def test_packed_input_equals_list():
    tower = make_tower(layers=1)
    pixels = [tower.processor(img)[0] for img in mixed_inputs()[:4]]
    with torch.no_grad():
        from_list = tower(pixels)
        from_packed = tower(dinofast.pack(pixels, num_prefix_tokens=P))
    assert torch.equal(from_packed.embeds, from_list.embeds)
    assert torch.equal(from_packed.cu_seqlens, from_list.cu_seqlens) and from_packed.grids == from_list.grids


def test_every_backend(backend_name):
    """The whole tower through each backend (triton in the interpreter: a tiny model, small images)."""
    tower = make_tower(keep_cls=True, layers=1, hidden=64)
    inputs = float_images([(64, 64), (128, 64), (64, 192)], seed=9)
    with torch.no_grad():
        tokens = tower(inputs)
    want, grids = oracle(tower, inputs)
    check_against_oracle(tokens, want, grids, True)


# ---------------------------------------------------------------------------------------------
# training: frozen tower, trainable projector
# ---------------------------------------------------------------------------------------------
def _leaves(t):
    """Every leaf tensor autograd would accumulate a gradient into from t."""
    seen, todo, leaves = set(), [t.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.append(fn.variable)
        todo.extend(f for f, _ in fn.next_functions)
    return leaves


@pytest.mark.parametrize("keep_cls", [False, True], ids=["patches", "keep_cls"])
def test_frozen_tower_projector_gradients(monkeypatch, keep_cls):
    tower = make_tower(keep_cls=keep_cls)
    tower.model.requires_grad_(False)
    calls = []
    real = psp_module._psp_backward_op

    def spy(*args):
        calls.append(args[10:13])  # need_x, need_weight, need_bias
        return real(*args)
    monkeypatch.setattr(psp_module, "_psp_backward_op", spy)

    inputs = mixed_inputs()
    tokens = tower(inputs)
    trainable = {id(p) for p in tower.parameters() if p.requires_grad}
    assert trainable and {id(v) for v in _leaves(tokens.embeds)} == trainable  # nothing of the tower in the graph
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(tokens.embeds.shape, generator=g).to(DEVICE)
    (tokens.embeds * grad_out).sum().backward()
    assert calls == [(False, True, False)]  # projection backward: dW only, no dx
    assert all(p.grad is None for p in tower.model.parameters())

    weight = tower.projector.proj.weight.detach().double().requires_grad_()
    cls_weight = tower.cls_proj.weight.detach().double().requires_grad_() if keep_cls else None
    want, _ = oracle(tower, inputs, weight=weight, cls_weight=cls_weight)
    (torch.cat(want) * grad_out.double()).sum().backward()
    scale = weight.grad.abs().max().item()
    assert scale > 1.0
    assert max_diff(tower.projector.proj.weight.grad, weight.grad) <= MODEL_ATOL * scale
    if keep_cls:
        assert max_diff(tower.cls_proj.weight.grad, cls_weight.grad) <= MODEL_ATOL * cls_weight.grad.abs().max().item()


def test_trainable_tower_gets_gradients():
    """A tower that is not frozen is differentiated through (the packed encoder's own gradients
    are tested in test_dinov3.py): every tower parameter but mask_token gets a gradient."""
    tower = make_tower(layers=1)
    tokens = tower(float_images([(64, 128), (64, 64)], seed=2))
    tokens.embeds.square().sum().backward()
    missing = [n for n, p in tower.model.named_parameters() if p.grad is None]
    assert missing == ["embeddings.mask_token"]
    assert all(p.grad.abs().sum() > 0 for n, p in tower.model.named_parameters()
               if p.grad is not None and "bias" not in n)


def test_bf16_autocast():
    """Under autocast the projection runs in bf16 (like nn.Linear); gradients reach the fp32
    projector. Bound: bf16 keeps 8 significant bits (each rounding within 2^-9 relative); the
    activations are rounded a few times per layer, so 2 layers and the projection stay within 2^-6
    of the largest output (measured: 2^-7.5)."""
    tower = make_tower(keep_cls=True, layers=2)
    tower.model.requires_grad_(False)
    inputs = mixed_inputs()[:4]
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        tokens = tower(inputs)
    assert tokens.embeds.dtype == torch.bfloat16
    want = torch.cat(oracle(tower, inputs)[0])
    err = max_diff(tokens.embeds, want)
    assert err <= 2.0**-6 * want.abs().max().item()
    assert err > MODEL_ATOL  # bf16 really ran
    tokens.embeds.float().sum().backward()
    assert tower.projector.proj.weight.grad.dtype == torch.float32
    assert tower.projector.proj.weight.grad.abs().sum() > 0 and tower.cls_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# token budget, placeholders, splicing into a language model
# ---------------------------------------------------------------------------------------------
def test_token_budget():
    proc = processor(max_image_tokens=24)
    tower = make_tower(proc=proc, layers=1)
    inputs = [u8(640, 960, 5), pil(300, 300, 1)]
    with torch.no_grad():
        tokens = tower(inputs)
    assert tokens.grids == [proc.grid_for_size(640, 960), proc.grid_for_size(300, 300)]
    assert all(g.num_tokens <= 24 for g in tokens.grids) and tokens.grids[0].num_tokens >= 18
    want, grids = oracle(tower, inputs)
    check_against_oracle(tokens, want, grids, False)
    big = float_images([(320, 384)])[0]  # 5 x 6 = 30 tokens > 24
    with pytest.raises(ValueError, match=r"images\[0\]: expected at most max_image_tokens = 24 image tokens.*"
                                         r"got Gh\*Gw = 5\*6 = 30"):
        tower([big])


def test_token_strings():
    tower = make_tower(keep_cls=True, layers=1)
    with torch.no_grad():
        tokens = tower([u8(640, 960, 5), pil(30, 40, 4)])
    assert tokens.token_strings("<image>") == ["<image>" * 151, "<image>" * 2]


def test_splice_into_language_model():
    """The README's tiny VLM forward: visual embeds written at the placeholder positions of the
    LM's input embeddings (token ids only, no tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=LM, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4)).to(DEVICE).eval()
    tower = make_tower(layers=1)
    image_id, bos = 99, 1
    tokens = tower([pil(300, 300, 1), u8(100, 400, 3)])
    ids = [bos]
    for n in tokens.num_tokens:
        ids += [5, 6] + [image_id] * n
    ids += [7, 8]
    input_ids = torch.tensor([ids], device=DEVICE)
    embeds = lm.get_input_embeddings()(input_ids)
    mask = (input_ids == image_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, tokens.embeds.to(embeds.dtype))
    logits = lm(inputs_embeds=embeds).logits
    assert logits.shape == (1, len(ids), 100)
    assert torch.equal(embeds[0, input_ids[0] == image_id], tokens.embeds)
    logits.sum().backward()
    assert tower.projector.proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# pre-patchified packed input
# ---------------------------------------------------------------------------------------------
def patchify(img, layout, m, p=16):
    """[C, H, W] -> [h*w, C*p*p], written from the convention: rows row-major (m = 1) or in m x m
    blocks (Qwen2-VL), columns (c, i, j) for "chw" or (i, j, c) for "hwc"."""
    C, H, W = img.shape
    h, w = H // p, W // p
    x = img.reshape(C, h // m, m, p, w // m, m, p)  # c, by, dy, i, bx, dx, j
    x = x.permute(1, 4, 2, 5, 0, 3, 6) if layout == "chw" else x.permute(1, 4, 2, 5, 3, 6, 0)
    return x.reshape(h * w, C * p * p)


def block_order(patches_hw, m):
    """[h, w, D] features in the row order of m x m blocks: [h*w, D]."""
    h, w, D = patches_hw.shape
    return patches_hw.reshape(h // m, m, w // m, m, D).permute(0, 2, 1, 3, 4).reshape(h * w, D)


@pytest.mark.parametrize("keep_prefix", [False, True], ids=["patches", "prefix"])
@pytest.mark.parametrize("layout,m", [("chw", 1), ("hwc", 1), ("chw", 2), ("hwc", 2)])
def test_encode_patches_equals_image_path(layout, m, keep_prefix):
    model = random_model(layers=2)
    imgs = float_images([(64, 96), (32, 32), (96, 32), (128, 64)], seed=11)
    with torch.no_grad():
        feats = dinofast.encode_packed(model, imgs)
        got = dinofast.encode_patches(model, torch.cat([patchify(i, layout, m) for i in imgs]),
                                      torch.tensor([[1, i.shape[1] // 16, i.shape[2] // 16] for i in imgs]),
                                      patch_layout=layout, merge_size=m, keep_prefix=keep_prefix)
    want = []
    for f in feats:
        if keep_prefix:
            want += [f.cls[None], f.registers]
        want.append(block_order(f.patches, m))
    want = torch.cat(want)
    assert got.num_prefix_tokens == (P if keep_prefix else 0)
    counts = [(P if keep_prefix else 0) + (i.shape[1] // 16) * (i.shape[2] // 16) for i in imgs]
    assert got.cu_seqlens.tolist() == np.cumsum([0] + counts).tolist()
    assert max_diff(got.features, want) <= MODEL_ATOL


def test_encode_patches_reads_qwen2vl_processor_output():
    """The flattening of transformers' own Qwen2-VL image processor (patch 16, merge_size 2,
    temporal_patch_size 1, no resize/rescale/normalise: the pixels go through unchanged)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as Qwen,
        )
    except ImportError as err:
        pytest.skip(reason=f"transformers' Qwen2-VL PIL image processor is not importable: {err}")
    qwen = Qwen(patch_size=16, merge_size=2, temporal_patch_size=1, do_resize=False, do_rescale=False,
                do_normalize=False)
    imgs = [t.cpu() for t in float_images([(64, 96), (32, 32), (128, 64)], seed=12)]
    batch = qwen(images=imgs, return_tensors="pt")
    patches, grid_thw = batch["pixel_values"], batch["image_grid_thw"]
    assert patches.shape == (4 * 6 + 2 * 2 + 8 * 4, 768) and grid_thw.tolist() == [[1, 4, 6], [1, 2, 2], [1, 8, 4]]
    model = random_model(layers=1)
    with torch.no_grad():
        got = dinofast.encode_patches(model, patches.to(DEVICE, torch.float32), grid_thw, merge_size=2)
        feats = dinofast.encode_packed(model, [t.to(DEVICE) for t in imgs])
    assert max_diff(got.features, torch.cat([block_order(f.patches, 2) for f in feats])) <= MODEL_ATOL


@pytest.mark.parametrize("m", [1, 4])
def test_tower_forward_patches_equals_images(m):
    tower = make_tower(keep_cls=True, layers=1)
    imgs = float_images([(64, 128), (256, 64), (64, 64)], seed=13)
    with torch.no_grad():
        want = tower(imgs)
        got = tower.forward_patches(torch.cat([patchify(i, "hwc", m) for i in imgs]),
                                    [(1, i.shape[1] // 16, i.shape[2] // 16) for i in imgs],
                                    patch_layout="hwc", merge_size=m)
    assert got.grids == want.grids and torch.equal(got.cu_seqlens, want.cu_seqlens)
    assert max_diff(got.embeds, want.embeds) <= MODEL_ATOL


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_construction():
    model = random_model(layers=1)
    with pytest.raises(ValueError, match=r"projector: expected in-features D\*s\*s = 128\*4\*4 = 2048 .*"
                                         r"got in-features 1536"):
        dinofast.VisionTower(model, dinofast.nn.PixelShuffleProjector(96, LM, S))
    good = dinofast.nn.PixelShuffleProjector(128, LM, S)
    with pytest.raises(ValueError, match=r"processor: expected patch_size 16 \(the model's patch size\), "
                                         r"got patch_size 14"):
        dinofast.VisionTower(model, good, dinofast.ImageProcessor(patch_size=14, max_side=960, factor=S))
    with pytest.raises(ValueError, match=r"processor: expected factor 4 \(the projector's pixel-shuffle factor\), "
                                         r"got factor 2"):
        dinofast.VisionTower(model, good, dinofast.ImageProcessor(patch_size=16, max_side=960, factor=2))
    with pytest.raises(ValueError, match=r"projector: expected a dinofast.nn.PixelShuffleProjector.*got Linear"):
        dinofast.VisionTower(model, torch.nn.Linear(2048, LM))
    with pytest.raises(ValueError, match=r"projector.num_prefix_tokens: expected 0 or the model's CLS \+ "
                                         r"registers = 5, "
                                         r"got 3"):
        dinofast.VisionTower(model, dinofast.nn.PixelShuffleProjector(128, LM, S, num_prefix_tokens=3))
    with pytest.raises(ValueError, match=r"model: expected a transformers DINOv3ViTModel"):
        dinofast.VisionTower(torch.nn.Linear(2, 2), good)


@pytest.mark.parametrize("case, match", [
    ("empty", r"images: expected a non-empty list of images, got an empty list"),
    ("not_list", r"images: expected a list of PIL images / uint8 or float tensors, or a dinofast.Packed, got Tensor"),
    ("side", r"images\[1\]: expected H and W positive multiples of patch_size \* factor = 16\*4 = 64, got size 96x64"),
    ("raw_without_processor", r"images\[0\]: expected a float pixel tensor \[3, H, W\] \(PIL images and uint8"),
    ("channels", r"images\[0\]: expected \[3, H, W\] \(channels first\), got shape \(1, 64, 64\)"),
    ("packed_prefix", r"images.num_prefix_tokens: expected the model's CLS \+ registers = 5, got 1"),
])
def test_bad_images(case, match):
    tower = make_tower(layers=1)
    good = float_images([(64, 64)])[0]
    if case == "raw_without_processor":
        tower.processor = None
    bad = {"empty": [], "not_list": good, "side": [good, torch.randn(3, 96, 64)],
           "raw_without_processor": [pil(64, 64, 0)],
           "channels": [torch.randn(1, 64, 64)], "packed_prefix": dinofast.pack([good], num_prefix_tokens=1)}[case]
    with pytest.raises(ValueError, match=match):
        tower(bad)


@pytest.mark.parametrize("case, match", [
    ("rows", r"patches: expected sum over grid_thw of t\*h\*w = 24 rows, got 20"),
    ("columns", r"patches: expected C\*p\*p = 3\*16\*16 = 768 columns .*got 588"),
    ("video", r"grid_thw: expected t = 1 for image 1 \(images, not videos\), got t = 2"),
    ("merge", r"grid_thw: expected h and w of image 0 multiples of merge_size = 2, got \(h, w\) = \(3, 4\)"),
    ("empty", r"grid_thw: expected at least one image \(t, h, w\), got none"),
    ("float_grid", r"grid_thw: expected an int tensor \[n, 3\]"),
    ("layout", r"patch_layout: expected one of \('chw', 'hwc'\), got 'cwh'"),
])
def test_bad_patches(case, match):
    model = random_model(layers=1)
    patches, grid = torch.randn(24, 768, device=DEVICE), [(1, 4, 6)]
    kw = {}
    if case == "rows":
        patches = patches[:20]
    elif case == "columns":
        patches = torch.randn(24, 588, device=DEVICE)
    elif case == "video":
        grid = [(1, 2, 6), (2, 2, 3)]
    elif case == "merge":
        grid, kw = [(1, 3, 4), (1, 2, 6)], {"merge_size": 2}
    elif case == "empty":
        grid = []
    elif case == "float_grid":
        grid = torch.tensor([[1.0, 4.0, 6.0]])
    elif case == "layout":
        kw = {"patch_layout": "cwh"}
    with pytest.raises(ValueError, match=match):
        dinofast.encode_patches(model, patches, grid, **kw)


def test_forward_patches_grid_not_divisible_by_factor():
    tower = make_tower(layers=1)
    with pytest.raises(ValueError, match=r"grid_thw: expected h and w of image 0 multiples of the projector's "
                                         r"factor 4, "
                                         r"got \(h, w\) = \(4, 6\)"):
        tower.forward_patches(torch.randn(24, 768, device=DEVICE), [(1, 4, 6)])


def test_tower_compiles_fullgraph():
    """torch.compile(fullgraph=True) of the tensor path (processed float images): no graph break,
    the same embeddings as eager."""
    tower = make_tower(layers=1)
    images = float_images([(128, 192), (64, 64), (192, 64)], seed=9)
    want = tower(images).embeds
    got = torch.compile(lambda xs: tower(xs).embeds, fullgraph=True)(images)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= MODEL_ATOL
