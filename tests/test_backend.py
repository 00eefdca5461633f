"""The backend table: automatic choice, forcing, and a missing or stale dinofast._C."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dinofast
from dinofast import _backend
from dinofast.ops.rope2d import IMPLS


def test_automatic_choice_on_cpu():
    """The documented choice on CPU: cpp when dinofast._C is built, else the reference (Triton never
    runs automatically on CPU: its interpreter is for tests)."""
    want = "cpp" if _backend.load_C() is not None else "reference"
    assert _backend.select(IMPLS, torch.device("cpu"), "rope2d") == want


def test_automatic_choice_without_C_is_the_reference(monkeypatch):
    monkeypatch.setattr(_backend, "why_unavailable",
                        lambda name, device: None if name == "reference" else "switched off by the test")
    assert _backend.select(IMPLS, torch.device("cpu"), "rope2d") == "reference"
    assert _backend.select(IMPLS, torch.device("cuda"), "rope2d") == "reference"
    monkeypatch.setattr(_backend, "why_unavailable", lambda name, device: None)  # everything available
    assert _backend.select(IMPLS, torch.device("cuda"), "rope2d") == "triton"
    assert _backend.select(IMPLS, torch.device("cpu"), "rope2d") == "cpp"
    assert _backend.select({"reference": None, "cuda": None}, torch.device("cuda"), "op") == "cuda"


def test_import_dinofast_is_lazy_about_the_model_and_data_layers():
    out = _run_python(textwrap.dedent("""
        import sys
        import dinofast
        heavy = [m for m in ("PIL", "transformers", "safetensors", "dinofast.data", "dinofast.models")
                 if m in sys.modules]
        assert not heavy, heavy
        assert dinofast.CheckpointError.__name__ == "CheckpointError" and callable(dinofast.pack)
        print("ok")
    """))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_abi_version_has_one_source():
    import re

    from dinofast import _abi

    root = os.path.dirname(os.path.dirname(__file__))
    assert _backend.C_ABI_VERSION == _abi.C_ABI_VERSION
    setup = open(os.path.join(root, "setup.py")).read()
    assert not re.search(r"ABI_VERSION\s*=\s*\d", setup), "setup.py must read the version from dinofast/_abi.py"
    if _backend.load_C() is not None:
        assert _backend.load_C().abi_version() == _abi.C_ABI_VERSION


def test_forcing_an_unavailable_backend_raises():
    with dinofast.backend("cuda"):
        with pytest.raises(dinofast.BackendUnavailableError, match="cuda"):
            _backend.select(IMPLS, torch.device("cpu"), "rope2d")


def test_forcing_a_backend_the_op_lacks_raises():
    with dinofast.backend("cpp"):
        with pytest.raises(dinofast.BackendUnavailableError, match="no cpp implementation"):
            _backend.select({"reference": None}, torch.device("cpu"), "someop")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend"):
        with dinofast.backend("fortran"):
            pass


def test_env_variable_and_context_nesting(monkeypatch):
    monkeypatch.setenv("DINOFAST_BACKEND", "reference")
    assert _backend.select(IMPLS, torch.device("cpu"), "rope2d") == "reference"
    with dinofast.backend("triton"):
        assert _backend.forced_backend() == "triton"
        with dinofast.backend(None):
            assert _backend.forced_backend() == "reference"  # back to the environment's choice
    monkeypatch.setenv("DINOFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DINOFAST_BACKEND"):
        _backend.forced_backend()


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DINOFAST_BACKEND")}
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True,
                          text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))


SCRIPT_TAIL = textwrap.dedent("""
    import warnings, torch, dinofast
    from dinofast.reference import rope2d_reference
    q, k = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = [dinofast.rope2d(q, k, (2, 3), num_prefix_tokens=1)[0] for _ in range(3)]
    assert dinofast.available_backends("cpu") == ["reference"], dinofast.available_backends("cpu")
    torch.testing.assert_close(out[0], rope2d_reference(q, k, (2, 3), num_prefix_tokens=1)[0])
    msgs = [str(w.message) for w in caught if "dinofast._C" in str(w.message)]
    assert len(msgs) == 1, msgs
    print(msgs[0])
""")


def test_missing_C_warns_once_and_falls_back():
    out = _run_python("import sys; sys.modules['dinofast._C'] = None\n" + SCRIPT_TAIL)
    assert out.returncode == 0, out.stderr
    assert "could not be loaded" in out.stdout


def test_stale_C_warns_once_and_falls_back():
    if _backend.load_C() is None:
        pytest.skip(reason="dinofast._C is not built here")
    out = _run_python("import dinofast._backend as b; b.C_ABI_VERSION = -1\n" + SCRIPT_TAIL)
    assert out.returncode == 0, out.stderr
    assert "stale" in out.stdout
