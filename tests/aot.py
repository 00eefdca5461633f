"""Ahead-of-time Triton compilation for real GPUs on a machine without one.

compile_kernel() builds a @triton.jit kernel for a compute capability (80: A100, 90: H100) and
returns its PTX, shared-memory use and the ptxas register/spill report. See
shared/gpu-less-verification.md.
"""
import os
import re
import subprocess
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
TRITON_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass
class Compiled:
    name: str
    capability: int
    ptx: str
    shared: int
    registers: int
    spill_stores: int
    spill_loads: int

    def summary(self) -> str:
        return (f"{self.name} sm_{self.capability}: {self.registers} regs, {self.shared} B smem, "
                f"{self.spill_stores}/{self.spill_loads} B spill st/ld")


def ptxas_report(ptx: str, capability: int, workdir: str) -> dict:
    arch = "sm_90a" if capability == 90 else f"sm_{capability}"
    src = os.path.join(workdir, "kernel.ptx")
    with open(src, "w") as f:
        f.write(ptx)
    out = subprocess.run([_PTXAS, "-v", "--gpu-name", arch, src, "-o", os.path.join(workdir, "kernel.cubin")],
                         capture_output=True, text=True)
    assert out.returncode == 0, f"ptxas failed for {arch}:\n{out.stderr}"
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
    return dict(registers=int(regs.group(1)), spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)))


def compile_kernel(kernel, pointers: dict, constexprs: dict, capability: int, workdir: str,
                   num_warps: int = 4, num_stages: int = 3, name: str = "", divisible_by_16=()) -> Compiled:
    """pointers: {arg name: triton pointer type such as '*bf16'}; other non-constexpr args are i32.
    divisible_by_16: arg names to compile as a launch would specialise them (pointers 16-byte
    aligned, ints multiples of 16), so the AOT build vectorises and pipelines like the real one."""
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        else:
            signature[arg] = pointers.get(arg, "i32")
    attrs = {(kernel.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in divisible_by_16}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    ptx = compiled.asm["ptx"]
    report = ptxas_report(ptx, capability, workdir)
    return Compiled(name or kernel.fn.__name__, capability, ptx, compiled.metadata.shared, **report)
