"""varlen_attention on mixed-resolution batches (patch 16, 5 prefix tokens, D 64, H 12 and 16),
forward and forward+backward, fp32 on CPU / bf16 on GPU.

Rows per group: each backend with and without fused RoPE, rope2d followed by the backend's
attention (what fused RoPE must beat), the per-image SDPA loop, one padded SDPA call with a key
mask, and on GPU flash-attn's varlen kernel and FlexAttention with a document mask where present.

On CPU, test_varlen_attention_cpu_dtypes times bf16 against fp32 in one process, rows interleaved
(see benchmarks/conftest.py interleaved), at DINOFAST_BENCH_THREADS torch threads (default 2):
  cpp bf16               varlen attention on bf16 gemms (oneDNN brgemm; AMX) where the CPU has them
  cpp bf16 fp32-gemms    the same call with oneDNN disabled: bf16 converted to fp32
  cpp fp32
  sdpa-per-image bf16/fp32    the per-image SDPA loop (torch's CPU flash attention)
  flex-attention bf16/fp32    torch.compile(flex_attention) with a document mask (forward only:
                              FlexAttention has no CPU backward)
  gemm floor bf16/fp32        one [T, 768] x [768, n] matmul (oneDNN/MKL at their best, large shapes)
                              of the same FLOPs as the attention's gemms: what those FLOPs cost at
                              this CPU's GEMM rate, softmax not counted. "row / gemm floor" bounds
                              what any kernel in that dtype could gain over that row here.
Medians and ratios are printed (-s) and stored in the benchmark's extra_info.
"""
import functools
import os
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

import dinofast
from benchmarks.conftest import DEVICE, THREADS, interleaved, speed_backends

P, D = 5, 64
BATCHES = {
    "4-sizes": [(224, 224), (512, 384), (768, 512), (1024, 768)],
    # 8 sizes drawn once (seeded) between 224 and 1024, multiples of the 16-pixel patch
    "8-random": [(16 * random.Random(7 + i).randint(14, 64), 16 * random.Random(101 + i).randint(14, 64))
                 for i in range(8)],
}
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


@functools.lru_cache(maxsize=2)
def packed(batch: str, H: int):
    grids = [(h // 16, w // 16) for h, w in BATCHES[batch]]
    lengths = [P + gh * gw for gh, gw in grids]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    g = torch.Generator().manual_seed(0)
    T = cu[-1]
    q, k, v, grad = (torch.randn(T, H, D, generator=g).to(DEVICE, DTYPE) for _ in range(4))
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    grids_t = torch.tensor(grids, dtype=torch.int32, device=DEVICE)
    return q, k, v, grad, cu_t, grids_t, max(lengths)


def padded(batch: str, H: int):
    """[B, H, Lmax, D] copies of the packed q, k, v and a [B, 1, 1, Lmax] key mask."""
    q, k, v, grad, cu, _, max_len = packed(batch, H)
    cu_l = cu.tolist()
    B = len(cu_l) - 1
    out = []
    for x in (q, k, v, grad):
        pad = x.new_zeros(B, max_len, H, D)
        for i in range(B):
            pad[i, : cu_l[i + 1] - cu_l[i]] = x[cu_l[i]:cu_l[i + 1]]
        out.append(pad.transpose(1, 2).contiguous())
    mask = torch.zeros(B, 1, 1, max_len, dtype=torch.bool, device=DEVICE)
    for i in range(B):
        mask[i, ..., : cu_l[i + 1] - cu_l[i]] = True
    return (*out, mask)


def with_grad(*xs):
    return [x.detach().requires_grad_(True) for x in xs]


def step(fn, inputs, grad, backward: bool):
    """fn(*inputs) and, for fwd+bwd, its backward with `grad`."""
    if not backward:
        with torch.no_grad():
            return fn(*inputs)
    out = fn(*inputs)
    out.backward(grad)
    return out


def attention_flops(cu, backward: bool) -> float:
    """Gemm FLOPs of attention over the packed segments (H 12): QK^T and PV, 2 N^2 D each; the
    backward adds five gemms of that size to the forward's two."""
    cu_l = cu.tolist()
    flops = sum(4 * (b - a) ** 2 * D * 12 for a, b in zip(cu_l[:-1], cu_l[1:]))
    return flops * (3.5 if backward else 1.0)


def gemm_of_equal_flops(flops: float, dtype):
    """A matmul [T, 768] x [768, n] of (about) `flops` FLOPs: the attention's gemm work at the rate
    torch's GEMM (MKL fp32, oneDNN bf16) reaches on large shapes."""
    m, k = 5620, 768
    n = max(64, round(flops / (2 * m * k) / 64) * 64)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(m, k, generator=g).to(DEVICE, dtype), torch.randn(k, n, generator=g).to(DEVICE, dtype)
    out = torch.empty(m, n, device=DEVICE, dtype=dtype)
    return lambda: torch.mm(a, b, out=out)


def sdpa_per_image(cu):
    cu_l = cu.tolist()

    def run(q, k, v):
        outs = []
        for a, b in zip(cu_l[:-1], cu_l[1:]):
            o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None],
                                               v[a:b].transpose(0, 1)[None])
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)
    return run


