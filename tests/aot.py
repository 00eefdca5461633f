"""Ahead-of-time Triton compilation of exactly what dinofast launches, for real GPUs, without one.

A subprocess (TRITON_INTERPRET unset, so kernels are real JITFunctions) runs dinofast's real
Triton launchers on CPU tensors of realistic shapes with every launch intercepted: instead of
running, each kernel launch records its arguments. Autotuned launches record one launch per
config of the autotuner (kernel.configs, whatever they are). Each recorded launch then goes
through Triton's own binder and argument packing for the target GPU (the code JITFunction.run
uses: pointer alignment and integer divisibility by 16 become tt.divisibility, constexprs and
integer specialisations as Triton makes them), and is compiled with triton.compile for sm_80 and
sm_90. ptxas reports registers and spills; cuobjdump's SASS gives the main loop's static
instruction count.

    python -m tests.aot --report   # the projection table (sm_90, bf16) for benchmarks/README.md
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import List

SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
CAPABILITIES = (80, 90)
# H100 SXM: HBM3 bandwidth, dense bf16 tensor-core peak, SMs, boost clock (4 schedulers per SM)
H100 = dict(bytes_per_s=3.35e12, mma_flops=989e12, sms=132, clock_hz=1.83e9, schedulers=4)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Compiled:
    name: str           # kernel[config]
    kernel: str
    scenario: str
    capability: int
    dtype: str
    ptx: str
    shared: int
    registers: int
    spill_stores: int
    spill_loads: int
    num_warps: int
    low_precision_dots: bool   # the kernel's tl.dot operands are fp16/bf16 (else fp32 / no dots)
    loop_instructions: int     # static SASS instructions of the main loop (0: no loop)
    total_instructions: int
    work: dict = field(default_factory=dict)  # projection inputs (see _work)

    def summary(self) -> str:
        return (f"{self.name} [{self.scenario}] sm_{self.capability}: {self.registers} regs, {self.shared} B smem, "
                f"{self.spill_stores}/{self.spill_loads} B spill st/ld, main loop {self.loop_instructions} instr")


# ---------------------------------------------------------------------------------------------
# Scenarios: dinofast's real launchers on CPU tensors (run in the subprocess only)
# ---------------------------------------------------------------------------------------------
def _attention(grids, H, D, dtype_name, rope: bool, prefix: int = 5, coord_transform: bool = False):
    import torch

    from dinofast.ops.rope2d import rope_inv_freq
    from dinofast.ops.varlen_attention import RopeArgs, _triton_backward, _triton_forward

    dtype = getattr(torch, dtype_name)
    lengths = [prefix + h * w for h, w in grids]
    T = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    if rope:
        transform = torch.rand(len(grids), 4) + 0.5 if coord_transform else None  # training-time jitter
        args = RopeArgs(rope_inv_freq(D, 100.0, None, "cpu"), torch.tensor(grids, dtype=torch.int32), transform,
                        prefix)
        q, k, v = (torch.randn(T, H, D, dtype=dtype) for _ in range(3))
    else:  # views of one fused qkv projection, as the model's Linear produces them
        args = None
        q, k, v = torch.randn(T, 3, H, D, dtype=dtype).unbind(1)
    out, dout = torch.empty(T, H, D, dtype=dtype), torch.randn(T, H, D, dtype=dtype)
    lse = torch.empty(H, T, dtype=torch.float32)
    dq, dk, dv = (torch.empty(T, H, D, dtype=dtype) for _ in range(3))
    _triton_forward(q, k, v, out, lse, cu, max(lengths), D ** -0.5, args, None)
    _triton_backward(dout, q, k, v, out, lse, dq, dk, dv, cu, max(lengths), D ** -0.5, args, None)


def _pixel_shuffle_project(dtype_name, packed: bool, grids=((32, 32),), D=1024, s=4, out=960, prefix=5):
    import torch

    from dinofast.kernels.pixel_shuffle_project import backward, forward

    dtype = getattr(torch, dtype_name)
    weight = torch.randn(out, D * s * s, dtype=dtype)
    bias = torch.randn(out, dtype=dtype)
    if packed:
        lengths = [prefix + h * w for h, w in grids]
        x = torch.randn(1, sum(lengths), D, dtype=dtype)
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
        out_lengths = [(h // s) * (w // s) for h, w in grids]
        out_cu = torch.tensor([0] + list(torch.tensor(out_lengths).cumsum(0)), dtype=torch.int32)
        g = torch.tensor(grids, dtype=torch.int32)
        M, hw = sum(out_lengths), (1, 1)
    else:
        (hp, wp), = grids
        x = torch.randn(2, prefix + hp * wp, D, dtype=dtype)
        cu = g = out_cu = None
        M, hw = 2 * (hp // s) * (wp // s), (hp, wp)
    y = torch.empty(M, out, dtype=dtype)
    forward(x, weight, bias, y, cu, g, out_cu, hw, s, prefix)
    backward(torch.randn(M, out, dtype=dtype), x, weight, torch.empty_like(x), torch.empty_like(weight),
             torch.empty(out, dtype=torch.float32), cu, g, out_cu, hw, s, prefix)


def _rope2d_batched(dtype_name, D, H=16, hw=(32, 32), prefix=5):
    import torch

    from dinofast.kernels.rope2d import rope2d
    from dinofast.ops.rope2d import rope_inv_freq

    dtype = getattr(torch, dtype_name)
    q, k = (torch.randn(2, prefix + hw[0] * hw[1], H, D, dtype=dtype) for _ in range(2))
    rope2d(q, k, torch.empty_like(q), torch.empty_like(k), rope_inv_freq(D, 100.0, None, "cpu"), None, None, hw,
           None, prefix, False, q.shape[1])


# A batch of 8 mixed images (patch grids), as a VLM packs them: 5,384 tokens with 5 prefix tokens each
MIXED_8 = [(32, 32), (24, 40), (40, 24), (16, 16), (20, 36), (28, 28), (12, 48), (8, 8)]
VIT_L_1024 = [(64, 64)]  # T = 4,101 with 5 prefix tokens (CLS + 4 registers)


def gate_scenarios() -> dict:
    """name -> callable: every launch the AOT gate compiles (both capabilities)."""
    scenarios = {}
    for dtype in ("float32", "float16", "bfloat16"):
        for D in (64, 80, 128):
            H = 1024 // D if D != 80 else 16
            scenarios[f"attention-rope-{dtype}-D{D}"] = (
                lambda dtype=dtype, D=D, H=H: _attention(MIXED_8[:3], H, D, dtype, True, coord_transform=True))
            scenarios[f"attention-qkv-{dtype}-D{D}"] = (
                lambda dtype=dtype, D=D, H=H: _attention(VIT_L_1024, H, D, dtype, False))
        scenarios[f"rope2d-batched-{dtype}"] = lambda dtype=dtype: _rope2d_batched(dtype, 64)
        for packed in (False, True):
            scenarios[f"pixel_shuffle_project-{'packed' if packed else 'batched'}-{dtype}"] = (
                lambda dtype=dtype, packed=packed: _pixel_shuffle_project(
                    dtype, packed, grids=MIXED_8[:2] if packed else ((32, 32),)))
    return scenarios


def report_scenarios() -> dict:
    return {
        "ViT-L/16 1024^2": lambda: _attention(VIT_L_1024, 16, 64, "bfloat16", True),
        "8 mixed images": lambda: _attention(MIXED_8, 16, 64, "bfloat16", True),
    }


# ---------------------------------------------------------------------------------------------
# Capture: every launch records (kernel, args, kwargs, grid) instead of running
# ---------------------------------------------------------------------------------------------
def capture(scenario) -> list:
    """[(JITFunction, args, kwargs, grid)] of every kernel launch `scenario()` makes; an autotuned
    launch gives one entry per config of its autotuner."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches = []

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs, grid))

    def autotuner_run(self, *args, **kwargs):
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)  # what the autotuner would benchmark for these args
        for config in configs:
            launches.append((self.fn, args, {**kwargs, **config.all_kwargs()}, grid))
        self.best_config = configs[0]  # launchers read it after the call

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, autotuner_run
    try:
        scenario()
    finally:
        JITFunction.run, Autotuner.run = saved
    return launches


