"""Build script: the Python package plus the `dinofast._C` extension.

`dinofast._C` holds the C++ CPU kernels always, and the CUDA kernels when torch has CUDA and nvcc is
found. Environment:
  DINOFAST_CUDA_ARCHS      ";"-separated compute capabilities (default "80;90")
  DINOFAST_SKIP_CUDA_BUILD=1  build the CPU kernels only
  MAX_JOBS                 parallel compile jobs (honoured by torch's ninja builder)
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - exercised only on misconfigured machines
    sys.exit(
        "dinofast: torch must be installed before building dinofast, and the build must see it.\n"
        "  pip install torch\n"
        "  pip install --no-build-isolation -e .\n"
        "(--no-build-isolation makes pip build against the installed torch instead of downloading another.)"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _abi_version() -> int:
    """C_ABI_VERSION from dinofast/_abi.py, read without importing dinofast (its imports need the build)."""
    scope: dict = {}
    with open(os.path.join(ROOT, "dinofast", "_abi.py")) as f:
        exec(compile(f.read(), "dinofast/_abi.py", "exec"), scope)
    return int(scope["C_ABI_VERSION"])


ABI_VERSION = _abi_version()


def _cuda_wanted() -> bool:
    if os.environ.get("DINOFAST_SKIP_CUDA_BUILD", "0") == "1":
        return False
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return False
    return os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))


def _nvidia_pip_includes() -> list:
    """Headers such as cusparse.h ship in the pip `nvidia` packages, not in every CUDA_HOME."""
    try:
        import nvidia  # noqa: F401
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        found += glob.glob(os.path.join(base, "*", "include")) + glob.glob(os.path.join(base, "*", "*", "include"))
    return sorted(set(found))


def _extension():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    defines = [("DINOFAST_ABI_VERSION", str(ABI_VERSION)), ("DINOFAST_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx_flags = ["-O3", "-fopenmp"]  # no -std: torch's BuildExtension picks the one its headers need
    if _cuda_wanted():
        archs = [a.strip() for a in os.environ.get("DINOFAST_CUDA_ARCHS", "80;90").split(";") if a.strip()]
        nvcc_flags = ["-O3", "-lineinfo"]
        for arch in archs:
            nvcc_flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        return cpp_extension.CUDAExtension(
            "dinofast._C",
            cpp_sources + cuda_sources,
            define_macros=defines + [("DINOFAST_WITH_CUDA", "1")],
            include_dirs=[os.path.join(ROOT, "csrc")] + _nvidia_pip_includes(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "dinofast._C",
        cpp_sources,
        define_macros=defines,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=["dinofast", "dinofast.ops", "dinofast.nn", "dinofast.reference", "dinofast.kernels", "dinofast.data",
              "dinofast.models"],
    # The Triton kernels live at the top-level kernels/ but install as dinofast.kernels: a top-level
    # `kernels` module would shadow an unrelated PyPI package.
    package_dir={"dinofast.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
