"""`python -m dinofast bench`: the CPU quick mode end to end (the same code the CUDA mode runs), its
report's schema, and that a wrong op makes it fail."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinofast import bench
from dinofast.ops.rope2d import rope2d
from dinofast.reference.rope2d import rope2d_reference
from tests.conftest import make_cu_seqlens, randn

REPO = Path(__file__).resolve().parent.parent

# Every op and model path the bench must verify, with the outputs it compares.
PARITY_OUTPUTS = {
    "rope2d (packed)": {"q", "k"},
    "rope2d (batched)": {"q", "k"},
    "varlen_attention": {"out", "dq", "dk", "dv"},
    "varlen_attention + fused RoPE": {"out", "dq", "dk", "dv"},
    "pixel_shuffle_project": {"y", "dx", "dweight", "dbias"},
    "patched DINOv3 (last_hidden_state)": {"tokens"},
    "encode_packed (all tokens)": {"tokens"},
    "VisionTower (embeds)": {"embeds"},
}
TIMED_OPS = {"attention fwd", "attention bwd", "rope2d (packed)", "pixel_shuffle_project fwd",
             "pixel_shuffle_project bwd", "DINOv3 forward", "VisionTower"}


def run_bench(out: Path, *extra, env=None):
    cmd = [sys.executable, "-m", "dinofast", "bench", "--device", "cpu", "--quick", "--out", str(out), *extra]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = run_bench(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text())


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quick_mode_writes_both_reports(quick_report):
    out, report = quick_report
    md = (out / "report.md").read_text()
    for heading in ("## Ceilings", "## Parity", "## Timing", "## Test-suite on the device"):
        assert heading in md
    env = report["environment"]
    assert env["device"] == "cpu" and env["quick"] is True
    assert env["torch"] == torch.__version__
    for key in ("device_name", "triton", "git_commit", "backends", "date_utc"):
        assert key in env
    c = report["ceilings"]
    assert finite(c["copy_gbps"]) and c["copy_gbps"] > 0
    assert all(finite(c[f"matmul_{d}_tflops"]) and c[f"matmul_{d}_tflops"] > 0 for d in ("bfloat16", "float16"))


def test_quick_mode_parity_rows_cover_every_op_and_were_computed(quick_report):
    _, report = quick_report
    rows = report["parity"]
    seen = {}
    for r in rows:
        seen.setdefault((r["op"], r["dtype"]), set()).add(r["output"])
        assert r["verdict"] == "PASS", r
        assert finite(r["err_dinofast"]) and finite(r["err_torch"]) and finite(r["bound"]), r
        # the rule is only meaningful if the low-precision peer really differs from the reference
        assert r["err_torch"] > 0 and r["ref_max_abs"] > 0, r
        assert r["err_dinofast"] <= r["bound"], r
    for op, outputs in PARITY_OUTPUTS.items():
        for dtype in ("bfloat16", "float16"):
            assert seen.get((op, dtype)) == outputs, (op, dtype, seen.get((op, dtype)))
    assert report["summary"]["parity_fail"] == 0 and report["summary"]["parity_pass"] == len(rows)


def test_quick_mode_times_every_op_against_its_peers(quick_report):
    _, report = quick_report
    rows = report["timing"]
    assert {r["op"] for r in rows} == TIMED_OPS
    for op in TIMED_OPS:
        ran = [r for r in rows if r["op"] == op and r["skipped"] is None]
        assert any(r["impl"].startswith("dinofast") for r in ran), op
        assert any(not r["impl"].startswith("dinofast") for r in ran), f"{op}: no torch peer ran"
        for r in ran:
            assert finite(r["ms"]) and r["ms"] > 0, r
    impls = {r["impl"] for r in rows}
    for peer in ("SDPA flash, padded", "SDPA flash, per image", "SDPA cuDNN, padded", "torch varlen_attn",
                 "GEMM alone (floor)", "device copy of q and k (floor)"):
        assert peer in impls, peer
    assert any(i.startswith("FlexAttention, document mask") for i in impls)
    # rows that cannot run on this device say why instead of vanishing
    assert all(r["skipped"] for r in rows if r["ms"] is None)
    flops_rows = [r for r in rows if r["ms"] is not None and r["op"].startswith(("attention", "pixel"))]
    assert all(finite(r["tflops"]) and finite(r["roofline_pct"]) for r in flops_rows)
    copy_rows = [r for r in rows if r["ms"] is not None and r["op"].startswith("rope2d")]
    assert all(finite(r["gbps"]) and finite(r["roofline_pct"]) for r in copy_rows)


def test_quick_mode_runs_tests_on_the_device(quick_report):
    _, report = quick_report
    t = report["tests"]
    assert t["status"] == "ran" and t["device"] == "cpu"
    assert t["passed"] > 0 and t["failed"] == 0 and t["errors"] == 0


def test_a_broken_op_fails_the_command(tmp_path):
    """DINOFAST_BENCH_BREAK corrupts dinofast's output for the cases it names: exit status 1, and
    exactly those rows FAIL."""
    proc = run_bench(tmp_path, "--sections", "parity", env={bench.BREAK_ENV: "varlen_attention"})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "report.json").read_text())["parity"]
    for r in rows:
        want = "FAIL" if r["op"].startswith("varlen_attention") else "PASS"
        assert r["verdict"] == want, r
    assert "FAIL" in (tmp_path / "report.md").read_text()


def _packed_rope_case(dtype):
    grids = [(3, 5), (4, 2)]  # rectangular: swapping Hp and Wp changes the angles
    P, H, D = 2, 2, 16
    cu = make_cu_seqlens([P + h * w for h, w in grids], device="cpu")
    grids_t = torch.tensor(grids, dtype=torch.int32)
    q, k = (randn(int(cu[-1]), H, D, dtype=dtype, device="cpu", seed=s) for s in (0, 1))
    return q, k, cu, grids_t, P


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parity_rows_fail_a_wrong_implementation(dtype):
    q, k, cu, grids_t, P = _packed_rope_case(dtype)
    pk = bench.Pack("case", [], grids_t.tolist(), cu.tolist(), 0, P, cu, grids_t)

    def reference():
        return rope2d_reference(q.double(), k.double(), grids_t, num_prefix_tokens=P, cu_seqlens=cu)

    def peer():
        return bench.torch_rope(q, k, pk)

    def right():
        return rope2d(q, k, grids_t, num_prefix_tokens=P, cu_seqlens=cu)

    def transposed_grid():  # a plausible bug: (Wp, Hp) instead of (Hp, Wp)
        return rope2d(q, k, grids_t.flip(1).contiguous(), num_prefix_tokens=P, cu_seqlens=cu)

    def unwritten():  # an output element left unwritten (poisoned NaN)
        out = [t.clone() for t in right()]
        out[0][-1, -1, -1] = float("nan")
        return out

    def raises():
        raise RuntimeError("kernel launch failed")

    def verdicts(fn):
        return [r["verdict"] for r in bench.parity_rows("rope2d", "case", dtype, "cpp", ("q", "k"), fn, peer,
                                                         reference)]

    assert verdicts(right) == ["PASS", "PASS"]
    assert verdicts(transposed_grid) == ["FAIL", "FAIL"]
    assert verdicts(unwritten) == ["FAIL", "PASS"]
    rows = bench.parity_rows("rope2d", "case", dtype, "cpp", ("q", "k"), raises, peer, reference)
    assert [r["verdict"] for r in rows] == ["FAIL", "FAIL"] and "kernel launch failed" in rows[0]["error"]


def test_compare_applies_the_factor_two_rule():
    ref = torch.linspace(-1, 1, 101, dtype=torch.float64)
    peer = ref + 1e-3
    within, beyond = ref + 1.9e-3, ref + 2.1e-3
    assert bench.compare("op", "s", torch.bfloat16, "b", ("x",), [within], [peer], [ref])[0]["verdict"] == "PASS"
    assert bench.compare("op", "s", torch.bfloat16, "b", ("x",), [beyond], [peer], [ref])[0]["verdict"] == "FAIL"


def test_clock_and_skipped_rows():
    clock = bench.Clock(torch.device("cpu"), flush_mb=1)
    x = torch.randn(1 << 16)
    assert clock.median_ms(lambda: x.mul(2.0), warmup=1, reps=3) > 0
    ctx = bench.Context(torch.device("cpu"), True, bench.QUICK, Path("."), ["cpp"], {})

    def boom():
        raise RuntimeError("no kernel here")
    row = bench.timing_row(ctx, clock, "op", "shape", "impl", boom)
    assert row["ms"] is None and "no kernel here" in row["skipped"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_mode_without_a_gpu_says_so(tmp_path, capsys):
    assert bench.cli(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_unknown_section_is_refused(tmp_path, capsys):
    assert bench.cli(["--device", "cpu", "--quick", "--sections", "parity,speed", "--out", str(tmp_path)]) == 2
    assert "speed" in capsys.readouterr().err


def test_a_crashing_section_is_reported_and_fails_the_command(tmp_path, monkeypatch):
    def crash(ctx, *args):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(bench, "PARITY_CASES", {"crash": crash})
    monkeypatch.setattr(bench, "TIMING_CASES", {"crash": crash})
    assert bench.cli(["--device", "cpu", "--quick", "--sections", "parity,timing", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["section_errors"]) == {"parity: crash", "timing: crash"}
    assert "out of memory" in (tmp_path / "report.md").read_text()


def test_timing_cases_past_the_budget_are_skipped_and_said_so(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(bench, "TIMING_CASES", {"late": lambda ctx, clock: ran.append(1) or []})
    assert bench.cli(["--device", "cpu", "--quick", "--sections", "timing", "--budget-s", "0",
                      "--out", str(tmp_path)]) == 0
    assert ran == []
    report = json.loads((tmp_path / "report.json").read_text())
    assert "past the budget" in report["sections_not_run"]["timing: late"]
