"""The `dinofast` command line: the subcommand list, --version, complete help texts, one meaning of
-1, and the main job (`check`) reporting shapes, tolerance and PASS/FAIL, exiting non-zero when a
backend is broken."""
import os
import subprocess
import sys

import pytest

import dinofast
import dinofast.__main__ as cli
from dinofast import _backend, _checks
from dinofast.ops import rope2d as rope2d_module


def run_python(*args, timeout=300, check=False):
    """`python ARGS` in a subprocess that imports dinofast from this checkout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, check=check,
                          timeout=timeout)


def run_module(*args, timeout=300):
    return run_python("-m", "dinofast", *args, timeout=timeout)


def test_help_lists_every_subcommand_with_a_summary(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert {"check", "extract", "pca", "convert"} <= set(cli.SUBCOMMANDS)
    for name, (_, summary) in cli.SUBCOMMANDS.items():
        assert any(line.split()[:1] == [name] and summary in line for line in text.splitlines()), name
    assert "--version" in text and "Subcommands live" not in text  # no internal text


def test_version():
    r = run_module("--version", timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"dinofast {dinofast.__version__}"


@pytest.mark.parametrize("name", ["check", "extract", "pca", "convert"])
def test_every_subcommand_has_complete_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: ") and f"dinofast {name}" in text.splitlines()[0]
    if name == "extract":
        from dinofast import extract

        # the whole description, not its first line cut mid-sentence
        assert "scaled out with torchrun." in text and "are done again), and skips every image" in text
        for opt, default in (("--max-side", "768"), ("--max-tokens-per-batch", "16384"), ("--dtype", "float32"),
                             ("--device", "auto"), ("--shard-mb", "1024.0"), ("--layers", "none")):
            options = text[text.index("options:"):]
            block = " ".join(options[options.index(opt + " "):].split())
            assert f"(default: {default})" in block[:block.index(" --", 3)], opt
        for opt in ("--model", "--images", "--out", "--retry-errors", "--check", "--workers", "--no-progress"):
            assert opt in text
        assert extract.SUMMARY
    if name == "pca":
        for opt in ("--out", "--limit", "--images-root", "--max-side", "--layer"):
            assert opt in text


def test_minus_one_means_the_last_layer_before_the_norm_everywhere(capsys):
    """One meaning of -1: encode_packed's output_layers, extract --layers and pca --layer all take
    it as the last transformer layer before the final norm (transformers' hidden_states[-1])."""
    with pytest.raises(SystemExit):
        cli.main(["extract", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "-1 = the last layer before the norm" in text and "The final normed output is always stored" in text
    doc = " ".join(dinofast.encode_packed.__doc__.split())
    assert "negative from the end" in doc and "before the final norm" in doc
    from dinofast import extract

    assert extract.resolve_layers([-1, 0, 1], 2) == [0, 1]
    with pytest.raises(SystemExit):
        cli.main(["pca", "--help"])
    assert "same indices as extract --layers" in " ".join(capsys.readouterr().out.split())


def test_unknown_subcommand_is_one_line_and_exit_2(capsys):
    assert cli.main(["extrct"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown subcommand 'extrct'" in err and "extract" in err
    assert cli.main(["check", "--op", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--op" in err


needs_cpp = pytest.mark.skipif(_backend.why_unavailable("cpp", "cpu") is not None,
                               reason=f"cpp backend: {_backend.why_unavailable('cpp', 'cpu')}")


@needs_cpp
def test_check_reports_shapes_tolerance_and_pass(capsys, monkeypatch):
    monkeypatch.setattr(_backend, "POISON_OUTPUTS", False)
    assert cli.main(["check", "--device", "cpu", "--op", "rope2d"]) == 0
    text = capsys.readouterr().out
    assert "q, k [2, 12, 1541, 64] float32" in text and "max abs err <= 1e-05" in text
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(("reference", "cpp"))]
    assert [r[0] for r in rows] == ["reference", "cpp"] and all(r[2] == "PASS" for r in rows)
    assert text.rstrip().splitlines()[-1].startswith("PASS")


@needs_cpp
@pytest.mark.parametrize("how", ["wrong values", "raises", "NaN"])
def test_check_fails_and_exits_non_zero_with_a_broken_backend(capsys, monkeypatch, how):
    real = rope2d_module.IMPLS["cpp"]

    def broken(q, k, q_out, k_out, *rest):
        if how == "raises":
            raise RuntimeError("kernel launch failed")
        real(q, k, q_out, k_out, *rest)
        q_out.view(-1)[123] += 1e-3 if how == "wrong values" else float("nan")

    monkeypatch.setitem(rope2d_module.IMPLS, "cpp", broken)
    monkeypatch.setattr(_backend, "POISON_OUTPUTS", False)
    assert cli.main(["check", "--device", "cpu", "--op", "rope2d"]) == 1
    text = capsys.readouterr().out
    cpp = next(line for line in text.splitlines() if line.strip().startswith("cpp"))
    assert "FAIL" in cpp
    assert text.rstrip().splitlines()[-1].startswith("FAIL: 1 check(s): rope2d/cpp")
    if how == "raises":
        assert "kernel launch failed" in text


def test_python_m_dinofast_is_the_check(monkeypatch):
    """`python -m dinofast` with options only runs `check`; its exit status is the verdict."""
    r = run_module("--op", "rope2d", "--device", "cpu", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rope2d: q, k [" in r.stdout and "PASS" in r.stdout and "reference" in r.stdout


def test_checks_registry_is_complete():
    assert set(_checks.CHECKS) == {"rope2d", "varlen_attention", "pixel_shuffle_project"}
    assert all(0 < atol <= 1e-4 for _, atol in _checks.CHECKS.values())


# Allocates, touches and frees three 30 MB blocks (under glibc's 32 MiB mmap ceiling, so from the heap
# once the dynamic threshold has risen), three times, and prints the minor page faults of the last
# round: glibc trims the freed heap top (90 MB > its 64 MiB threshold) unless told to keep it.
_HEAP_CHURN = """
import resource, sys
from dinofast._cli import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def churn():
    blocks = [bytearray(30 << 20) for _ in range(3)]  # zero-filled: every page written
    del blocks
for _ in range(2):
    churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_glibc_returning_the_heap():
    def faults(mode):
        return int(run_python("-c", _HEAP_CHURN, mode, timeout=120, check=True).stdout)

    pages = 3 * (30 << 20) // 4096
    default, kept = faults("default"), faults("keep")
    assert default > pages // 2, f"glibc kept the heap even by default ({default} faults): the test shows nothing"
    assert kept < pages // 20, f"{kept} page faults after keep_freed_memory() (default: {default})"


@pytest.mark.parametrize("argv, keeps", [(["extract", "--help"], True), (["check", "--help"], False),
                                         (["--help"], False)])
def test_only_extract_keeps_freed_memory(monkeypatch, argv, keeps):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1))
    try:
        cli.cli(argv)
    except SystemExit as e:  # argparse's --help
        assert e.code == 0
    assert bool(calls) == keeps