def gpu_rows():
    rows = []
    if DEVICE.type != "cuda":
        return rows
    try:
        import flash_attn  # noqa: F401
        rows.append("flash-attn-varlen")
    except ImportError:
        pass
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        rows.append("flex-attention")
    except ImportError:
        pass
    return rows


# The reference (a per-image SDPA loop plus an explicit lse) is timed plain only: it is the oracle.
FAST = [b for b in speed_backends() if b != "reference"]
ROWS = ([f"{b}" for b in speed_backends()] + [f"{b}+fused-rope" for b in FAST] + [f"rope2d+{b}" for b in FAST]
        + ["sdpa-per-image", "sdpa-padded"] + gpu_rows())


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("H", [12, 16])
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("row", ROWS)
def test_varlen_attention(bench, row, batch, H, mode):
    q, k, v, grad, cu, grids, max_len = packed(batch, H)
    backward = mode == "fwd+bwd"
    group = f"varlen_attention {batch} H={H} {mode}"
    spec = dinofast.RopeSpec(grids, P)
    inputs = with_grad(q, k, v) if backward else (q, k, v)
    if row in dinofast.BACKENDS:
        fn = functools.partial(dinofast.varlen_attention, cu_seqlens=cu, max_seqlen=max_len)
        bench(lambda: step(fn, inputs, grad, backward), group, backend=row)
    elif row.endswith("+fused-rope"):
        fn = functools.partial(dinofast.varlen_attention, cu_seqlens=cu, max_seqlen=max_len, rope=spec)
        bench(lambda: step(fn, inputs, grad, backward), group, backend=row.split("+")[0])
    elif row.startswith("rope2d+"):
        def fn(q, k, v):
            rq, rk = dinofast.rope2d(q, k, grids, num_prefix_tokens=P, cu_seqlens=cu)
            return dinofast.varlen_attention(rq, rk, v, cu, max_len)
        bench(lambda: step(fn, inputs, grad, backward), group, backend=row.split("+")[1])
    elif row == "sdpa-per-image":
        bench(lambda: step(sdpa_per_image(cu), inputs, grad, backward), group)
    elif row == "sdpa-padded":
        pq, pk, pv, pgrad, mask = padded(batch, H)
        pinputs = with_grad(pq, pk, pv) if backward else (pq, pk, pv)
        fn = functools.partial(F.scaled_dot_product_attention, attn_mask=mask)
        bench(lambda: step(fn, pinputs, pgrad, backward), group)
    elif row == "flash-attn-varlen":
        from flash_attn import flash_attn_varlen_func
        fn = functools.partial(flash_attn_varlen_func, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                               max_seqlen_k=max_len)
        bench(lambda: step(fn, inputs, grad, backward), group)
    elif row == "flex-attention":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        T = q.shape[0]
        doc = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=DEVICE), (cu[1:] - cu[:-1]).long(),
                                      output_size=T)
        block_mask = create_block_mask(lambda b, h, i, j: doc[i] == doc[j], None, None, T, T, device=DEVICE)
        flex = torch.compile(flex_attention)

        def fn(q, k, v):
            return flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                        block_mask=block_mask)[0].transpose(0, 1)
        bench(lambda: step(fn, inputs, grad, backward), group)


