"""`python -m dinofast bench --device cuda --out DIR`: one command that measures a device.

Sections, run in this order; DIR/report.json and DIR/report.md are rewritten after each one, so a
run cut short still leaves what it measured:
  ceilings  the device's roofline, measured: a large device copy (GB/s, bytes read + written) and a
            large matrix product per low-precision dtype (TFLOP/s);
  parity    every op (forward and backward) and the patched DINOv3 / encode_packed at production
            shapes (ViT-L: one 1024x1024 image, T = 4101, H = 16, D = 64; and 8 mixed sizes), in
            bf16 and fp16, under flash-attention's rule: per output, the max abs error of dinofast
            in the low dtype against a high-precision reference (fp64 for ops, fp32 for models, on
            the same rounded inputs and weights) is at most twice that of the plain PyTorch
            computation in the same dtype, plus a floor of 1e-5 * max|reference|;
  timing    every op against the peers torch offers (SDPA flash / cuDNN padded and per image,
            FlexAttention with a document mask, torch's varlen_attn where present, the cuBLAS GEMM
            alone as the projection's floor, a device copy as the RoPE's floor), medians of timed
            repetitions after a warm-up with the L2 cache flushed (a buffer written) before each;
            TFLOP/s and GB/s against the measured ceilings;
  tests     the test-suite in a subprocess on the device (the whole of tests/ on CUDA; one small
            file in --quick mode).
`--device cpu --quick` runs the same code paths on tiny shapes, with host clocks instead of CUDA
events (CI runs it so it cannot rot). Exit status 1 when a parity check or a test fails.

Cases live in two registries, PARITY_CASES and TIMING_CASES; a new op or module adds one function
to each.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dinofast import _backend
from dinofast.reference.pixel_shuffle_project import (
    pixel_shuffle,
    pixel_shuffle_project_reference,
)
from dinofast.reference.rope2d import inv_freq as rope_inv_freq
from dinofast.reference.rope2d import rope2d_reference, rope_angles, rotate_half
from dinofast.reference.varlen_attention import varlen_attention_reference

REPO_ROOT = Path(__file__).resolve().parent.parent
LOW_DTYPES = (torch.bfloat16, torch.float16)
TIMING_DTYPE = torch.bfloat16
# flash-attention's rule: err(dinofast) <= RULE_FACTOR * err(torch, same dtype) + floor, where the
# floor is RULE_FLOOR * max|reference| (keeps an exact peer from demanding bit-exactness).
RULE_FACTOR, RULE_FLOOR = 2.0, 1e-5
# A case whose name contains this string gets a deliberately wrong dinofast output (last dim
# rolled by one): the check that the bench can fail, used by its test.
BREAK_ENV = "DINOFAST_BENCH_BREAK"


# ---------------------------------------------------------------------------------------------
# Sizes: production (ViT-L) and --quick (tiny, same code)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    heads: int
    head_dim: int
    registers: int
    patch: int
    single: tuple[int, int]                 # one image, H x W pixels
    mixed: tuple[tuple[int, int], ...]      # a batch of images of different sizes
    factor: int                             # pixel-shuffle factor (sides are multiples of patch*factor)
    proj_out: int                           # projector output width (the LM's hidden size)
    model: dict[str, int]                   # DINOv3ViTConfig sizes
    copy_mb: int                            # copy ceiling: MB per buffer
    matmul_n: int                           # matmul ceiling: n x n x n
    flush_mb: int                           # L2 flush buffer written before each timed rep
    warmup: int
    reps: int


FULL = Sizes(
    heads=16, head_dim=64, registers=4, patch=16, single=(1024, 1024),
    mixed=((1024, 1024), (768, 1024), (1024, 512), (512, 512), (640, 448), (896, 640), (384, 768), (256, 256)),
    factor=4, proj_out=2048,
    model={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
    copy_mb=1024, matmul_n=8192, flush_mb=256, warmup=5, reps=25)
QUICK = Sizes(
    heads=2, head_dim=16, registers=4, patch=16, single=(64, 64),
    mixed=((64, 64), (32, 64), (64, 32), (32, 32), (96, 64), (64, 96), (32, 96), (96, 32)),
    factor=2, proj_out=16,
    model={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    copy_mb=16, matmul_n=256, flush_mb=4, warmup=1, reps=3)


@dataclass
class Pack:
    """n images packed back to back: [CLS, registers, patches] each; host metadata and device copies."""

    name: str
    sizes: list[tuple[int, int]]
    grids: list[tuple[int, int]]   # (Hp, Wp) per image
    cu: list[int]                  # [n+1] token offsets
    max_len: int
    P: int                         # prefix tokens per image
    cu_t: torch.Tensor             # int32 [n+1] on the device
    grids_t: torch.Tensor          # int32 [n, 2] on the device

    @property
    def T(self) -> int:
        return self.cu[-1]

    def segments(self):
        return list(zip(self.cu[:-1], self.cu[1:]))


def make_pack(name: str, sizes: Sequence[tuple[int, int]], s: Sizes, device) -> Pack:
    P = 1 + s.registers
    grids = [(h // s.patch, w // s.patch) for h, w in sizes]
    cu = [0]
    for hp, wp in grids:
        cu.append(cu[-1] + P + hp * wp)
    return Pack(name, list(sizes), grids, cu, P + max(hp * wp for hp, wp in grids), P,
                torch.tensor(cu, dtype=torch.int32, device=device),
                torch.tensor(grids, dtype=torch.int32, device=device))


def randn(shape, dtype, device, seed: int) -> torch.Tensor:
    """Seeded standard normal values drawn in fp32 on the host, then rounded to dtype on device."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Context shared by every section
# ---------------------------------------------------------------------------------------------
@dataclass
class Context:
    device: torch.device
    quick: bool
    sizes: Sizes
    out_dir: Path
    backends: list[str]                       # dinofast backends measured on this device
    report: dict
    break_case: str = ""
    ceilings: dict[str, float] = field(default_factory=dict)
    _packs: list[Pack] | None = None
    _model: object = None

    @property
    def packs(self) -> list[Pack]:
        if self._packs is None:
            self._packs = [make_pack(f"1x{self.sizes.single[0]}x{self.sizes.single[1]}", [self.sizes.single],
                                     self.sizes, self.device),
                           make_pack(f"{len(self.sizes.mixed)} mixed", self.sizes.mixed, self.sizes, self.device)]
        return self._packs

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def measured_backends(device: torch.device) -> list[str]:
    """dinofast's own backends that run on device (the reference is the oracle, not a contender;
    the Triton interpreter on CPU is for tests, not for speed)."""
    return [b for b in _backend.available_backends(device.type)
            if b != "reference" and not (b == "triton" and device.type != "cuda")] or ["reference"]


