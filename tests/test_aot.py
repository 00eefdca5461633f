"""Every Triton kernel launch dinofast makes compiles for real GPUs (sm_80 A100, sm_90 H100) as it
would launch there (no GPU needed; see tests/aot.py): no register spills, registers and shared
memory within the limits, tensor-core MMAs (mma.sync on sm_80, wgmma on sm_90) where the dots are
fp16/bf16, accurate sin/cos in rope2d."""
import pytest
import torch

from tests.aot import CAPABILITIES, SHARED_MEMORY_LIMIT, compile_gate, gate_scenarios, main_loop

MAX_REGISTERS = 255


@pytest.fixture(scope="module")
def compiled():
    """Every distinct launch of every gate scenario, compiled once per capability (one subprocess)."""
    return compile_gate()


def test_every_kernel_and_capability_is_covered(compiled):
    from dinofast.kernels import pixel_shuffle_project as psp

    kernels = {(c.kernel, c.capability) for c in compiled}
    for name in ("rope2d_kernel", "varlen_fwd_kernel", "varlen_bwd_delta_kernel", "varlen_bwd_dkdv_kernel",
                 "varlen_bwd_dq_kernel", "pixel_shuffle_project_fwd_kernel", "pixel_shuffle_project_bwd_dx_kernel",
                 "pixel_shuffle_project_bwd_dw_kernel"):
        for cap in CAPABILITIES:
            assert (name, cap) in kernels, f"{name} sm_{cap} was never launched by the gate scenarios"
    # every autotune config of every pixel_shuffle_project kernel, in every dtype that may choose it
    for tuned in (psp._fwd_tuned, psp._dx_tuned, psp._dw_tuned):
        for config in tuned.configs:
            want = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
            hits = [c for c in compiled if c.kernel == tuned.fn.__name__ and all(
                f"{k}={v}" in c.name for k, v in config.kwargs.items())
                and f"w{config.num_warps}, s{config.num_stages}]" in c.name]
            dtypes = [t for t, torch_dtype in (("fp32", torch.float32), ("fp16", torch.float16),
                                                  ("bf16", torch.bfloat16)) if psp.keeps(config, torch_dtype)]
            assert dtypes, f"{want}: no dtype may choose it"
            assert {(c.capability, c.dtype) for c in hits} >= {(cap, t) for cap in CAPABILITIES for t in dtypes}, want
    # attention: D 64/80/128 in each dtype
    for D in (64, 80, 128):
        for t in ("fp32", "fp16", "bf16"):
            assert any(c.kernel == "varlen_fwd_kernel" and f"HEAD_DIM={D}," in c.name and c.dtype == t
                       for c in compiled), (D, t)
    assert gate_scenarios()


def test_no_spills_registers_shared_memory(compiled):
    bad = [c.summary() for c in compiled
           if c.spill_stores or c.spill_loads or c.registers > MAX_REGISTERS
           or c.shared > SHARED_MEMORY_LIMIT[c.capability]]
    assert not bad, "\n".join(bad)


def test_tensor_cores_where_dots_are_low_precision(compiled):
    lacking = []
    for c in compiled:
        assert f".target sm_{c.capability}" in c.ptx
        if c.low_precision_dots:
            want = "wgmma" if c.capability == 90 else "mma.sync"
            if want not in c.ptx:
                lacking.append(f"{c.summary()}: no {want}")
    assert not lacking, "\n".join(lacking)
    assert any(c.low_precision_dots and c.capability == 90 and c.kernel == "varlen_fwd_kernel" for c in compiled)


def test_rope2d_uses_accurate_sin_cos(compiled):
    for c in compiled:
        if c.kernel == "rope2d_kernel":
            assert "cos.approx" not in c.ptx and "sin.approx" not in c.ptx, c.summary()


def test_attention_main_loops_hold_no_trig(compiled):
    """RoPE runs once, outside the attention loops: their main loops are pure attention."""
    for c in compiled:
        if c.kernel.startswith("varlen_") and c.kernel != "varlen_bwd_delta_kernel":
            assert c.loop_instructions > 0, c.summary()
            assert "sin." not in c.ptx and "cos." not in c.ptx, c.summary()


def test_main_loop_finder():
    """The SASS loop finder on a hand-written listing: an outer loop holding an inner MMA loop."""
    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        "        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;",
        "        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;",
        "        /*0030*/                   FADD R3, R3, R4 ;",
        "        /*0040*/               @P0 BRA 0x20 ;",
        "        /*0050*/               @P1 BRA 0x10 ;",
        "        /*0060*/                   EXIT ;",
        "        /*0070*/                   BRA 0x70;",
    ])
    assert main_loop(sass) == (3, 8)
