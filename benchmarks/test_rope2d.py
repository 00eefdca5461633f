"""rope2d across resolutions, batch 1 and 8, H 12, D 64, in both q/k layouts:
  contiguous     [B, H, N, D] tensors
  transformers   [B, N, H, D] buffers seen as [B, H, N, D] (what DINOv3ViTModel hands over)
Rows of one group (one shape and layout) are timed round-robin in one test (see interleaved), at
DINOFAST_BENCH_THREADS torch threads (default 2):
  <backend>                  rope2d, out of place (new q, k); every backend but the reference
  <backend> in place         rope2d_
  transformers-eager         transformers' cos/sin module + apply_rotary_pos_emb
  torch.compile(reference)   the reference, compiled
  clone floor                q.clone(), k.clone(): the floor of an out-of-place op
  copy floor                 copy_ into preallocated buffers: the floor of an in-place op
Groups come in fp32 and bf16 (every row in that dtype), and in two heap states:
  fresh   glibc's free memory is returned to the system (malloc_trim) before every timed call, so
          each out-of-place row, the op and the clone floor alike, pays the page faults of its
          new outputs (7 MB per tensor at 768^2 B=1)
  as-is   no intervention: whether a row's outputs land on pages the previous row left mapped
          depends on glibc's trim threshold and on which row ran before (the fault counts show it)
Medians, ratios, minor page faults per call and each row's fastest call (with its ratio to the
fastest floor call) are printed (-s) and stored in each benchmark's extra_info; the timed body of
the pytest-benchmark row is one round of all rows."""
import ctypes
import functools
import resource
import time

import pytest
import torch

import dinofast
from dinofast.reference.rope2d import rope2d_reference
from benchmarks.conftest import DEVICE, THREADS, interleaved, speed_backends

RESOLUTIONS = {"224": (14, 14), "512": (32, 32), "768": (48, 48), "1024": (64, 64), "640x960": (40, 60)}
P, H, D = 5, 12, 64
ROUNDS = 21


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@functools.lru_cache(maxsize=2)
def inputs(res: str, B: int, layout: str, dtype: str = "fp32"):
    Hp, Wp = RESOLUTIONS[res]
    g = torch.Generator().manual_seed(0)
    dt = DTYPES[dtype]
    if layout == "transformers":
        q, k = (torch.randn(B, P + Hp * Wp, H, D, generator=g).to(DEVICE, dt).transpose(1, 2) for _ in range(2))
    else:
        q, k = (torch.randn(B, H, P + Hp * Wp, D, generator=g).to(DEVICE, dt) for _ in range(2))
    return q, k, (Hp, Wp)


def _malloc_trim():
    """glibc's malloc_trim(0) as a callable, or None where there is no glibc (then no fresh groups)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


MALLOC_TRIM = _malloc_trim() if DEVICE.type == "cpu" else None


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _counting(fn, faults: list, seconds: list):
    """fn, appending each call's minor page faults to `faults` and its time to `seconds` (two
    getrusage calls, ~1 us): the fastest call of a row is what it costs when no other job delays
    it, which on a loaded 2-core box the median may not show (a stalled OpenMP thread)."""
    def run():
        before, t0 = _minor_faults(), time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t0)
        faults.append(_minor_faults() - before)
        return out
    return run


def transformers_eager(q, k, grid):
    """What DINOv3ViTModel does per layer: cos/sin from its rope module, then apply_rotary_pos_emb."""
    from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

    rope = _transformers_rope()
    pixels = torch.empty(1, 3, grid[0] * 16, grid[1] * 16, device=DEVICE)
    cos, sin = rope(pixels)
    return apply_rotary_pos_emb(q, k, cos, sin)


@functools.lru_cache(maxsize=1)
def _transformers_rope():
    from transformers import DINOv3ViTConfig
    from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTRopePositionEmbedding

    cfg = DINOv3ViTConfig(hidden_size=H * D, num_attention_heads=H, patch_size=16)
    return DINOv3ViTRopePositionEmbedding(cfg).to(DEVICE).eval()


torch._dynamo.config.recompile_limit = 64  # one graph per (resolution, batch, layout) group
_compiled_reference = torch.compile(rope2d_reference, fullgraph=True, dynamic=False)


def _rows(q, k, grid):
    # in-place rows rotate their own copies (rotating the shared inputs would compound)
    q_in, k_in = q.clone(), k.clone()
    q_buf, k_buf = torch.empty_like(q), torch.empty_like(k)
    rows = {}
    # the reference backend's eager code is timed as torch.compile(reference) and, as transformers
    # runs it, transformers-eager: its own rows would only lengthen every round on a shared box
    for backend in [b for b in speed_backends() if b != "reference"]:
        def out_of_place(backend=backend):
            with dinofast.backend(backend):
                return dinofast.rope2d(q, k, grid, num_prefix_tokens=P)

        def in_place(backend=backend):
            with dinofast.backend(backend):
                return dinofast.rope2d_(q_in, k_in, grid, num_prefix_tokens=P)
        rows[backend] = out_of_place
        rows[f"{backend} in place"] = in_place
    rows["transformers-eager"] = lambda: transformers_eager(q, k, grid)
    rows["torch.compile(reference)"] = lambda: _compiled_reference(q, k, grid, num_prefix_tokens=P)
    rows["clone floor"] = lambda: (q.clone(), k.clone())
    rows["copy floor"] = lambda: (q_buf.copy_(q), k_buf.copy_(k))
    return rows


@pytest.mark.parametrize("pages", ["fresh", "as-is"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["contiguous", "transformers"])
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("res", list(RESOLUTIONS))
def test_rope2d(benchmark, res, B, layout, dtype, pages):
    if pages == "fresh" and MALLOC_TRIM is None:
        pytest.skip(reason="fresh pages need glibc's malloc_trim on CPU")
    q, k, grid = inputs(res, B, layout, dtype)
    benchmark.group = f"rope2d {res} B={B} {layout} {dtype} {pages}"
    faults, seconds = {}, {}
    rows = {name: _counting(fn, faults.setdefault(name, []), seconds.setdefault(name, []))
            for name, fn in _rows(q, k, grid).items()}
    medians = interleaved(rows, ROUNDS, before=MALLOC_TRIM if pages == "fresh" else None)
    faults = {name: sorted(f)[len(f) // 2] for name, f in faults.items()}
    fastest = {name: min(t) for name, t in seconds.items()}
    compiled = medians["torch.compile(reference)"]
    lines = [f"{benchmark.group}, {THREADS} threads, {ROUNDS} interleaved rounds"]
    for name, sec in medians.items():
        floor = "copy floor" if name.endswith("in place") else "clone floor"
        lines.append(f"  {name:26s} {sec * 1e3:9.3f} ms  {sec / medians[floor]:5.2f}x floor  "
                     f"compile/row {compiled / sec:5.2f}x  {faults[name]:6d} faults/call  "
                     f"fastest {fastest[name] * 1e3:8.3f} ms {fastest[name] / fastest[floor]:5.2f}x floor")
    print("\n".join(lines))
    benchmark.extra_info.update(threads=THREADS, medians_ms={n: s * 1e3 for n, s in medians.items()},
                                minor_faults_per_call=faults, fastest_ms={n: s * 1e3 for n, s in fastest.items()})
    benchmark.pedantic(lambda: [fn() for fn in rows.values()], rounds=1, iterations=1)