# ---------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------
def _max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        return math.inf
    if out.numel() == 0:
        return 0.0
    diff = (out.double() - ref.double()).abs()
    if not torch.isfinite(diff).all():  # NaN (an unwritten, poisoned element) or inf never passes
        return math.inf
    return diff.max().item()


def compare(op: str, shape: str, dtype: torch.dtype, backend: str, names: Sequence[str],
            got: Sequence[torch.Tensor], peer: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> list[dict]:
    """One row per output: flash-attention's rule on the max abs errors against the reference."""
    rows = []
    for name, g, p, r in zip(names, got, peer, ref):
        scale = r.double().abs().max().item() if r.numel() else 0.0
        e_df, e_pt = _max_abs_err(g, r), _max_abs_err(p, r)
        bound = RULE_FACTOR * e_pt + RULE_FLOOR * scale
        ok = math.isfinite(e_df) and math.isfinite(e_pt) and e_df <= bound
        rows.append({"op": op, "shape": shape, "dtype": _dtype_name(dtype), "backend": backend, "output": name,
                         "err_dinofast": e_df, "err_torch": e_pt, "bound": bound, "ref_max_abs": scale,
                         "ratio": e_df / e_pt if e_pt > 0 else (0.0 if e_df == 0 else math.inf),
                         "verdict": "PASS" if ok else "FAIL", "error": None})
    return rows


def parity_rows(op: str, shape: str, dtype: torch.dtype, backend: str, names: Sequence[str],
                dinofast_fn: Callable, torch_fn: Callable, reference_fn: Callable,
                broken: bool = False) -> list[dict]:
    """Run the three computations (each returns a tuple of tensors, in `names` order) and compare.

    dinofast_fn runs under the forced `backend` with poisoned outputs; an exception there, or in
    the peer or the reference, is a FAIL row carrying the message (BackendUnavailableError: SKIP)."""
    def row(verdict, msg):
        return [{"op": op, "shape": shape, "dtype": _dtype_name(dtype), "backend": backend, "output": n,
                     "err_dinofast": math.nan, "err_torch": math.nan, "bound": math.nan, "ref_max_abs": math.nan,
                     "ratio": math.nan, "verdict": verdict, "error": msg} for n in names]

    try:
        ref = [t.detach() for t in reference_fn()]
        peer = [t.detach() for t in torch_fn()]
    except Exception as err:  # noqa: BLE001 -- the oracle or the peer could not run: nothing was verified
        return row("FAIL", f"reference/peer: {type(err).__name__}: {err}")
    poisoned = _backend.POISON_OUTPUTS
    _backend.POISON_OUTPUTS = True
    try:
        with (_backend.backend(backend) if backend in _backend.BACKENDS else contextlib.nullcontext()):
            got = [t.detach() for t in dinofast_fn()]
    except _backend.BackendUnavailableError as err:
        return row("SKIP", str(err))
    except Exception as err:  # noqa: BLE001 -- dinofast raising is a failed check, reported as such
        return row("FAIL", f"dinofast: {type(err).__name__}: {err}")
    finally:
        _backend.POISON_OUTPUTS = poisoned
    if broken:
        got = [t.roll(1, dims=-1) for t in got]
    return compare(op, shape, dtype, backend, names, got, peer, ref)


def _grads(fn: Callable, inputs: Sequence[torch.Tensor], dout: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(output, d inputs) of fn(*inputs) for the cotangent dout."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves)
    return (out.detach(),) + torch.autograd.grad(out, leaves, dout)


def torch_rope(q: torch.Tensor, k: torch.Tensor, pk: Pack) -> tuple[torch.Tensor, torch.Tensor]:
    """2D RoPE as transformers applies it, per image of the pack ([T, H, D]): angles in fp32, cos and
    sin rounded to the input dtype, the rotation computed in the input dtype."""
    freqs = rope_inv_freq(q.shape[-1], device=q.device)
    outs = []
    for x in (q, k):
        parts = []
        for (a, b), (hp, wp) in zip(pk.segments(), pk.grids):
            ang = rope_angles(hp, wp, freqs)[:, None]           # [HW, 1, D]
            cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
            seg = x[a + pk.P:b]
            parts += [x[a:a + pk.P], seg * cos + rotate_half(seg) * sin]
        outs.append(torch.cat(parts))
    return outs[0], outs[1]


def torch_attention(q, k, v, pk: Pack, rope: bool) -> torch.Tensor:
    """Attention per image in the input dtype, written out (scores, softmax, weighted sum): the
    "same-dtype PyTorch computation" of flash-attention's rule."""
    if rope:
        q, k = torch_rope(q, k, pk)
    scale = q.shape[-1] ** -0.5
    outs = []
    for a, b in pk.segments():
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        p = torch.softmax((qs @ ks.transpose(1, 2)) * scale, dim=-1)
        outs.append((p @ vs).transpose(0, 1))
    return torch.cat(outs)


# Registries: name -> fn(ctx) -> rows (one parity function and one timing function per op or module).
PARITY_CASES: dict[str, Callable[[Context], list[dict]]] = {}
TIMING_CASES: dict[str, Callable[[Context], list[dict]]] = {}


def parity_case(name: str):
    def register(fn):
        PARITY_CASES[name] = fn
        return fn
    return register


def timing_case(name: str, per_pack: bool = False):
    """Register fn(ctx, clock) -> rows; with per_pack, fn(ctx, clock, pack) runs for every pack."""
    def register(fn):
        TIMING_CASES[name] = (lambda ctx, clock: [row for pk in ctx.packs for row in fn(ctx, clock, pk)]
                              ) if per_pack else fn
        return fn
    return register


def _op_parity(ctx: Context, op: str, names, make_inputs, dinofast_fn, torch_fn, reference_fn,
               packs: list[Pack] | None = None) -> list[dict]:
    """For every pack (default: ctx.packs), low dtype and dinofast backend: inputs = make_inputs(pk, dtype); each fn
    takes (pk, *inputs) and returns a tuple in `names` order (the reference gets fp64 inputs)."""
    return [row for pk in packs or ctx.packs for dtype in LOW_DTYPES
            for row in _op_parity_one(ctx, op, names, pk, make_inputs(pk, dtype), dtype,
                                      dinofast_fn, torch_fn, reference_fn)]


def _op_parity_one(ctx: Context, op: str, names, pk: Pack, inputs, dtype, dinofast_fn, torch_fn,
                   reference_fn) -> list[dict]:
    wide = [x.double() for x in inputs]
    ref_cache = []

    def reference():
        if not ref_cache:  # one fp64 reference per pack and dtype, shared by the backends
            ref_cache.append(reference_fn(pk, *wide))
        return ref_cache[0]

    rows = []
    for b in ctx.backends:
        rows += parity_rows(op, pk.name, dtype, b, names, lambda: dinofast_fn(pk, *inputs),
                            lambda: torch_fn(pk, *inputs), reference, broken=_broken(ctx, op))
    return rows


def _broken(ctx: Context, case: str) -> bool:
    return bool(ctx.break_case) and ctx.break_case in case


@parity_case("rope2d")
def parity_rope2d(ctx: Context) -> list[dict]:
    from dinofast.ops.rope2d import rope2d

    s = ctx.sizes

    def inputs(pk, dtype):
        return [randn((pk.T, s.heads, s.head_dim), dtype, ctx.device, seed) for seed in (1, 2)]

    rows = _op_parity(
        ctx, "rope2d (packed)", ("q", "k"), inputs,
        lambda pk, q, k: rope2d(q, k, pk.grids_t, num_prefix_tokens=pk.P, cu_seqlens=pk.cu_t),
        lambda pk, q, k: torch_rope(q, k, pk),
        lambda pk, q, k: rope2d_reference(q, k, pk.grids_t, num_prefix_tokens=pk.P, cu_seqlens=pk.cu_t))

    def batched(fn, pk, q, k):  # [N, H, D] -> [1, H, N, D] (a transposed buffer, as in the model)
        out = fn(q[None].transpose(1, 2), k[None].transpose(1, 2), pk)
        return tuple(t.transpose(1, 2)[0] for t in out)

    single = ctx.packs[0]  # one image: the batched layout the patched model uses
    hw = single.grids[0]
    return rows + _op_parity(
        ctx, "rope2d (batched)", ("q", "k"), inputs,
        lambda pk, q, k: batched(lambda a, b, _: rope2d(a, b, hw, num_prefix_tokens=pk.P), pk, q, k),
        lambda pk, q, k: torch_rope(q, k, pk),
        lambda pk, q, k: batched(lambda a, b, _: rope2d_reference(a, b, hw, num_prefix_tokens=pk.P), pk, q, k),
        packs=[single])


def _attention_parity(ctx: Context, rope: bool) -> list[dict]:
    from dinofast.ops.rope2d import RopeSpec
    from dinofast.ops.varlen_attention import varlen_attention

    s = ctx.sizes

    def inputs(pk, dtype):  # q, k, v and the output's cotangent
        return [randn((pk.T, s.heads, s.head_dim), dtype, ctx.device, seed) for seed in (3, 4, 5, 6)]

    def spec(pk):
        return RopeSpec(pk.grids_t, pk.P) if rope else None

    return _op_parity(
        ctx, "varlen_attention" + (" + fused RoPE" if rope else ""), ("out", "dq", "dk", "dv"), inputs,
        lambda pk, q, k, v, do: _grads(
            lambda a, b, c: varlen_attention(a, b, c, pk.cu_t, pk.max_len, rope=spec(pk)), (q, k, v), do),
        lambda pk, q, k, v, do: _grads(lambda a, b, c: torch_attention(a, b, c, pk, rope), (q, k, v), do),
        lambda pk, q, k, v, do: _grads(
            lambda a, b, c: varlen_attention_reference(a, b, c, pk.cu_t, rope=spec(pk))[0], (q, k, v), do))


@parity_case("varlen_attention")
def parity_varlen_attention(ctx: Context) -> list[dict]:
    return _attention_parity(ctx, rope=False)


@parity_case("varlen_attention_rope")
def parity_varlen_attention_rope(ctx: Context) -> list[dict]:
    return _attention_parity(ctx, rope=True)


def _psp_inputs(ctx: Context, pk: Pack, dtype, seed0: int = 7):
    s = ctx.sizes
    C, K = s.heads * s.head_dim, s.heads * s.head_dim * s.factor ** 2
    M = sum((hp // s.factor) * (wp // s.factor) for hp, wp in pk.grids)
    x = randn((pk.T, C), dtype, ctx.device, seed0)
    w = (randn((s.proj_out, K), torch.float32, ctx.device, seed0 + 1) / K ** 0.5).to(dtype)
    b = (0.1 * randn((s.proj_out,), torch.float32, ctx.device, seed0 + 2)).to(dtype)
    dy = randn((M, s.proj_out), dtype, ctx.device, seed0 + 3)
    return [x, w, b, dy]


@parity_case("pixel_shuffle_project")
def parity_pixel_shuffle_project(ctx: Context) -> list[dict]:
    from dinofast.ops.pixel_shuffle_project import pixel_shuffle_project

    f = ctx.sizes.factor

    def run(fn, pk, x, w, b, dy):
        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
        y = fn(*leaves, grids=pk.grids_t, factor=f, num_prefix_tokens=pk.P, cu_seqlens=pk.cu_t)[0]
        return (y.detach(),) + torch.autograd.grad(y, leaves, dy)

    return _op_parity(
        ctx, "pixel_shuffle_project", ("y", "dx", "dweight", "dbias"), lambda pk, dt: _psp_inputs(ctx, pk, dt),
        lambda pk, *a: run(pixel_shuffle_project, pk, *a),
        lambda pk, *a: run(pixel_shuffle_project_reference, pk, *a),  # in the inputs' (low) dtype
        lambda pk, *a: run(pixel_shuffle_project_reference, pk, *a))  # fp64 inputs: the oracle


def _healthy_weights(model, seed: int = 0):
    """Random weights of a scale where every part of each block matters (transformers' init,
    std 0.02 with unit LayerScale, is close to an identity map that would hide a wrong attention)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                v = 0.1 + 0.4 * torch.rand(p.shape, generator=g)
            elif "norm" in name and name.endswith("weight"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif p.dim() >= 2 and "token" not in name:
                v = torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel())
            else:
                v = 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(v)
    return model


def base_model(ctx: Context):
    """A random-weight DINOv3 ViT (ViT-L sizes, or tiny in --quick) on the host in fp32, built once."""
    if ctx._model is None:
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        config = DINOv3ViTConfig(**ctx.sizes.model, num_register_tokens=ctx.sizes.registers,
                                 patch_size=ctx.sizes.patch, hidden_act="gelu", use_gated_mlp=False,
                                 attn_implementation="sdpa")
        torch.manual_seed(0)
        ctx._model = _healthy_weights(DINOv3ViTModel(config)).eval()
    return ctx._model


def _tokens(features) -> torch.Tensor:
    """encode_packed's ImageFeatures -> [N, C] in transformers' order (CLS, registers, patches)."""
    return torch.cat([features.cls[None], features.registers, features.patches.flatten(0, 1)])


@contextlib.contextmanager
def _fp32_exact():
    """fp32 matmuls and convolutions in full fp32 (no TF32) for the reference."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@parity_case("models")
def parity_models(ctx: Context) -> list[dict]:
    """Patched DINOv3 on one image (batched path) and encode_packed on the mixed batch (packed
    path), automatic backend; reference: the plain model in fp32 with the weights rounded to the
    low dtype; peer: the plain model in the low dtype."""
    rows = []
    for dtype in LOW_DTYPES:
        rows += _model_parity_one(ctx, dtype)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _model_parity_one(ctx: Context, dtype: torch.dtype) -> list[dict]:
    from dinofast.models.dinov3 import encode_packed, patch_dinov3

    single, mixed = ctx.packs
    auto = _backend.select(dict.fromkeys(_backend.BACKENDS), ctx.device, "bench")
    base = base_model(ctx)
    reference = copy.deepcopy(base).to(dtype).to(device=ctx.device, dtype=torch.float32)
    plain = copy.deepcopy(base).to(device=ctx.device, dtype=dtype)
    patched = patch_dinov3(copy.deepcopy(plain))
    image = randn((1, 3, *ctx.sizes.single), dtype, ctx.device, 11)
    images = [randn((3, h, w), dtype, ctx.device, 12 + i) for i, (h, w) in enumerate(mixed.sizes)]

    def per_image(model, cast):
        return (torch.cat([model(im[None].to(cast)).last_hidden_state[0] for im in images]),)

    with torch.no_grad(), _fp32_exact():
        patched_op, packed_op = "patched DINOv3 (last_hidden_state)", "encode_packed (all tokens)"
        return parity_rows(
            patched_op, single.name, dtype, f"auto ({auto})", ("tokens",),
            lambda: (patched(image).last_hidden_state,), lambda: (plain(image).last_hidden_state,),
            lambda: (reference(image.float()).last_hidden_state,), broken=_broken(ctx, patched_op),
        ) + parity_rows(
            packed_op, mixed.name, dtype, f"auto ({auto})", ("tokens",),
            lambda: (torch.cat([_tokens(f) for f in encode_packed(patched, images)]),),
            lambda: per_image(plain, dtype), lambda: per_image(reference, torch.float32),
            broken=_broken(ctx, packed_op))


LM_WIDTH = 960  # nanoVLM's language-model width: the VisionTower's projector output


def _tower_case(ctx: Context, dtype: torch.dtype):
    """(VisionTower over a patched copy of the model in `dtype`, images of the mixed pack, per-image
    fn(model, cast) -> (embeds,): nanoVLM's path, the model on each image then the reference
    pixel shuffle + Linear on its (Hp, Wp)); pixel-shuffle factor 4 where every side allows it."""
    import dinofast
    from dinofast.reference.pixel_shuffle_project import pixel_shuffle_project_reference

    _, mixed = ctx.packs
    patch, P = ctx.sizes.patch, 1 + ctx.sizes.registers
    s = 4 if all(h % (4 * patch) == 0 and w % (4 * patch) == 0 for h, w in mixed.sizes) else 2
    base = base_model(ctx)
    torch.manual_seed(3)
    projector = dinofast.nn.PixelShuffleProjector(base.config.hidden_size, LM_WIDTH, s, bias=True,
                                                  num_prefix_tokens=P).to(device=ctx.device, dtype=dtype)
    tower = dinofast.VisionTower(dinofast.patch_dinov3(copy.deepcopy(base).to(device=ctx.device, dtype=dtype)),
                                 projector)
    images = [randn((3, h, w), dtype, ctx.device, 70 + i) for i, (h, w) in enumerate(mixed.sizes)]

    def per_image(model, cast):
        w, b = projector.proj.weight.to(cast), projector.proj.bias.to(cast)
        outs = [pixel_shuffle_project_reference(model(im[None].to(cast)).last_hidden_state, w, b,
                                                grids=(im.shape[1] // patch, im.shape[2] // patch), factor=s,
                                                num_prefix_tokens=P)[0] for im in images]
        return (torch.cat(outs),)
    return tower, images, per_image


@parity_case("vision_tower")
def parity_vision_tower(ctx: Context) -> list[dict]:
    """VisionTower (one packed encoder pass + one packed projection) on the mixed batch; reference:
    the plain model in fp32 with the weights rounded to the low dtype, per image, then nanoVLM's
    shuffle + Linear; peer: the same per-image path in the low dtype."""
    rows = []
    name = "VisionTower (embeds)"
    auto = _backend.select(dict.fromkeys(_backend.BACKENDS), ctx.device, "bench")
    for dtype in LOW_DTYPES:
        tower, images, per_image = _tower_case(ctx, dtype)
        plain = copy.deepcopy(base_model(ctx)).to(device=ctx.device, dtype=dtype)
        reference = copy.deepcopy(base_model(ctx)).to(dtype).to(device=ctx.device, dtype=torch.float32)
        with torch.no_grad(), _fp32_exact():
            rows += parity_rows(name, ctx.packs[1].name, dtype, f"auto ({auto})", ("embeds",),
                                lambda: (tower(images).embeds,), lambda: per_image(plain, dtype),
                                lambda: per_image(reference, torch.float32), broken=_broken(ctx, name))
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
class Clock:
    """Device-timed region: CUDA events on CUDA, the host's perf_counter (after the work) on CPU.
    Same structure either way: warm-up, then per rep an L2 flush (a buffer written), the timed
    call, and the median over reps."""

    def __init__(self, device: torch.device, flush_mb: int):
        self.device = device
        self.flush = torch.empty(flush_mb * 2 ** 20 // 4, dtype=torch.float32, device=device)

    def median_ms(self, fn: Callable, warmup: int, reps: int) -> float:
        for _ in range(warmup):
            fn()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)]
        times = []
        for i in range(reps):
            self.flush.fill_(float(i))  # evicts the inputs from L2 before the timed call
            if cuda:
                events[i][0].record()
                fn()
                events[i][1].record()
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        if cuda:
            torch.cuda.synchronize(self.device)
            times = [start.elapsed_time(end) for start, end in events]
        return statistics.median(times)


def timing_row(ctx: Context, clock: Clock, op: str, shape: str, impl: str, fn: Callable, *,
               flops: float | None = None, bytes_moved: float | None = None, note: str = "",
               context: Callable = contextlib.nullcontext, reps: int | None = None) -> dict:
    """Median time of fn() under context(); TFLOP/s against the measured matmul ceiling and GB/s
    against the measured copy ceiling. An implementation that cannot run here is a skipped row."""
    row = {"op": op, "shape": shape, "dtype": _dtype_name(TIMING_DTYPE), "impl": impl, "ms": None,
           "tflops": None, "gbps": None, "roofline_pct": None, "note": note, "skipped": None}

    def call():
        with context():
            fn()

    try:
        ms = clock.median_ms(call, ctx.sizes.warmup, reps or ctx.sizes.reps)
    except Exception as err:  # noqa: BLE001 -- an implementation that cannot run here is a skipped row
        msg = str(err).splitlines()[0][:200] if str(err) else ""
        row["skipped"] = msg if isinstance(err, _Unavailable) else f"{type(err).__name__}: {msg}"
        return row
    row["ms"] = ms
    if flops:
        row["tflops"] = flops / ms / 1e9
        peak = ctx.ceilings.get(f"matmul_{row['dtype']}_tflops")
        row["roofline_pct"] = 100 * row["tflops"] / peak if peak else None
    if bytes_moved:
        row["gbps"] = bytes_moved / ms / 1e6
        peak = ctx.ceilings.get("copy_gbps")
        if not flops:
            row["roofline_pct"] = 100 * row["gbps"] / peak if peak else None
    return row


def measure_ceilings(ctx: Context, clock: Clock) -> dict[str, float]:
    n_copy = ctx.sizes.copy_mb * 2 ** 20 // 4
    src = randn((n_copy,), torch.float32, ctx.device, 0)
    dst = torch.empty_like(src)
    ms = clock.median_ms(lambda: dst.copy_(src), ctx.sizes.warmup, ctx.sizes.reps)
    out = {"copy_gbps": 2 * src.numel() * 4 / ms / 1e6, "copy_mb": ctx.sizes.copy_mb, "matmul_n": ctx.sizes.matmul_n}
    src = dst = None  # free before the matmuls
    for dtype in LOW_DTYPES:
        out[f"matmul_{_dtype_name(dtype)}_tflops"] = _matmul_tflops(ctx, clock, dtype)
    return out


def _matmul_tflops(ctx: Context, clock: Clock, dtype: torch.dtype) -> float:
    n = ctx.sizes.matmul_n
    a, b = randn((n, n), dtype, ctx.device, 1), randn((n, n), dtype, ctx.device, 2)
    return 2 * n ** 3 / clock.median_ms(lambda: a @ b, ctx.sizes.warmup, ctx.sizes.reps) / 1e9


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _forward_timer(run: Callable, leaves: Sequence[torch.Tensor]) -> Callable:
    """A callable timing run(leaves) as inference (no autograd graph)."""
    inputs = [x.detach() for x in leaves]  # some peers refuse inputs that require grad

    def fn():
        with torch.no_grad():
            return run(inputs)
    return fn


def _backward_timer(run: Callable, leaves: Sequence[torch.Tensor], seed: int = 99) -> Callable:
    """A callable timing only the backward of run(leaves) (graph built once, kept)."""
    outs = run(leaves)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    douts = [randn(o.shape, o.dtype, o.device, seed + i) for i, o in enumerate(outs)]
    return lambda: torch.autograd.grad(outs, leaves, douts, retain_graph=True)


def _leaves(*ts):
    return [t.detach().requires_grad_() for t in ts]


_FLEX = {}


def _flex_attention(compiled: bool):
    """torch's FlexAttention, compiled on CUDA (its eager form is a slow reference, used on CPU so
    the same code runs in --quick)."""
    if compiled not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX[compiled] = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    return _FLEX[compiled]


def attention_impls(ctx: Context, pk: Pack, q, k, v) -> list[tuple[str, Callable, list[torch.Tensor], Callable, str]]:
    """(name, run(leaves) -> outputs, leaves, context factory, note) for every attention
    implementation over the pack's q, k, v [T, H, D] (layout conversions done here, untimed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dinofast.ops.rope2d import RopeSpec
    from dinofast.ops.varlen_attention import varlen_attention

    impls = []
    for b in ctx.backends:
        for rope in (False, True):
            spec = RopeSpec(pk.grids_t, pk.P) if rope else None
            impls.append((f"dinofast[{b}]" + (" + fused RoPE" if rope else ""),
                          lambda L, spec=spec: varlen_attention(*L, pk.cu_t, pk.max_len, rope=spec),
                          _leaves(q, k, v), lambda b=b: _backend.backend(b), "packed, no padding"))
    n, H, D = len(pk.grids), q.shape[1], q.shape[2]
    padded = []
    for i, x in enumerate((q, k, v)):
        buf = randn((n, pk.max_len, H, D), x.dtype, x.device, 20 + i)  # padding rows: random, not zeros
        for j, (a, b) in enumerate(pk.segments()):
            buf[j, :b - a] = x[a:b]
        padded.append(buf.transpose(1, 2).contiguous())
    per_image = [[x[a:b].transpose(0, 1)[None].contiguous() for a, b in pk.segments()] for x in (q, k, v)]
    flat_per_image = [t for group in per_image for t in group]

    def per_image_run(L):  # L: n q's, then n k's, then n v's
        return [F.scaled_dot_product_attention(L[i], L[n + i], L[2 * n + i]) for i in range(n)]
    for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION)):
        impls.append((f"SDPA {label}, padded", lambda L: F.scaled_dot_product_attention(*L), _leaves(*padded),
                      lambda backend=backend: sdpa_kernel(backend),
                      f"[{n}, H, {pk.max_len}, D] without a key mask: the padded work (pad/unpad untimed)"))

        impls.append((f"SDPA {label}, per image", per_image_run, _leaves(*flat_per_image),
                      lambda backend=backend: sdpa_kernel(backend), f"{n} calls"))
    try:
        from torch.nn.attention.flex_attention import create_block_mask

        doc = torch.repeat_interleave(torch.arange(n, device=q.device),
                                      torch.tensor([b - a for a, b in pk.segments()], device=q.device))

        def same_image(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

        compiled = ctx.device.type == "cuda"
        block_mask = create_block_mask(same_image, 1, 1, pk.T, pk.T, device=q.device)
        flex = _flex_attention(compiled)
        impls.append(("FlexAttention, document mask" + (" (compiled)" if compiled else " (eager)"),
                      lambda L: flex(*L, block_mask=block_mask),
                      _leaves(*(x.transpose(0, 1)[None].contiguous() for x in (q, k, v))),
                      contextlib.nullcontext, "packed [1, H, T, D], block mask from image ids"))
    except Exception as err:  # noqa: BLE001 -- torch without (working) FlexAttention: say so in the report
        impls.append(("FlexAttention, document mask", None, [], contextlib.nullcontext, f"{type(err).__name__}: {err}"))
    varlen_attn = getattr(getattr(torch.nn.attention, "varlen", None), "varlen_attn", None)
    if varlen_attn is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
    if varlen_attn is not None:
        impls.append(("torch varlen_attn", lambda L: varlen_attn(*L, pk.cu_t, pk.cu_t, pk.max_len, pk.max_len),
                      _leaves(q, k, v), contextlib.nullcontext, "torch.nn.attention.varlen"))
    else:
        impls.append(("torch varlen_attn", None, [], contextlib.nullcontext,
                      f"not in torch {torch.__version__}"))
    return impls


@timing_case("varlen_attention", per_pack=True)
def _time_attention_pack(ctx: Context, clock: Clock, pk: Pack) -> list[dict]:
    s, rows = ctx.sizes, []
    q, k, v = (randn((pk.T, s.heads, s.head_dim), TIMING_DTYPE, ctx.device, seed) for seed in (30, 31, 32))
    # useful work only (padding excluded); the backward is counted as 2.5 forwards, as flash-attention does
    flops = 4 * s.heads * s.head_dim * sum((b - a) ** 2 for a, b in pk.segments())
    for name, run, leaves, context, note in attention_impls(ctx, pk, q, k, v):
        for direction, timer, work in (("fwd", _forward_timer, flops), ("bwd", _backward_timer, 2.5 * flops)):
            fn = _unavailable(note) if run is None else _guarded(timer, run, leaves, context=context)
            rows.append(timing_row(ctx, clock, f"attention {direction}", pk.name, name, fn, context=context,
                                   note=note, flops=work))
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _guarded(timer: Callable, run: Callable, leaves, context: Callable) -> Callable:
    """timer(run, leaves) built under context(); a set-up error becomes a skipped row's reason."""
    try:
        with context():
            return timer(run, leaves)
    except Exception as err:  # noqa: BLE001 -- any failure of a peer here is reported, not fatal
        return _unavailable(f"{type(err).__name__}: {err}")


class _Unavailable(RuntimeError):
    """An implementation that could not be set up here (its message says why)."""


def _unavailable(why: str) -> Callable:
    def fn():
        raise _Unavailable(why)
    return fn


@timing_case("rope2d", per_pack=True)
def _time_rope2d_pack(ctx: Context, clock: Clock, pk: Pack) -> list[dict]:
    from dinofast.ops.rope2d import rope2d

    s, rows = ctx.sizes, []
    q, k = (randn((pk.T, s.heads, s.head_dim), TIMING_DTYPE, ctx.device, seed) for seed in (40, 41))
    moved = 4 * q.numel() * q.element_size()  # read q, k; write both rotated
    q2, k2 = torch.empty_like(q), torch.empty_like(k)

    def copy_floor():
        q2.copy_(q)
        k2.copy_(k)

    def dinofast_rope():
        return rope2d(q, k, pk.grids_t, num_prefix_tokens=pk.P, cu_seqlens=pk.cu_t)

    for b in ctx.backends:
        rows.append(timing_row(ctx, clock, "rope2d (packed)", pk.name, f"dinofast[{b}]", dinofast_rope,
                               context=lambda b=b: _backend.backend(b), bytes_moved=moved))
    rows.append(timing_row(ctx, clock, "rope2d (packed)", pk.name, "torch (transformers' formula, per image)",
                           lambda: torch_rope(q, k, pk), bytes_moved=moved, note="eager"))
    rows.append(timing_row(ctx, clock, "rope2d (packed)", pk.name, "device copy of q and k (floor)",
                           copy_floor, bytes_moved=moved))
    return rows


@timing_case("pixel_shuffle_project", per_pack=True)
def _time_psp_pack(ctx: Context, clock: Clock, pk: Pack) -> list[dict]:
    from dinofast.ops.pixel_shuffle_project import pixel_shuffle_project

    s, rows = ctx.sizes, []
    x, w, b, dy = _psp_inputs(ctx, pk, TIMING_DTYPE, 50)
    M, N, K = dy.shape[0], w.shape[0], w.shape[1]
    flops = 2 * M * N * K
    shuffled = torch.cat([pixel_shuffle(x[None, a:e], hp, wp, s.factor, pk.P)[0]
                          for (a, e), (hp, wp) in zip(pk.segments(), pk.grids)])
    kw = {"grids": pk.grids_t, "factor": s.factor, "num_prefix_tokens": pk.P, "cu_seqlens": pk.cu_t}
    impls = [(f"dinofast[{bk}]", lambda L: pixel_shuffle_project(*L, **kw)[0], lambda bk=bk: _backend.backend(bk))
             for bk in ctx.backends]
    impls.append(("torch (shuffle per image + linear)",
                  lambda L: pixel_shuffle_project_reference(*L, **kw)[0], contextlib.nullcontext))
    for name, run, context in impls:
        leaves = _leaves(x, w, b)
        rows.append(timing_row(ctx, clock, "pixel_shuffle_project fwd", pk.name, name,
                               _forward_timer(run, leaves), context=context, flops=flops))
        rows.append(timing_row(ctx, clock, "pixel_shuffle_project bwd", pk.name, name,
                               _guarded(_backward_timer, run, leaves, context=context), context=context,
                               flops=2 * flops))
    rows.append(timing_row(ctx, clock, "pixel_shuffle_project fwd", pk.name, "GEMM alone (floor)",
                           lambda: F.linear(shuffled, w, b), flops=flops, note="pre-shuffled input"))
    rows.append(timing_row(ctx, clock, "pixel_shuffle_project bwd", pk.name, "GEMM alone (floor)",
                           lambda: (dy @ w, dy.t() @ shuffled), flops=2 * flops, note="dA and dW"))
    return rows


@timing_case("models")
def time_models(ctx: Context, clock: Clock) -> list[dict]:
    from dinofast.models.dinov3 import encode_packed, patch_dinov3

    single, mixed = ctx.packs
    plain = copy.deepcopy(base_model(ctx)).to(device=ctx.device, dtype=TIMING_DTYPE)
    patched = patch_dinov3(copy.deepcopy(plain))
    image = randn((1, 3, *ctx.sizes.single), TIMING_DTYPE, ctx.device, 60)
    images = [randn((3, h, w), TIMING_DTYPE, ctx.device, 61 + i) for i, (h, w) in enumerate(mixed.sizes)]
    no_grad = torch.no_grad
    rows = [
        timing_row(ctx, clock, "DINOv3 forward", single.name, "dinofast (patched)",
                   lambda: patched(image), context=no_grad),
        timing_row(ctx, clock, "DINOv3 forward", single.name, "transformers (SDPA)",
                   lambda: plain(image), context=no_grad),
        timing_row(ctx, clock, "DINOv3 forward", mixed.name, "dinofast encode_packed",
                   lambda: encode_packed(patched, images), context=no_grad),
        timing_row(ctx, clock, "DINOv3 forward", mixed.name, "transformers per image",
                   lambda: [plain(im[None]) for im in images], context=no_grad),
    ]
    return rows


@timing_case("vision_tower")
def time_vision_tower(ctx: Context, clock: Clock) -> list[dict]:
    tower, images, per_image = _tower_case(ctx, TIMING_DTYPE)
    plain = copy.deepcopy(base_model(ctx)).to(device=ctx.device, dtype=TIMING_DTYPE)
    shape, no_grad = ctx.packs[1].name, torch.no_grad
    return [
        timing_row(ctx, clock, "VisionTower", shape, "dinofast VisionTower", lambda: tower(images), context=no_grad),
        timing_row(ctx, clock, "VisionTower", shape, "transformers + nanoVLM projector per image",
                   lambda: per_image(plain, TIMING_DTYPE), context=no_grad),
    ]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
# --quick: the backend-table tests, less the two that start fresh interpreters (seconds each)
QUICK_TESTS = ("tests/test_backend.py", "-k", "not warns_once_and_falls_back")


def run_tests(ctx: Context, timeout_s: float) -> dict:
    """pytest over tests/ (QUICK_TESTS in --quick) in a subprocess on the device; counts from its
    JUnit XML, output in DIR/pytest.log."""
    tests_dir = REPO_ROOT / "tests"
    if not tests_dir.is_dir():
        return {"status": "skipped", "reason": f"no tests/ next to the package ({tests_dir})"}
    # test_bench.py runs this command's CPU quick mode: not part of measuring a device (and no recursion)
    targets = list(QUICK_TESTS) if ctx.quick else ["tests/", "--ignore=tests/test_bench.py"]
    xml = ctx.out_dir / "pytest.xml"
    cmd = [sys.executable, "-m", "pytest", *targets, "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    env = dict(os.environ)
    env.pop(BREAK_ENV, None)
    if ctx.device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the tests pick CUDA whenever they see it
        env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # as this process (see --threads)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
        output, rc, status = proc.stdout + proc.stderr, proc.returncode, "ran"
    except subprocess.TimeoutExpired as err:
        output = ((err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or ""))
        rc, status = None, f"timed out after {timeout_s:.0f} s"
    (ctx.out_dir / "pytest.log").write_text(output)
    result = {"status": status, "command": " ".join(cmd[1:]), "returncode": rc, "seconds": time.perf_counter() - t0,
                  "device": ctx.device.type, "tail": output[-1500:]}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n, fail, err, skip = (int(suite.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
        result.update(tests=n, passed=n - fail - err - skip, failed=fail, errors=err, skipped=skip,
                      not_passed=[f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                                  if case.find("failure") is not None or case.find("error") is not None][:100])
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                             check=False)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, quick: bool) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import dinofast

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": str(device), "device_name": name, "quick": quick, "torch": torch.__version__,
            "triton": triton_version,
                "cuda": torch.version.cuda, "dinofast": dinofast.__version__, "git_commit": _git_commit(),
                "python": platform.python_version(), "threads": torch.get_num_threads(),
                "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "backends": measured_backends(device)}


def _fmt(x, spec=".3g") -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec)


def render_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# dinofast bench: {env['device_name']} ({env['device']}{', quick' if env['quick'] else ''})", "",
             (f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, dinofast {env['dinofast']}, "
             f"commit {env['git_commit']}, {env['date_utc']}. dinofast backends measured: "
             f"{', '.join(env['backends'])}."), ""]
    summary = report.get("summary", {})
    if summary:
        lines += [(f"**Parity: {summary.get('parity_pass', 0)} PASS, {summary.get('parity_fail', 0)} FAIL, "
                  f"{summary.get('parity_skip', 0)} SKIP. Tests: {summary.get('tests', '—')}.**"), ""]
    c = report.get("ceilings")
    if c:
        lines += ["## Ceilings (measured)", "", "| what | value |", "|---|---|",
                  f"| device copy, {c['copy_mb']} MB (read + write) | {c['copy_gbps']:.0f} GB/s |"]
        lines += [f"| matmul {k.split('_')[1]}, n = {c['matmul_n']} | {v:.1f} TFLOP/s |"
                  for k, v in c.items() if k.startswith("matmul_") and k.endswith("_tflops")]
        lines.append("")
    if report.get("parity"):
        lines += ["## Parity (flash-attention's rule: err dinofast <= 2 x err torch same dtype + 1e-5 max|ref|)", "",
                  "Max abs error against the reference (fp64 for ops, fp32 for models, same rounded inputs).", "",
                  "| op | shape | dtype | backend | output | err dinofast | err torch | ratio | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in report["parity"]:
            verdict = r["verdict"] + (f" ({r['error'][:120]})" if r.get("error") else "")
            lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['backend']} | {r['output']} | "
                         f"{_fmt(r['err_dinofast'])} | {_fmt(r['err_torch'])} | {_fmt(r['ratio'], '.2f')} | "
                         f"{verdict} |")
        lines.append("")
    if report.get("timing"):
        lines += ["## Timing (median ms; TFLOP/s of useful work; % of the measured ceiling)", "",
                  "| op | shape | impl | ms | TFLOP/s | GB/s | % roofline | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["timing"]:
            note = r["note"] if not r["skipped"] else f"skipped: {r['skipped']}"
            lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {_fmt(r['ms'], '.4g')} | "
                         f"{_fmt(r['tflops'], '.1f')} | "
                         f"{_fmt(r['gbps'], '.0f')} | {_fmt(r['roofline_pct'], '.0f')} | {note} |")
        lines.append("")
    t = report.get("tests")
    if t:
        lines += ["## Test-suite on the device", "", f"`{t.get('command', '')}`: {t.get('status')}"
                  + (f", {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped "
                     f"in {t['seconds']:.0f} s" if "tests" in t else f" ({t.get('reason', '')})"), ""]
        lines += [f"- FAILED {name}" for name in t.get("not_passed", [])] + [""] * bool(t.get("not_passed"))
    for name, err in report.get("section_errors", {}).items():
        lines += [f"**Section `{name}` crashed: {err[:500]}**", ""]
    for name, why in report.get("sections_not_run", {}).items():
        lines += [f"Section `{name}` not run: {why}.", ""]
    if report.get("seconds"):
        lines += ["## Section times (s)", "", " | ".join(f"{k}: {v:.1f}" for k, v in report["seconds"].items()), ""]
    return "\n".join(lines)


def write_report(ctx: Context) -> None:
    rows = ctx.report.get("parity", [])
    t = ctx.report.get("tests") or {}
    ctx.report["summary"] = {
        "parity_pass": sum(r["verdict"] == "PASS" for r in rows),
        "parity_fail": sum(r["verdict"] == "FAIL" for r in rows),
        "parity_skip": sum(r["verdict"] == "SKIP" for r in rows),
        "tests": (f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped"
               if "tests" in t else t.get("status", "not run"))}
    ctx.out_dir.mkdir(parents=True, exist_ok=True)

    def clean(x):  # JSON has no inf/NaN: write them as strings
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    (ctx.out_dir / "report.json").write_text(json.dumps(clean(ctx.report), indent=1))
    (ctx.out_dir / "report.md").write_text(render_markdown(ctx.report))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
SECTIONS = ("ceilings", "parity", "timing", "tests")
TESTS_RESERVE_S = 150.0  # timing cases that would start later than budget - this are skipped (and said so)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--out", required=True, type=Path, help="directory for report.md and report.json")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a small test file (for CPU and CI)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads, also for the test-suite (default: torch's; 1 with --quick, where "
                             "OpenMP wake-ups on a shared CI machine cost more than the tiny work)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall-clock budget; the test-suite gets what the other sections left (default 480)")
    return parser


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("dinofast bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(f"dinofast bench: --sections: expected names from {SECTIONS}, got {unknown}", file=sys.stderr)
        return 2
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads is not None:
        if threads < 1:
            print(f"dinofast bench: --threads: expected a positive int, got {threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(threads)
    start = time.perf_counter()
    ctx = Context(device=device, quick=args.quick, sizes=QUICK if args.quick else FULL, out_dir=args.out,
                  backends=measured_backends(device), report={}, break_case=os.environ.get(BREAK_ENV, ""))
    ctx.report.update(environment=environment(device, args.quick), sizes=asdict(ctx.sizes), seconds={},
                      rule={"factor": RULE_FACTOR, "floor": RULE_FLOOR, "metric": "max abs error"})
    write_report(ctx)
    clock = Clock(device, ctx.sizes.flush_mb) if {"ceilings", "timing"} & set(sections) else None

    def section(name, fn):
        """Run one section; a crash is recorded (and printed) and the next section still runs."""
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        try:
            fn()
        except Exception as err:  # noqa: BLE001 -- one broken section must not lose the others' numbers
            traceback.print_exc()
            ctx.report.setdefault("section_errors", {})[name] = f"{type(err).__name__}: {err}"
        ctx.report["seconds"][name] = time.perf_counter() - t0
        write_report(ctx)

    if "ceilings" in sections:
        section("ceilings", lambda: ctx.ceilings.update(measure_ceilings(ctx, clock)))
        ctx.report["ceilings"] = ctx.ceilings
    if "parity" in sections:
        ctx.report["parity"] = []
        with _fp32_exact():
            for name, fn in PARITY_CASES.items():
                section(f"parity: {name}", lambda fn=fn: ctx.report["parity"].extend(fn(ctx)))
    if "timing" in sections:
        ctx.report["timing"] = []
        reserve = TESTS_RESERVE_S if "tests" in sections else 0.0
        for name, fn in TIMING_CASES.items():
            if time.perf_counter() - start > args.budget_s - reserve:  # leave the test-suite its time
                ctx.report.setdefault("sections_not_run", {})[f"timing: {name}"] = (
                    f"past the budget ({args.budget_s:.0f} s less {reserve:.0f} s kept for the tests)")
                continue
            section(f"timing: {name}", lambda fn=fn: ctx.report["timing"].extend(fn(ctx, clock)))
    ctx._model = None
    clock = None
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the test-suite's process needs the memory
    if "tests" in sections:
        left = args.budget_s - (time.perf_counter() - start)
        section("tests", lambda: ctx.report.update(tests=run_tests(ctx, max(60.0, left - 10))))
    ctx.report["seconds"]["total"] = time.perf_counter() - start
    write_report(ctx)
    summary = ctx.report["summary"]
    tests = ctx.report.get("tests") or {}
    print(render_markdown(ctx.report))
    print(f"[bench] wrote {ctx.out_dir / 'report.md'} and report.json in {time.perf_counter() - start:.0f} s")
    tests_failed = (tests.get("failed", 0) + tests.get("errors", 0) > 0
                    or str(tests.get("status", "")).startswith("timed"))
    parity_crashed = any(name.startswith("parity") for name in ctx.report.get("section_errors", {}))
    return 1 if summary["parity_fail"] or parity_crashed or tests_failed else 0


def cli(argv: list[str] | None = None) -> int:
    """Entry point of `python -m dinofast bench ...` (argv without the subcommand)."""
    from dinofast._cli import Parser

    parser = add_arguments(Parser(prog="dinofast bench", description=__doc__))
    return main(parser.parse_args(argv))