def _bind(kernel, args, kwargs, capability):
    """Triton's own specialisation of this launch for the target: (bound args, signature,
    constexprs, attrs, options), exactly as JITFunction.run computes them on that GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return bound, signature, constexprs, attrs, options


# ---------------------------------------------------------------------------------------------
# SASS
# ---------------------------------------------------------------------------------------------
def _nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_loops(sass: str):
    """(instructions, loops): cuobjdump's SASS as [(address, text)], and every loop as (first,
    last) instruction index, from each branch to an earlier address (a back-edge)."""
    instructions = []
    for line in sass.splitlines():
        ins = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if ins:
            instructions.append((int(ins.group(1), 16), ins.group(2)))
    index = {address: i for i, (address, _) in enumerate(instructions)}
    loops = []
    for i, (address, text) in enumerate(instructions):
        branch = re.search(r"\bBRA\b.*?0x([0-9a-f]+)$", text)
        if branch and int(branch.group(1), 16) < address and int(branch.group(1), 16) in index:
            loops.append((index[int(branch.group(1), 16)], i))
    return instructions, loops


def main_loop(sass: str):
    """(loop static instructions, total static instructions): the main loop is the smallest loop
    issuing the most tensor-core MMAs (HGMMA/HMMA), innermost first, else the largest loop that holds no other loop."""
    instructions, loops = sass_loops(sass)
    if not loops:
        return 0, len(instructions)

    def size(loop):
        return loop[1] - loop[0] + 1

    def mmas(loop):
        return sum(bool(re.search(r"\b(HGMMA|HMMA)\.", instructions[i][1])) for i in range(loop[0], loop[1] + 1))

    with_mma = [lp for lp in loops if mmas(lp)]
    if with_mma:  # the loop issuing the most MMAs; of those, the innermost
        most = max(mmas(lp) for lp in with_mma)
        return min(size(lp) for lp in with_mma if mmas(lp) == most), len(instructions)
    innermost = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    return max(size(lp) for lp in innermost), len(instructions)


def _ptxas(ptx: str, capability: int, workdir: str, fp_fusion: bool) -> dict:
    """ptxas as Triton runs it for this target (same binary and flags), with its -v report, and
    the cubin's SASS."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = "sm_90a" if capability == 90 else f"sm_{capability}"
    src, cubin = os.path.join(workdir, "kernel.ptx"), os.path.join(workdir, "kernel.cubin")
    with open(src, "w") as f:
        f.write(ptx)
    fmad = [] if fp_fusion else ["--fmad=false"]
    out = subprocess.run([get_ptxas(capability).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
                          f"--gpu-name={arch}", src, "-o", cubin], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}:\n{out.stderr}")
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
    sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                          check=True).stdout
    loop, total = main_loop(sass)
    return dict(registers=int(regs.group(1)), spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)),
                loop_instructions=loop, total_instructions=total)


