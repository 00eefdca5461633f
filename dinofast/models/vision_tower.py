"""A VLM's vision side end to end: images in, LM-ready visual tokens out, in one packed pass.

`VisionTower(model, projector, processor)` joins what dinofast has: the processor (aspect-kept
resize to whole cells, a token budget), ONE packed encoder forward over every image (varlen
attention with fused 2D RoPE, no padding; `models.dinov3._encode_tokens`, shared with
`encode_packed`) and ONE packed `pixel_shuffle_project` call (prefix tokens dropped by the op),
so that embeds come out packed [sum_i Gh_i*Gw_i, d_lm] with their cu_seqlens, ready to be spliced
into a language model's input embeddings at the placeholder positions.

`encode_patches(model, patches, grid_thw)` takes pre-patchified packed input, the convention of
Qwen2-VL's image processor and of LLaVA-ViT's packed vision towers:
  patches  [sum_i h_i*w_i, C*p*p] float, one row per patch, images back to back;
  grid_thw [n, 3] = (t, h, w) per image in patches (t = 1: images; h, w: the patch grid).
Within a row (`patch_layout`):
  "chw": column c*p*p + i*p + j holds pixel (row i, column j) of channel c of the patch: Qwen2-VL's
         order (its processor flattens channel, temporal, patch row, patch column; with
         temporal_patch_size=1 that is this), and the order of Conv2d's flattened weight.
  "hwc": column (i*p + j)*C + c: LLaVA-ViT's / SigLIP2-NaFlex's order (channels last).
Rows within one image (`merge_size` m):
  m = 1: row-major over the patch grid, row index y*w + x (LLaVA-ViT's order).
  m > 1: Qwen2-VL's order: m x m blocks of patches are consecutive, blocks row-major, i.e. row
         ((by*(w/m) + bx)*m + dy)*m + dx holds patch (y, x) = (by*m + dy, bx*m + dx); h and w must
         be multiples of m (Qwen2-VL: merge_size = 2).
Output rows come back in the input's row order, so a downstream merger that groups m*m
consecutive rows keeps working.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from dinofast import _validate as V
from dinofast.data.processor import Grid, ImageProcessor, image_token_string
from dinofast.data.sampler import Packed
from dinofast.models.dinov3 import (
    _encode_tokens,
    _patch_embed,
    _patch_size,
    check_dinov3,
)
from dinofast.ops.pixel_shuffle_project import pixel_shuffle_project

PATCH_LAYOUTS = ("chw", "hwc")


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
@dataclass
class VisionTokens:
    """The visual tokens of n images, packed.

    embeds:     [sum_i tokens_i, d_lm], image after image; tokens_i = Gh_i*Gw_i (+ 1 with keep_cls:
                the projected CLS comes last in each image's run).
    cu_seqlens: int32 [n + 1] on embeds' device: image i is embeds[cu_seqlens[i]:cu_seqlens[i+1]].
    grids:      one dinofast.Grid (Hp, Wp, Gh, Gw) per image.
    has_cls:    whether each image ends with its projected CLS token.
    """

    embeds: Tensor
    cu_seqlens: Tensor
    grids: list[Grid]
    has_cls: bool = False

    def __len__(self) -> int:
        return len(self.grids)

    @property
    def num_tokens(self) -> list[int]:
        """tokens_i per image (host ints; no device read)."""
        return [g.num_tokens + int(self.has_cls) for g in self.grids]

    def token_strings(self, image_token: str) -> list[str]:
        """The placeholder text of each image: `image_token` repeated tokens_i times, nothing else."""
        return [image_token_string(g, image_token) + (image_token if self.has_cls else "") for g in self.grids]

    def split(self) -> list[Tensor]:
        """Per-image views of embeds: [tokens_i, d_lm] each."""
        return list(self.embeds.split(self.num_tokens))


class PackedFeatures(NamedTuple):
    """encode_patches' output: features [sum_i (P + h_i*w_i) or sum_i h_i*w_i, D] after the final
    norm, rows in the input's order per image (after the P prefix rows when they are kept);
    cu_seqlens int32 [n + 1] over those rows; num_prefix_tokens P kept per image (0 or 1 + R)."""

    features: Tensor
    cu_seqlens: Tensor
    num_prefix_tokens: int


# ---------------------------------------------------------------------------------------------
# Host index math (vectorised over all images: no per-image Python loop)
# ---------------------------------------------------------------------------------------------
def _segments(counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For rows grouped in consecutive segments of `counts` (int64 [n]): (segment of each row,
    offset of each row within its segment, start of each segment)."""
    starts = torch.cumsum(counts, 0) - counts
    seg = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    local = torch.arange(int(counts.sum())) - starts[seg]
    return seg, local, starts


def _input_to_rowmajor(hw: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """hw int64 [n, 2] (h, w) per image; rows in Qwen2-VL's m x m block order (m = 1: row-major).
    Returns (image of each input row, row-major position y*w + x of each input row in its image)."""
    h, w = hw[:, 0], hw[:, 1]
    seg, r, _ = _segments(h * w)
    width = w[seg]
    block, within = r // (m * m), r % (m * m)
    by, bx = block // (width // m), block % (width // m)
    dy, dx = within // m, within % m
    return seg, (by * m + dy) * width + bx * m + dx


def _cls_last_order(counts: list[int]) -> Tensor:
    """Gather index into cat([y [M, d], cls [n, d]]) that puts image i's CLS row after its
    counts[i] rows: int64 [M + n]."""
    c = torch.tensor(counts, dtype=torch.int64)
    seg, r, _ = _segments(c + 1)
    y_start = torch.cumsum(c, 0) - c
    return torch.where(r < c[seg], y_start[seg] + r, int(c.sum()) + seg)


def _cu(counts: Sequence[int], device) -> Tensor:
    cu = [0]
    for k in counts:
        cu.append(cu[-1] + k)
    return torch.tensor(cu, dtype=torch.int32, device=device)


# ---------------------------------------------------------------------------------------------
# Pre-patchified input
# ---------------------------------------------------------------------------------------------
def _read_grid_thw(grid_thw, merge_size: int) -> list[tuple[int, int]]:
    """Host (h, w) per image from grid_thw (an int tensor [n, 3] or n (t, h, w) triples; a tensor on
    an accelerator is read once: one host sync, where the encoder needs the grid on the host anyway)."""
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
    if isinstance(grid_thw, torch.Tensor) and (grid_thw.dim() != 2 or grid_thw.is_floating_point()):
        V.fail("grid_thw", "an int tensor [n, 3] of (t, h, w)", f"{grid_thw.dtype} shape {tuple(grid_thw.shape)}")
    if not isinstance(rows, (list, tuple)):
        V.fail("grid_thw", "an int tensor [n, 3] or a list of (t, h, w)", type(grid_thw).__name__)
    if len(rows) == 0:
        V.fail("grid_thw", "at least one image (t, h, w)", "none (n = 0)")
    hw = []
    for i, row in enumerate(rows):
        ok = isinstance(row, (list, tuple)) and len(row) == 3
        if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in row):
            V.fail("grid_thw", f"(t, h, w), three positive ints, for image {i}", row)
        t, h, w = row
        if t != 1:
            V.fail("grid_thw", f"t = 1 for image {i} (images, not videos)", f"t = {t}")
        if h % merge_size or w % merge_size:
            V.fail("grid_thw", f"h and w of image {i} multiples of merge_size = {merge_size}", f"(h, w) = ({h}, {w})")
        hw.append((h, w))
    return hw


def _embed_patches(model, patches: Tensor, grid_thw, patch_layout: str, merge_size: int
                   ) -> tuple[Tensor, list[tuple[int, int]], Tensor | None]:
    """The patch embedding of pre-patchified rows: (tokens [sum h*w, D] row-major per image, host
    (h, w) per image, row-major position of each input row (None when that is the identity))."""
    V.check_positive_int(merge_size, "merge_size")
    if patch_layout not in PATCH_LAYOUTS:
        V.fail("patch_layout", f"one of {PATCH_LAYOUTS}", repr(patch_layout))
    hw = _read_grid_thw(grid_thw, merge_size)
    conv = model.embeddings.patch_embeddings
    C, (ph, pw) = model.config.num_channels, _patch_size(model.config)
    V.check_tensor(patches, "patches", ndim=2, dtypes=V.FLOAT_DTYPES)
    if patches.shape[1] != C * ph * pw:
        V.fail("patches", f"C*p*p = {C}*{ph}*{pw} = {C * ph * pw} columns (the model's channels and patch size)",
               f"{patches.shape[1]} (shape {tuple(patches.shape)})")
    total = sum(h * w for h, w in hw)
    if patches.shape[0] != total:
        V.fail("patches", f"sum over grid_thw of t*h*w = {total} rows",
               f"{patches.shape[0]} (shape {tuple(patches.shape)})")
    if patches.device != conv.weight.device:
        V.fail("patches", f"the model's device {conv.weight.device}", patches.device)
    # Conv2d(kernel = stride = patch) on one patch is a dot product with the weight flattened in
    # (c, i, j) order; for channels-last rows the (small) weight is permuted, not the input.
    weight = conv.weight if patch_layout == "chw" else conv.weight.permute(0, 2, 3, 1)
    tokens = F.linear(patches.to(conv.weight.dtype), weight.flatten(1), conv.bias)
    if merge_size == 1:
        return tokens, hw, None
    seg, pos = _input_to_rowmajor(torch.tensor(hw, dtype=torch.int64), merge_size)
    starts = torch.cumsum(torch.tensor([h * w for h, w in hw]), 0) - torch.tensor([h * w for h, w in hw])
    to_rowmajor = torch.empty_like(pos)
    to_rowmajor[starts[seg] + pos] = torch.arange(pos.numel())
    return tokens.index_select(0, to_rowmajor.to(tokens.device)), hw, pos


def encode_patches(model, patches: Tensor, grid_thw, *, patch_layout: str = "chw", merge_size: int = 1,
                   keep_prefix: bool = False) -> PackedFeatures:
    """encode_packed for pre-patchified packed input (Qwen2-VL / LLaVA-ViT convention; the row and
    column orders are spelled out in this module's docstring).

    patches [sum_i h_i*w_i, C*p*p] float (cast to the model's dtype); grid_thw int [n, 3] of
    (1, h_i, w_i) or n such triples; patch_layout "chw" (Qwen2-VL) or "hwc" (LLaVA-ViT);
    merge_size m: rows in m x m blocks (Qwen2-VL) or row-major (m = 1).
    Returns PackedFeatures: the final-norm features of every patch, in the input's row order, and
    with keep_prefix each image's CLS + registers first. Equals encode_packed on the same pixels.
    """
    check_dinov3(model)
    tokens, hw, pos = _embed_patches(model, patches, grid_thw, patch_layout, merge_size)
    out, plan, cu, P, _ = _encode_tokens(model, tokens, hw)
    keep = P if keep_prefix else 0
    if pos is None and keep_prefix:
        return PackedFeatures(out, plan.cu_seqlens, P)
    hw_t = torch.tensor(hw, dtype=torch.int64)
    if pos is None:
        seg, pos = _input_to_rowmajor(hw_t, 1)
    else:
        seg = torch.repeat_interleave(torch.arange(len(hw)), hw_t[:, 0] * hw_t[:, 1])
    cu_t = torch.tensor(cu[:-1], dtype=torch.int64)
    rows = cu_t[seg] + P + pos  # every patch's row in `out`, in the input's order
    if keep:
        # [prefix rows, patch rows] per image: the patch rows shift by P per image, prefix rows slot in
        pseg, local, _ = _segments(hw_t[:, 0] * hw_t[:, 1] + P)
        patch_start = torch.cumsum(hw_t[:, 0] * hw_t[:, 1], 0) - hw_t[:, 0] * hw_t[:, 1]
        rows = torch.where(local < P, cu_t[pseg] + local, rows[(patch_start[pseg] + local - P).clamp(min=0)])
    counts = [keep + h * w for h, w in hw]
    return PackedFeatures(out.index_select(0, rows.to(out.device)), _cu(counts, out.device), keep)


# ---------------------------------------------------------------------------------------------
# The tower
# ---------------------------------------------------------------------------------------------
def _projector_parts(projector) -> tuple[nn.Linear, int]:
    proj = getattr(projector, "proj", None)
    factor = getattr(projector, "factor", getattr(projector, "scale_factor", None))
    if not isinstance(projector, nn.Module) or not isinstance(proj, nn.Linear) or not (
            isinstance(factor, int) and not isinstance(factor, bool) and factor > 0):
        V.fail("projector", "a dinofast.nn.PixelShuffleProjector (or a module with a `proj` nn.Linear and a "
               "positive int `factor` / `scale_factor`, as nanoVLM's ModalityProjector)", type(projector).__name__)
    return proj, factor


def _is_raw_image(x) -> bool:
    return isinstance(x, Image.Image) or (isinstance(x, torch.Tensor) and x.dtype == torch.uint8)


class VisionTower(nn.Module):
    """DINOv3 encoder + pixel-shuffle projector as one module: images -> VisionTokens.

    model: a transformers DINOv3ViTModel / DINOv3ViTBackbone (patched or not); projector: a
    dinofast.nn.PixelShuffleProjector (or nanoVLM's ModalityProjector layout: `proj` Linear
    [d_lm, D*s*s], `factor`/`scale_factor` s); processor: an ImageProcessor with the model's patch
    size and factor s, needed for PIL images / uint8 tensors, and whose max_image_tokens bounds
    every image's Gh*Gw; keep_cls: append each image's projected CLS token (its own Linear
    `cls_proj` [d_lm, D], initialised like the projector) after its Gh*Gw tokens.

    forward(images) -> VisionTokens. images: a non-empty list of PIL images, uint8 tensors
    ([H, W] / [C, H, W], through the processor) or float pixel tensors [3, H, W] already processed
    (sides multiples of patch_size*s), mixed freely, or a dinofast.Packed of pixel tensors.
    One encoder pass over all images packed, one pixel_shuffle_project over its output. When no
    tower parameter requires grad (a frozen tower) the encoder runs without autograd, so backward
    reaches only the projector (and no dx of the projection is computed).
    Under torch.autocast the projection runs in the autocast dtype, like nn.Linear. tower.train()
    also puts the DINOv3 model in train mode (RoPE coordinate augmentation where configured): call
    tower.model.eval() after it to keep a frozen tower deterministic.
    forward_patches(patches, grid_thw, ...) is the same for pre-patchified input (see encode_patches).
    """

    def __init__(self, model, projector, processor: ImageProcessor | None = None, keep_cls: bool = False):
        super().__init__()
        check_dinov3(model)
        proj, s = _projector_parts(projector)
        config = model.config
        D, patch = config.hidden_size, _patch_size(config)
        if proj.in_features != D * s * s:
            V.fail("projector", f"in-features D*s*s = {D}*{s}*{s} = {D * s * s} (D: the model's hidden size, "
                   "s: the projector's factor)", f"in-features {proj.in_features}")
        P = 1 + config.num_register_tokens
        prefix = getattr(projector, "num_prefix_tokens", 0)
        if prefix not in (0, P):
            V.fail("projector.num_prefix_tokens", f"0 or the model's CLS + registers = {P}", prefix)
        if processor is not None:
            if not isinstance(processor, ImageProcessor):
                V.fail("processor", "a dinofast.ImageProcessor or None", type(processor).__name__)
            if (processor.patch_size, processor.patch_size) != patch:
                V.fail("processor", f"patch_size {patch[0]} (the model's patch size)",
                       f"patch_size {processor.patch_size}")
            if processor.factor != s:
                V.fail("processor", f"factor {s} (the projector's pixel-shuffle factor)", f"factor {processor.factor}")
        if not isinstance(keep_cls, bool):
            V.fail("keep_cls", "a bool", keep_cls)
        self.model, self.projector, self.processor, self.keep_cls = model, projector, processor, keep_cls
        self.factor, self.patch_size, self.num_prefix_tokens = s, patch, P
        self.cls_proj = None
        if keep_cls:
            self.cls_proj = nn.Linear(D, proj.out_features, bias=proj.bias is not None,
                                      device=proj.weight.device, dtype=proj.weight.dtype)
            nn.init.normal_(self.cls_proj.weight, mean=0.0, std=0.02)
            if self.cls_proj.bias is not None:
                nn.init.zeros_(self.cls_proj.bias)

    # ---- inputs ----------------------------------------------------------------------------------

    def _pixels(self, images) -> tuple[list[Tensor], list[Grid]]:
        if isinstance(images, Packed):
            if images.num_prefix_tokens != self.num_prefix_tokens:
                V.fail("images.num_prefix_tokens", f"the model's CLS + registers = {self.num_prefix_tokens}",
                       images.num_prefix_tokens)
            images = images.images
        if not isinstance(images, (list, tuple)):
            V.fail("images", "a list of PIL images / uint8 or float tensors, or a dinofast.Packed",
                   type(images).__name__)
        if len(images) == 0:
            V.fail("images", "a non-empty list of images", "an empty list")
        (ph, pw), s = self.patch_size, self.factor
        budget = self.processor.max_image_tokens if self.processor is not None else None
        device = self.model.embeddings.patch_embeddings.weight.device
        pixels, grids = [], []
        for i, img in enumerate(images):
            name = f"images[{i}]"
            if _is_raw_image(img):
                if self.processor is None:
                    V.fail(name, "a float pixel tensor [3, H, W] (PIL images and uint8 tensors need "
                           "VisionTower(..., processor=dinofast.ImageProcessor(...)))", type(img).__name__)
                px, grid = self.processor(img)
            else:
                V.check_tensor(img, name, ndim=3, dtypes=V.FLOAT_DTYPES)
                c, H, W = img.shape
                if c != self.model.config.num_channels:
                    V.fail(name, f"[{self.model.config.num_channels}, H, W] (channels first)",
                           f"shape {tuple(img.shape)}")
                if H == 0 or W == 0 or H % (ph * s) or W % (pw * s):
                    V.fail(name, f"H and W positive multiples of patch_size * factor = {ph}*{s} = {ph * s}",
                           f"size {H}x{W} (HxW)")
                px, grid = img, Grid(H // ph, W // pw, H // (ph * s), W // (pw * s))
                if budget is not None and grid.num_tokens > budget:
                    V.fail(name, f"at most max_image_tokens = {budget} image tokens (the processor's budget)",
                           f"Gh*Gw = {grid.Gh}*{grid.Gw} = {grid.num_tokens}")
            pixels.append(px.to(device, non_blocking=True))
            grids.append(grid)
        return pixels, grids

    def _frozen(self, inputs: Sequence[Tensor]) -> bool:
        return not (any(p.requires_grad for p in self.model.parameters()) or any(t.requires_grad for t in inputs))

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, images) -> VisionTokens:
        pixels, grids = self._pixels(images)
        with torch.no_grad() if self._frozen(pixels) else contextlib.nullcontext():
            tokens = _patch_embed(self.model.embeddings, pixels, self.patch_size)
            out, plan, _, P, _ = _encode_tokens(self.model, tokens, [(g.Hp, g.Wp) for g in grids])
        return self._project(out, plan, grids, P)

    def forward_patches(self, patches: Tensor, grid_thw, *, patch_layout: str = "chw",
                        merge_size: int = 1) -> VisionTokens:
        """forward for pre-patchified input (layout as encode_patches). Embeds come out in the
        pixel-shuffle order (row-major over each image's Gh x Gw tokens) whatever merge_size."""
        s = self.factor
        with torch.no_grad() if self._frozen([patches]) else contextlib.nullcontext():
            tokens, hw, _ = _embed_patches(self.model, patches, grid_thw, patch_layout, merge_size)
            for i, (h, w) in enumerate(hw):
                if h % s or w % s:
                    V.fail("grid_thw", f"h and w of image {i} multiples of the projector's factor {s}",
                           f"(h, w) = ({h}, {w})")
            budget = self.processor.max_image_tokens if self.processor is not None else None
            grids = [Grid(h, w, h // s, w // s) for h, w in hw]
            for i, g in enumerate(grids):
                if budget is not None and g.num_tokens > budget:
                    V.fail("grid_thw", f"at most max_image_tokens = {budget} image tokens for image {i} "
                           "(the processor's budget)", f"Gh*Gw = {g.Gh}*{g.Gw} = {g.num_tokens}")
            out, plan, _, P, _ = _encode_tokens(self.model, tokens, hw)
        return self._project(out, plan, grids, P)

    def _project(self, out: Tensor, plan, grids: list[Grid], P: int) -> VisionTokens:
        """out [T, D] packed [CLS, registers, patches] per image -> VisionTokens (one projection call)."""
        proj = self.projector.proj
        weight, bias = proj.weight, proj.bias
        if torch.is_autocast_enabled(out.device.type):
            dtype = torch.get_autocast_dtype(out.device.type)
        else:
            dtype = weight.dtype
        weight = weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        y, out_cu = pixel_shuffle_project(out.to(dtype), weight, bias, grids=plan.rope.grids, factor=self.factor,
                                          num_prefix_tokens=P, cu_seqlens=plan.cu_seqlens,
                                          layout=plan.layout)
        if not self.keep_cls:
            return VisionTokens(y, out_cu, grids, False)
        cls = self.cls_proj(out.index_select(0, plan.cu_seqlens[:-1].long()).to(dtype))  # [n, d_lm]
        counts = [g.num_tokens for g in grids]
        order = _cls_last_order(counts).to(y.device)
        embeds = torch.cat([y, cls.to(y.dtype)]).index_select(0, order)
        return VisionTokens(embeds, _cu([k + 1 for k in counts], y.device), grids, True)

    def extra_repr(self) -> str:
        return f"factor={self.factor}, keep_cls={self.keep_cls}, processor={self.processor!r}"
