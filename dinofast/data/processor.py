"""Image -> normalised pixels sized for a patch-16 ViT (and, with `factor`, a pixel-shuffle projector).

The size rule, in one place (`ImageProcessor.grid_for_size`):
- cell = patch_size * factor pixels; output sides are whole cells, so Hp = Gh * factor patches.
- scale = max_side / longest side when the image is larger than max_side (or always, with
  allow_upscale); 1 otherwise.
- cells per side = round(side * scale / cell), at least 1 (images smaller than one cell grow to one
  cell), at most floor(max_side / cell).
- with max_image_tokens, an image whose Gh * Gw would exceed the budget is shrunk to the largest
  size (same rounding rule, smaller scale) whose Gh * Gw fits.

Pixels are resized once, by Pillow's bicubic filter (antialiased when shrinking: its support grows
with the reduction), in 8-bit, then normalised in float32 by torch. A uint8 tensor input goes
through the same Pillow path, so a tensor and the PIL image with the same content give the same
pixels, bit for bit, on every run.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from dinofast._validate import fail

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# EXIF orientation values 5..8 are a transpose or a 90/270 degree rotation: width and height swap.
_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)


class Grid(NamedTuple):
    """Patch grid of one image: Hp x Wp patches before pixel shuffle, Gh x Gw tokens after
    (Gh = Hp / factor, Gw = Wp / factor; equal to Hp, Wp when factor is 1)."""

    Hp: int
    Wp: int
    Gh: int
    Gw: int

    @property
    def num_patches(self) -> int:
        """Hp * Wp: patch tokens the vision encoder sees (without CLS/register tokens)."""
        return self.Hp * self.Wp

    @property
    def num_tokens(self) -> int:
        """Gh * Gw: image tokens after pixel shuffle, i.e. placeholders in the text."""
        return self.Gh * self.Gw


def _check_pos_int(x, arg: str) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x <= 0:
        fail(arg, "a positive int", x)
    return int(x)


def _check_triple(v, arg: str, positive: bool) -> Tuple[float, float, float]:
    try:
        vals = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        fail(arg, "three floats (one per RGB channel)", v)
    if len(vals) != 3 or not all(math.isfinite(x) for x in vals) or (positive and min(vals) <= 0):
        fail(arg, "three finite floats" + (" > 0" if positive else ""), v)
    return vals


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding: 2.5 -> 2 but 3.5 -> 4. Half-up keeps the cell count
    # monotone in the scale, which the token-budget search relies on.
    return int(math.floor(x + 0.5))


class ImageProcessor:
    """Resize and normalise images for a DINOv3 ViT.

    Args:
        patch_size: ViT patch size in pixels (16 for DINOv3).
        max_side: the longest output side is at most this many pixels.
        factor: pixel-shuffle factor s; output sides are multiples of patch_size * s so the
            patch grid (Hp, Wp) divides into (Gh, Gw) = (Hp / s, Wp / s).
        allow_upscale: scale images smaller than max_side up so their longest side reaches it.
        mean, std: per-channel normalisation of [0, 1] pixels.
        max_image_tokens: optional budget on Gh * Gw; larger images are shrunk to fit.

    Calling it on a PIL image or a uint8 tensor ([H, W] or [C, H, W] with C in 1, 3, 4) returns
    `(pixels, grid)`: pixels float32 [3, Hp * patch_size, Wp * patch_size], grid a `Grid`.
    """

    def __init__(
        self,
        patch_size: int = 16,
        max_side: int = 768,
        factor: int = 1,
        allow_upscale: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        max_image_tokens: Optional[int] = None,
    ):
        self.patch_size = _check_pos_int(patch_size, "patch_size")
        self.factor = _check_pos_int(factor, "factor")
        self.max_side = _check_pos_int(max_side, "max_side")
        if self.max_side < self.cell:
            fail("max_side", f">= patch_size * factor = {self.cell}", max_side)
        if not isinstance(allow_upscale, bool):
            fail("allow_upscale", "a bool", allow_upscale)
        self.allow_upscale = allow_upscale
        self.mean = _check_triple(mean, "mean", positive=False)
        self.std = _check_triple(std, "std", positive=True)
        if max_image_tokens is not None:
            _check_pos_int(max_image_tokens, "max_image_tokens")
        self.max_image_tokens = max_image_tokens
        # Normalisation as one multiply-add on [0, 255] values: (v / 255 - mean) / std.
        std_t = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1) / std_t

    @property
    def cell(self) -> int:
        """Pixels per output token side: patch_size * factor."""
        return self.patch_size * self.factor

    def __repr__(self) -> str:
        return (
            f"ImageProcessor(patch_size={self.patch_size}, max_side={self.max_side}, factor={self.factor}, "
            f"allow_upscale={self.allow_upscale}, mean={self.mean}, std={self.std}, "
            f"max_image_tokens={self.max_image_tokens})"
        )

    # ---- size rule -----------------------------------------------------------------------------

    def _cells(self, height: int, width: int, scale: float) -> Tuple[int, int]:
        most = self.max_side // self.cell
        gh = min(most, max(1, _round_half_up(height * scale / self.cell)))
        gw = min(most, max(1, _round_half_up(width * scale / self.cell)))
        return gh, gw

    def grid_for_size(self, height: int, width: int) -> Grid:
        """The Grid an image of `height` x `width` pixels (after EXIF orientation) is resized to.
        Cheap: reads no pixels, so token counts can be planned from image headers."""
        height, width = _check_pos_int(height, "height"), _check_pos_int(width, "width")
        longest = max(height, width)
        scale = self.max_side / longest if (self.allow_upscale or longest > self.max_side) else 1.0
        gh, gw = self._cells(height, width, scale)
        budget = self.max_image_tokens
        if budget is not None and gh * gw > budget:
            # Cell counts are non-decreasing step functions of the scale, jumping where
            # side * s / cell crosses k + 0.5. Every reachable (gh, gw) is the value at one of those
            # jumps, so the largest one within budget is found among them.
            candidates = {(1, 1)}
            for side in (height, width):
                for k in range(int(side * scale / self.cell) + 1):
                    s = (k + 0.5) * self.cell / side
                    if s <= scale:
                        candidates.add(self._cells(height, width, s))
            fitting = [c for c in candidates if c[0] * c[1] <= budget]
            gh, gw = max(fitting, key=lambda c: (c[0] * c[1], c))
        return Grid(gh * self.factor, gw * self.factor, gh, gw)

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """(H, W) in pixels of the output for an input of `height` x `width`."""
        g = self.grid_for_size(height, width)
        return g.Hp * self.patch_size, g.Wp * self.patch_size

    # ---- pixels --------------------------------------------------------------------------------

    def __call__(self, image: Union[Image.Image, torch.Tensor]) -> Tuple[torch.Tensor, Grid]:
        rgb = to_rgb(image)
        grid = self.grid_for_size(rgb.height, rgb.width)
        size = (grid.Wp * self.patch_size, grid.Hp * self.patch_size)  # PIL sizes are (W, H)
        if rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.BICUBIC)
        hwc = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True))
        pixels = hwc.permute(2, 0, 1).to(torch.float32).mul_(self._scale).add_(self._shift)
        return pixels.contiguous(), grid


def image_size(path) -> Tuple[int, int]:
    """(height, width) of an image file as the processor will see it (EXIF orientation applied),
    read from the header without decoding the pixels."""
    with Image.open(path) as im:
        width, height = im.size
        try:
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # a malformed EXIF block: the pixels decide later, keep the raw size
            orientation = 1
    if orientation in _SWAPS_SIDES:
        width, height = height, width
    return height, width


def _tensor_to_pil(t: torch.Tensor) -> Image.Image:
    if t.dtype != torch.uint8:
        fail("image", "a uint8 tensor (or a PIL image)", f"dtype {t.dtype}")
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 2:
        if min(t.shape) == 0:
            fail("image", "a non-empty image", f"shape {tuple(t.shape)}")
        return Image.fromarray(t.contiguous().cpu().numpy(), mode="L")
    if t.dim() != 3 or t.shape[0] not in (3, 4) or min(t.shape) == 0:
        fail("image", "a uint8 tensor [H, W] or [C, H, W] with C in (1, 3, 4)", f"shape {tuple(t.shape)}")
    hwc = t.permute(1, 2, 0).contiguous().cpu().numpy()
    return Image.fromarray(hwc, mode="RGB" if t.shape[0] == 3 else "RGBA")


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)


def to_rgb(image: Union[Image.Image, torch.Tensor]) -> Image.Image:
    """An 8-bit RGB PIL image with EXIF orientation applied.

    Grayscale, palette, CMYK, YCbCr, 16-bit and float modes are converted; transparent pixels
    (RGBA, LA, palette with transparency) are composited over white, so what was invisible in the
    source never leaks into the features.
    """
    if isinstance(image, torch.Tensor):
        im = _tensor_to_pil(image)
    elif isinstance(image, Image.Image):
        im = ImageOps.exif_transpose(image)  # a copy; the caller's image is untouched
        if min(im.size) == 0:
            fail("image", "a non-empty image", f"size {im.size}")
    else:
        fail("image", "a PIL.Image.Image or a uint8 torch.Tensor", type(image).__name__)
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # 16-bit and 32-bit grayscale: Pillow's convert("L") clips at 255, which would turn a
        # 16-bit photo white. Map the 16-bit range (or 0..255 when the values stay within it).
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if (im.mode.startswith("I;16") or a.max(initial=0) > 255) else 255.0
        a = np.clip(np.floor(a * (255.0 / top) + 0.5), 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def image_token_string(grid: Grid, image_token: str) -> str:
    """The placeholder text for one image: `image_token` repeated Gh * Gw times (the number of
    tokens the projector emits for that image), nothing else."""
    if not isinstance(grid, Grid):
        fail("grid", "a dinofast.Grid (from ImageProcessor)", type(grid).__name__)
    if not isinstance(image_token, str) or not image_token:
        fail("image_token", "a non-empty str", repr(image_token))
    return image_token * grid.num_tokens