CPU_ROUNDS = 7


def flex_document_attention(cu):
    """torch.compile(flex_attention) over the pack with a document mask; [T, H, D] in and out."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T = int(cu[-1])
    doc = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), (cu[1:] - cu[:-1]).long(),
                                  output_size=T)
    block_mask = create_block_mask(lambda b, h, i, j: doc[i] == doc[j], None, None, T, T, device=cu.device)
    flex = torch.compile(flex_attention)

    def run(q, k, v):
        return flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                    block_mask=block_mask)[0].transpose(0, 1)
    return run


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_varlen_attention_cpu_dtypes(benchmark, mode):
    if DEVICE.type != "cpu" or "cpp" not in speed_backends():
        pytest.skip(reason="CPU rows of the cpp backend")
    backward = mode == "fwd+bwd"
    q32, k32, v32, g32, cu, _, max_len = packed("4-sizes", 12)
    benchmark.group = f"varlen_attention cpu dtypes 4-sizes H=12 {mode}"
    cpp = functools.partial(dinofast.varlen_attention, cu_seqlens=cu, max_seqlen=max_len)

    def cpp_fp32_gemms(q, k, v):
        with torch.backends.mkldnn.flags(enabled=False):
            return cpp(q, k, v)

    def cpp_brgemm_only(q, k, v):  # every bf16 gemm on oneDNN's brgemm, none on AMX tiles of its own
        os.environ["DINOFAST_CPU_ISA"] = "avx512"
        try:
            return cpp(q, k, v)
        finally:
            del os.environ["DINOFAST_CPU_ISA"]

    rows = {}
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        q, k, v, grad = (x.to(dtype) for x in (q32, k32, v32, g32))
        inputs = with_grad(q, k, v) if backward else (q, k, v)
        peers = {f"cpp {name}": cpp, f"sdpa-per-image {name}": sdpa_per_image(cu)}
        if dtype == torch.bfloat16:
            peers["cpp bf16 fp32-gemms"] = cpp_fp32_gemms
            if "DINOFAST_CPU_ISA" not in os.environ:
                peers["cpp bf16 brgemm-only"] = cpp_brgemm_only
        if not backward:
            peers[f"flex-attention {name}"] = flex_document_attention(cu)
        for row, fn in peers.items():
            rows[row] = functools.partial(step, fn, inputs, grad, backward)
        rows[f"gemm floor {name}"] = gemm_of_equal_flops(attention_flops(cu, backward), dtype)
    with dinofast.backend("cpp"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")  # mkldnn.flags()
        medians = interleaved(rows, CPU_ROUNDS)
    flops = attention_flops(cu, backward)
    lines = [f"{benchmark.group}, {THREADS} threads, {CPU_ROUNDS} interleaved rounds"]
    for row, sec in medians.items():
        floor = medians["gemm floor bf16" if "bf16" in row else "gemm floor fp32"]
        lines.append(f"  {row:24s} {sec * 1e3:9.1f} ms  {flops / sec / 1e9:7.1f} GFLOP/s  "
                     f"cpp bf16 is {sec / medians['cpp bf16']:5.2f}x faster  {sec / floor:5.2f}x its gemm floor")
    print("\n".join(lines))
    benchmark.extra_info.update(threads=THREADS, medians_ms={n: t * 1e3 for n, t in medians.items()})
    benchmark.pedantic(lambda: [fn() for fn in rows.values()], rounds=1, iterations=1)
