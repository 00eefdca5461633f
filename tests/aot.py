"""Ahead-of-time Triton compilation for real GPUs on a machine without one.

compile_specs() builds @triton.jit kernels for compute capabilities (80: A100, 90: H100) and
returns, per kernel, its PTX, shared-memory use and the ptxas register/spill report. It runs in a
subprocess because the test session imports the kernels under TRITON_INTERPRET=1, where they are
interpreter objects that cannot be compiled.

A spec: dict(module="dinofast.kernels.rope2d", kernel="rope2d_kernel", pointers={arg: "*bf16"},
constexprs={...}, capability=90, num_warps=4, num_stages=3). Args not in pointers/constexprs are i32.
Optional divisible_by_16=[arg, ...]: compile those args as a launch specialises them (pointers
16-byte aligned, ints multiples of 16), so the build vectorises and pipelines like the real one.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import List

SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
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


def compile_specs(specs: List[dict]) -> List[Compiled]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "tests.aot"], input=json.dumps(specs), capture_output=True,
                         text=True, env=env, cwd=root)
    assert out.returncode == 0, f"AOT compile failed:\n{out.stderr[-4000:]}"
    return [Compiled(**r) for r in json.loads(out.stdout)]


def _ptxas_report(ptx: str, capability: int, workdir: str) -> dict:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    arch = "sm_90a" if capability == 90 else f"sm_{capability}"
    src = os.path.join(workdir, "kernel.ptx")
    with open(src, "w") as f:
        f.write(ptx)
    out = subprocess.run([ptxas, "-v", "--gpu-name", arch, src, "-o", os.path.join(workdir, "kernel.cubin")],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}:\n{out.stderr}")
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
    return dict(registers=int(regs.group(1)), spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)))


def _compile_one(spec: dict, workdir: str) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    constexprs = spec["constexprs"]
    signature = {arg: "constexpr" if arg in constexprs else spec["pointers"].get(arg, "i32")
                 for arg in kernel.arg_names}
    attrs = {(kernel.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in spec.get("divisible_by_16", ())}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", spec["capability"], 32),
        options={"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)},
    )
    ptx = compiled.asm["ptx"]
    return dict(name=spec.get("name", spec["kernel"]), capability=spec["capability"], ptx=ptx,
                shared=compiled.metadata.shared, **_ptxas_report(ptx, spec["capability"], workdir))


if __name__ == "__main__":
    specs = json.loads(sys.stdin.read())
    with tempfile.TemporaryDirectory() as workdir:
        results = [_compile_one(s, workdir) for s in specs]
    sys.stdout.write(json.dumps(results))
