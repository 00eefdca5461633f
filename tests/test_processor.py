"""ImageProcessor: the design-notes vector, size-rule properties (aspect, limits, token budget),
pixel values (normalisation, bicubic antialias, determinism), EXIF orientation and odd modes."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from PIL import Image

import dinofast
from dinofast.data import IMAGENET_MEAN, IMAGENET_STD, image_size, to_rgb

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def random_image(h, w, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "LA": 2}.get(mode, 1)
    a = rng.integers(0, 256, size=(h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)
    return Image.fromarray(a, mode=mode)


def to_uint8_levels(pixels):
    """Normalised pixels back to the [0, 255] scale."""
    return (pixels * STD + MEAN) * 255.0


# ---- the design-notes vector --------------------------------------------------------------------

def test_design_notes_vector():
    proc = dinofast.ImageProcessor(patch_size=16, max_side=960, factor=4)
    pixels, grid = proc(random_image(640, 960))
    assert grid == dinofast.Grid(Hp=40, Wp=60, Gh=10, Gw=15)
    assert grid.num_tokens == 150 and grid.num_patches == 2400
    assert pixels.shape == (3, 640, 960) and pixels.dtype == torch.float32
    text = dinofast.image_token_string(grid, "<image>")
    assert text.count("<image>") == 150 and text == "<image>" * 150
    # portrait: the same image turned
    assert proc.grid_for_size(960, 640) == dinofast.Grid(60, 40, 15, 10)


def test_downscale_vector():
    # 1500 x 1000 with max_side 768, patch 16: scale 768/1500, 512 px -> 32 patches, 768 -> 48.
    proc = dinofast.ImageProcessor(max_side=768)
    assert proc.grid_for_size(1000, 1500) == dinofast.Grid(32, 48, 32, 48)
    assert proc.output_size(1000, 1500) == (512, 768)


# ---- the size rule as properties ---------------------------------------------------------------

def scale_interval(g, side, cell, most):
    """Scales s for which `side` pixels give g cells under round-half-up with clamps [1, most]."""
    lo = (g - 0.5) * cell / side if g > 1 else 0.0
    hi = (g + 0.5) * cell / side if g < most else math.inf
    return lo, hi


def reachable_grids(h, w, cell, most, top_scale):
    """Every (gh, gw) some scale in (0, top_scale] produces: intersect the per-side intervals."""
    out = []
    for gh in range(1, most + 1):
        lo_h, hi_h = scale_interval(gh, h, cell, most)
        for gw in range(1, most + 1):
            lo_w, hi_w = scale_interval(gw, w, cell, most)
            lo, hi = max(lo_h, lo_w), min(hi_h, hi_w)
            if lo < hi and lo <= top_scale:
                out.append((gh, gw))
    return out


size_rule_args = dict(
    h=st.integers(1, 4000),
    w=st.integers(1, 4000),
    patch=st.sampled_from([8, 14, 16]),
    factor=st.sampled_from([1, 2, 4]),
    max_side=st.integers(64, 1200),
    upscale=st.booleans(),
)


@given(**size_rule_args)
def test_size_rule_properties(h, w, patch, factor, max_side, upscale):
    cell = patch * factor
    if max_side < cell:
        with pytest.raises(ValueError, match="max_side"):
            dinofast.ImageProcessor(patch_size=patch, max_side=max_side, factor=factor)
        return
    proc = dinofast.ImageProcessor(patch_size=patch, max_side=max_side, factor=factor, allow_upscale=upscale)
    g = proc.grid_for_size(h, w)
    H, W = proc.output_size(h, w)
    assert (g.Hp, g.Wp) == (g.Gh * factor, g.Gw * factor)
    assert H % cell == 0 and W % cell == 0 and H >= cell and W >= cell
    assert max(H, W) <= max_side
    # aspect kept within one cell of rounding: the scale the rule promises lies in both sides'
    # rounding intervals
    most = max_side // cell
    expected_scale = max_side / max(h, w) if (upscale or max(h, w) > max_side) else 1.0
    lo_h, hi_h = scale_interval(g.Gh, h, cell, most)
    lo_w, hi_w = scale_interval(g.Gw, w, cell, most)
    assert lo_h <= expected_scale <= hi_h and lo_w <= expected_scale <= hi_w, (g, expected_scale)


@given(**size_rule_args, budget=st.integers(1, 400))
def test_token_budget_is_the_largest_fitting_size(h, w, patch, factor, max_side, upscale, budget):
    cell = patch * factor
    if max_side < cell:
        return
    free = dinofast.ImageProcessor(patch_size=patch, max_side=max_side, factor=factor, allow_upscale=upscale)
    capped = dinofast.ImageProcessor(
        patch_size=patch, max_side=max_side, factor=factor, allow_upscale=upscale, max_image_tokens=budget)
    g0, g = free.grid_for_size(h, w), capped.grid_for_size(h, w)
    if g0.num_tokens <= budget:
        assert g == g0
        return
    assert g.num_tokens <= budget
    most = max_side // cell
    top = max_side / max(h, w) if (upscale or max(h, w) > max_side) else 1.0
    best = max(a * b for a, b in reachable_grids(h, w, cell, most, top) if a * b <= budget)
    assert g.num_tokens == best
    assert (g.Gh, g.Gw) in reachable_grids(h, w, cell, most, top)
    assert g.Gh <= g0.Gh and g.Gw <= g0.Gw


def test_token_budget_vector():
    proc = dinofast.ImageProcessor(patch_size=16, max_side=960, factor=4, max_image_tokens=100)
    g = proc.grid_for_size(640, 960)
    # 8 x 12 = 96 keeps 2:3 exactly; nothing larger with this aspect fits in 100
    assert (g.Gh, g.Gw) == (8, 12) and g.num_tokens == 96
    pixels, g2 = proc(random_image(640, 960))
    assert g2 == g and pixels.shape == (3, 512, 768)


@pytest.mark.parametrize("h,w", [(1, 1), (3, 5), (15, 15), (40, 2)])
def test_tiny_images_grow_to_one_cell(h, w):
    proc = dinofast.ImageProcessor(patch_size=16, factor=4)
    pixels, g = proc(random_image(h, w))
    assert g == dinofast.Grid(4, 4, 1, 1)
    assert pixels.shape == (3, 64, 64)


# ---- pixels --------------------------------------------------------------------------------------

def test_normalisation_of_a_constant_colour():
    colour = (200, 17, 90)
    im = Image.new("RGB", (333, 211), colour)
    pixels, g = dinofast.ImageProcessor(max_side=256)(im)
    expected = (torch.tensor(colour, dtype=torch.float64).view(3, 1, 1) / 255 - MEAN.double()) / STD.double()
    assert (pixels.double() - expected).abs().max() < 1e-6


def test_custom_mean_std():
    im = Image.new("RGB", (32, 32), (255, 0, 51))
    pixels, _ = dinofast.ImageProcessor(mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.1))(im)
    assert torch.allclose(pixels[:, 0, 0], torch.tensor([1.0, -2.0, (0.2 - 0.5) / 0.1]), atol=1e-6)


def test_bicubic_antialias_matches_torch_within_one_level():
    """An independent bicubic-with-antialias (torch's, designed to match PIL's) agrees to about one
    8-bit level; the processor rounds to 8 bits once, torch does not round at all."""
    im = random_image(300, 500, seed=3)
    # smooth the noise a little so the comparison is not dominated by the 8-bit rounding of
    # extreme overshoots
    im = im.resize((250, 150), Image.Resampling.BILINEAR).resize((500, 300), Image.Resampling.BILINEAR)
    proc = dinofast.ImageProcessor(max_side=160)
    pixels, g = proc(im)
    src = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].double()
    ref = F.interpolate(src, size=(g.Hp * 16, g.Wp * 16), mode="bicubic", antialias=True, align_corners=False)
    ref = ref.clamp(0, 255)[0]
    err = (to_uint8_levels(pixels.double()) - ref).abs()
    assert err.max() <= 1.5, err.max()
    assert err.mean() < 0.5, err.mean()


def test_downscale_is_antialiased():
    # a 1-pixel checkerboard shrunk 8x: an antialiased filter averages it to mid grey; point
    # sampling or a non-widened bicubic would keep values near 0 or 255
    board = ((np.indices((512, 512)).sum(0) % 2) * 255).astype(np.uint8)
    pixels, g = dinofast.ImageProcessor(max_side=64)(Image.fromarray(board, mode="L"))
    assert g.Hp == 4 and g.Wp == 4
    levels = to_uint8_levels(pixels)
    assert (levels - 127.5).abs().max() < 3.0


def test_deterministic_and_tensor_equals_pil():
    im = random_image(123, 457, seed=7)
    proc = dinofast.ImageProcessor(max_side=224, factor=2)
    a, ga = proc(im)
    b, gb = proc(im)
    t = torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()
    c, gc = proc(t)
    assert ga == gb == gc
    assert torch.equal(a, b) and torch.equal(a, c)


def test_no_resize_when_already_on_the_grid():
    im = random_image(64, 96, seed=1)
    pixels, g = dinofast.ImageProcessor()(im)
    assert (g.Hp, g.Wp) == (4, 6)
    levels = to_uint8_levels(pixels.double())
    assert (levels - torch.from_numpy(np.array(im)).permute(2, 0, 1).double()).abs().max() < 1e-3


# ---- EXIF and modes ------------------------------------------------------------------------------

@pytest.mark.parametrize("orientation,turn", [
    (1, None),
    (3, Image.Transpose.ROTATE_180),
    (6, Image.Transpose.ROTATE_270),
    (8, Image.Transpose.ROTATE_90),
])
def test_exif_orientation(tmp_path, orientation, turn):
    raw = random_image(48, 80, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "oriented.png"
    raw.save(path, exif=exif.tobytes())
    upright = raw if turn is None else raw.transpose(turn)
    proc = dinofast.ImageProcessor(max_side=64)
    with Image.open(path) as im:
        got, g = proc(im)
    want, gw = proc(upright)
    assert g == gw and torch.equal(got, want)
    assert image_size(path) == (upright.height, upright.width)


@given(
    mode=st.sampled_from(["RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "YCbCr"]),
    h=st.integers(1, 300), w=st.integers(1, 300), factor=st.sampled_from([1, 2]), seed=st.integers(0, 99),
)
def test_any_mode_and_size_gives_normalised_rgb_on_the_grid(mode, h, w, factor, seed):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65536, size=(h, w), dtype=np.uint16))
    elif mode == "1":
        im = Image.fromarray(rng.integers(0, 2, size=(h, w), dtype=np.uint8) * 255, mode="L").convert("1")
    elif mode == "P":
        im = random_image(h, w, seed=seed).quantize(8)
    elif mode == "YCbCr":
        im = random_image(h, w, seed=seed).convert("YCbCr")
    else:
        im = random_image(h, w, seed=seed, mode=mode)
    proc = dinofast.ImageProcessor(max_side=128, factor=factor)
    pixels, g = proc(im)
    assert g == proc.grid_for_size(h, w)
    assert pixels.shape == (3, g.Hp * 16, g.Wp * 16) and pixels.dtype == torch.float32
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert (pixels >= lo - 1e-6).all() and (pixels <= hi + 1e-6).all()
    again, _ = proc(im)
    assert torch.equal(pixels, again)


def rgb_levels(pixels):
    return to_uint8_levels(pixels.double()).round()


def test_grayscale_gives_equal_channels():
    im = random_image(32, 48, seed=2, mode="L")
    pixels, _ = dinofast.ImageProcessor()(im)
    lv = rgb_levels(pixels)
    assert torch.equal(lv[0], lv[1]) and torch.equal(lv[1], lv[2])
    assert torch.equal(lv[0], torch.from_numpy(np.array(im)).double())


def test_tensor_grayscale_and_one_channel():
    im = random_image(32, 48, seed=2, mode="L")
    proc = dinofast.ImageProcessor()
    t = torch.from_numpy(np.array(im))
    assert torch.equal(proc(t)[0], proc(im)[0])
    assert torch.equal(proc(t[None])[0], proc(im)[0])


def test_rgba_opaque_equals_rgb_and_transparent_is_white():
    rgb = random_image(32, 32, seed=4)
    opaque = rgb.copy()
    opaque.putalpha(255)
    proc = dinofast.ImageProcessor()
    assert torch.equal(proc(opaque)[0], proc(rgb)[0])
    clear = rgb.copy()
    clear.putalpha(0)
    assert (rgb_levels(proc(clear)[0]) == 255).all()
    # half transparent: blended with white
    half = Image.new("RGBA", (32, 32), (0, 100, 200, 128))
    lv = rgb_levels(proc(half)[0])[:, 0, 0]
    expected = torch.tensor([0, 100, 200], dtype=torch.float64) * 128 / 255 + 255 * 127 / 255
    assert (lv - expected).abs().max() <= 1.0
    # an RGBA tensor takes the same path
    t = torch.from_numpy(np.array(clear)).permute(2, 0, 1).contiguous()
    assert torch.equal(proc(t)[0], proc(clear)[0])


def test_palette_with_and_without_transparency():
    rgb = random_image(32, 32, seed=5)
    pal = rgb.quantize(16)
    proc = dinofast.ImageProcessor()
    assert torch.equal(proc(pal)[0], proc(pal.convert("RGB"))[0])
    pal.info["transparency"] = 0
    lv = rgb_levels(proc(pal)[0])
    idx = torch.from_numpy(np.array(pal)) == 0
    assert idx.any() and (lv[:, idx] == 255).all()


def test_cmyk_through_a_tiff_file(tmp_path):
    cmyk = random_image(40, 40, seed=6, mode="CMYK")
    path = tmp_path / "cmyk.tiff"
    cmyk.save(path)
    proc = dinofast.ImageProcessor()
    with Image.open(path) as im:
        assert im.mode == "CMYK"
        got, _ = proc(im)
    assert torch.equal(got, proc(cmyk.convert("RGB"))[0])


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    a8 = np.random.default_rng(8).integers(0, 256, size=(32, 32), dtype=np.uint8)
    im16 = Image.fromarray(a8.astype(np.uint16) * 257)  # mode I;16
    assert im16.mode.startswith("I;16")
    proc = dinofast.ImageProcessor()
    assert torch.equal(proc(im16)[0], proc(Image.fromarray(a8, mode="L"))[0])


def test_to_rgb_leaves_the_input_alone():
    im = random_image(10, 12, mode="RGBA")
    before = im.copy()
    out = to_rgb(im)
    assert out.mode == "RGB" and im.mode == "RGBA" and np.array_equal(np.array(im), np.array(before))


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,arg", [
    (dict(patch_size=0), "patch_size"),
    (dict(patch_size=16.0), "patch_size"),
    (dict(factor=-1), "factor"),
    (dict(max_side=32, factor=4), "max_side"),
    (dict(mean=(0.5, 0.5)), "mean"),
    (dict(std=(0.2, 0.0, 0.2)), "std"),
    (dict(max_image_tokens=0), "max_image_tokens"),
    (dict(allow_upscale="yes"), "allow_upscale"),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        dinofast.ImageProcessor(**kwargs)


@pytest.mark.parametrize("image,msg", [
    (torch.rand(3, 16, 16), "uint8"),
    (torch.zeros(5, 16, 16, dtype=torch.uint8), r"\[C, H, W\]"),
    (torch.zeros(16, 16, 3, dtype=torch.uint8), r"\[C, H, W\]"),
    (torch.zeros(3, 0, 16, dtype=torch.uint8), "shape"),
    (np.zeros((16, 16, 3), dtype=np.uint8), "PIL"),
    ("image.png", "PIL"),
])
def test_bad_images(image, msg):
    with pytest.raises(ValueError, match=msg):
        dinofast.ImageProcessor()(image)


def test_bad_token_string_args():
    g = dinofast.Grid(4, 4, 2, 2)
    assert dinofast.image_token_string(g, "<im>") == "<im>" * 4
    with pytest.raises(ValueError, match="image_token"):
        dinofast.image_token_string(g, "")
    with pytest.raises(ValueError, match="grid"):
        dinofast.image_token_string((4, 4), "<im>")


def test_bad_sizes():
    with pytest.raises(ValueError, match="height"):
        dinofast.ImageProcessor().grid_for_size(0, 10)