# ---------------------------------------------------------------------------------------------
# Projection inputs: useful work of one launch
# ---------------------------------------------------------------------------------------------
def _work(kernel_name: str, bound: dict, grid) -> dict:
    """items: work items that do work; trips: main-loop iterations over all items; mma_flops;
    bytes: every tensor argument read or written once (a lower bound on memory traffic)."""
    import torch

    seen, nbytes = set(), 0
    for value in bound.values():
        if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            nbytes += value.numel() * value.element_size()
    if callable(grid):
        grid = grid(bound)
    programs = 1
    for g in grid:
        programs *= g
    work = dict(items=programs, trips=0, mma_flops=0, bytes=nbytes)
    c = bound
    if kernel_name.startswith("varlen_") and "cu_seqlens_ptr" in bound:
        lengths = (c["cu_seqlens_ptr"][1:] - c["cu_seqlens_ptr"][:-1]).tolist()
        H, D = c["n_heads"] if "n_heads" in c else c["q_ptr"].shape[1], c["HEAD_DIM"]
        bm, bn = c["BLOCK_M"], c["BLOCK_N"]
        outer, inner, gemms = {"varlen_fwd_kernel": (bm, bn, 2), "varlen_bwd_dkdv_kernel": (bn, bm, 4),
                               "varlen_bwd_dq_kernel": (bm, bn, 3)}[kernel_name]
        work.update(items=H * sum(-(-L // outer) for L in lengths),
                    trips=H * sum(-(-L // outer) * -(-L // inner) for L in lengths),
                    mma_flops=2 * gemms * H * D * sum(L * L for L in lengths))
    elif kernel_name.startswith("pixel_shuffle_project"):
        M, N, K = c["M"], c["N_OUT"], c["D"] * c["s"] ** 2
        reduced = {"fwd": (K, c["BLOCK_K"]), "dx": (N, c["BLOCK_N"]), "dw": (M, c["BLOCK_M"])}
        length, block = next(v for key, v in reduced.items() if f"_{key}_" in kernel_name + "_")
        work.update(trips=programs * -(-length // block), mma_flops=2 * M * N * K)
    return work


def _compile_launch(kernel, args, kwargs, grid, capability, workdir) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bound, signature, constexprs, attrs, options = _bind(kernel, args, kwargs, capability)
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", capability, 32), options=options.__dict__)
    ptx = compiled.asm["ptx"]
    dtypes = [signature[n] for n in signature if signature[n].startswith("*")]
    low = "dot(" in str(kernel.src) and any(t in ("*fp16", "*bf16") for t in dtypes[:1])
    if "LOW_PRECISION" in bound:
        low = bool(bound["LOW_PRECISION"])
    elif "UPCAST" in bound:  # pixel_shuffle_project: fp32 inputs take ieee fp32 dots
        low = any(t in ("*fp16", "*bf16") for t in dtypes[:2])
    config = ", ".join(f"{k}={bound[k]}" for k in signature if signature[k] == "constexpr")
    return dict(name=f"{kernel.__name__}[{config}, w{options.num_warps}, s{options.num_stages}]",
                kernel=kernel.__name__, capability=capability, dtype=dtypes[0][1:] if dtypes else "-",
                ptx=ptx, shared=compiled.metadata.shared, num_warps=options.num_warps, low_precision_dots=low,
                **_ptxas(ptx, capability, workdir, options.enable_fp_fusion is not False))


def _compile_scenarios(scenarios: dict, capabilities, every_launch: bool = False) -> list:
    """Every distinct launch of every scenario, compiled once per capability (every_launch: one
    row per launch, for the projection)."""
    results, done = [], {}
    with tempfile.TemporaryDirectory() as workdir:
        for name, scenario in scenarios.items():
            for kernel, args, kwargs, grid in capture(scenario):
                for cap in capabilities:
                    bound, signature, constexprs, attrs, options = _bind(kernel, args, kwargs, cap)
                    key = (kernel.__name__, cap, str(signature), str(constexprs), str(attrs), str(options))
                    new = key not in done
                    if new:
                        done[key] = _compile_launch(kernel, args, kwargs, grid, cap, workdir)
                        c = done[key]
                        print(f"{c['name']} sm_{cap} {c['dtype']}: {c['registers']} regs, {c['shared']} B smem, "
                              f"{c['spill_stores']}/{c['spill_loads']} B spill, loop {c['loop_instructions']}",
                              file=sys.stderr, flush=True)
                    if new or every_launch:
                        results.append(dict(done[key], scenario=name, work=_work(kernel.__name__, bound, grid)))
    return results


def compile_gate(capabilities=CAPABILITIES) -> List[Compiled]:
    """Every launch of gate_scenarios(), compiled for each capability, in one subprocess."""
    return _run_subprocess(["--gate", *map(str, capabilities)])


def _run_subprocess(argv) -> List[Compiled]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-m", "tests.aot", *argv], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    assert out.returncode == 0, f"AOT compile failed:\n{out.stderr[-4000:]}"
    return [Compiled(**r) for r in json.loads(out.stdout)]


# ---------------------------------------------------------------------------------------------
# The projection
# ---------------------------------------------------------------------------------------------
def occupancy(c: Compiled) -> int:
    """CTAs per SM on an H100 from registers (64K per SM, allocated per warp in 256s), shared
    memory (228 KB per SM, 1 KB reserved per CTA) and warps (64 per SM)."""
    regs_per_warp = -(-c.registers * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * c.num_warps)
    by_smem = (228 * 1024) // (c.shared + 1024) if c.shared else 32
    return max(0, min(by_regs, by_smem, 64 // c.num_warps, 32))


def projection(c: Compiled) -> dict:
    """Lower-bound time in us: max(bytes / HBM bandwidth, MMA FLOPs / tensor peak, issued warp
    instructions / (schedulers x SMs x clock)); issued = main loop x trips + the rest x items, per warp."""
    w = c.work
    rest = c.total_instructions - c.loop_instructions
    issued = c.num_warps * (c.loop_instructions * w["trips"] + rest * w["items"])
    times = dict(memory=w["bytes"] / H100["bytes_per_s"], mma=w["mma_flops"] / H100["mma_flops"],
                 issue=issued / (H100["schedulers"] * H100["sms"] * H100["clock_hz"]))
    bound = max(times, key=times.get)
    return dict(us=times[bound] * 1e6, bound=bound, issued=issued)


def print_report(results: List[Compiled]) -> None:
    print("| scenario | kernel | regs | smem (B) | CTAs/SM | main loop (SASS instr) | bytes (MB) | MMA GFLOP "
          "| lower bound (us) | bound by | TFLOP/s at bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    totals = {}
    for c in results:
        p = projection(c)
        w = c.work
        tflops = w["mma_flops"] / (p["us"] * 1e-6) / 1e12 if p["us"] and w["mma_flops"] else 0.0
        totals[c.scenario] = totals.get(c.scenario, 0.0) + p["us"]
        loop = c.loop_instructions if w["trips"] else "-"  # no main loop modelled: the whole kernel per item
        print(f"| {c.scenario} | {c.kernel} | {c.registers} | {c.shared} | {occupancy(c)} | {loop} "
              f"| {w['bytes'] / 1e6:.1f} | {w['mma_flops'] / 1e9:.1f} | {p['us']:.1f} | {p['bound']} "
              f"| {f'{tflops:.0f}' if tflops else '-'} |")
    for scenario, us in totals.items():
        print(f"| {scenario} | **all kernels, forward + backward** | | | | | | | **{us:.1f}** | | |")


def _to_json(results) -> str:
    return json.dumps(results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gate", nargs="*", type=int, help="compile gate_scenarios() for these capabilities; "
                        "print JSON")
    parser.add_argument("--report", action="store_true", help="print the sm_90 bf16 projection table")
    parser.add_argument("--only", default="", help="with --gate: scenarios whose name contains this")
    a = parser.parse_args()
    if "TRITON_INTERPRET" in os.environ and os.environ["TRITON_INTERPRET"] != "0":
        sys.exit("tests.aot compiles real kernels: unset TRITON_INTERPRET")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if a.report:
        found = []
        for name, scenario in report_scenarios().items():
            found += [Compiled(**r) for r in _compile_scenarios({name: scenario}, (90,), every_launch=True)]
        print_report(found)
    else:
        chosen = {k: v for k, v in gate_scenarios().items() if a.only in k}
        sys.stdout.write(_to_json(_compile_scenarios(chosen, tuple(a.gate or CAPABILITIES))))
