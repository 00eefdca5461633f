#!/usr/bin/env bash
# Build dinofast's C++/CUDA sources against a CUDA build of torch (no GPU needed), import
# dinofast._C there and check that every op has its CUDA kernel registered.
# Usage: .ci/cuda_build_check.sh VENV   (a venv with a CUDA build of torch; created if missing)
#
# The built extension is cached by a hash of everything that goes into it (csrc/*, setup.py, the
# torch and nvcc versions, the target archs) under $DINOFAST_CUDA_CACHE (default
# ~/.cache/dinofast/cuda-build): when none of that changed, the build is skipped and the import
# and registration check runs against the cached dinofast/_C with the current Python sources.
# DINOFAST_CUDA_CACHE=off forces a cold build (and stores nothing).
set -euo pipefail
venv=${1:?usage: cuda_build_check.sh VENV}
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.14.1 ninja pybind11 numpy setuptools wheel
fi
# dinofast's runtime dependencies (importing dinofast imports its data and model layers too)
"$venv/bin/pip" install -q Pillow safetensors tqdm transformers
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
archs="80;90"

# Build from a copy of the tracked files: the in-tree dinofast/_C belongs to the CPU venv.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
(cd "$repo" && git ls-files -z | tar --null -cf - -T - | tar -xf - -C "$src")
ln -s ../kernels "$src/dinofast/kernels"  # setup.py installs kernels/ as dinofast.kernels

key=$(
  cd "$src"
  for f in $(ls csrc/* setup.py | LC_ALL=C sort); do echo "$f"; sha256sum < "$f"; done
  "$venv/bin/python" -c "import torch; print(torch.__version__, torch.version.cuda)"
  nvcc --version | tail -n 2
  echo "archs=$archs"
)
key=$(echo "$key" | sha256sum | cut -c1-16)
cache=${DINOFAST_CUDA_CACHE:-$HOME/.cache/dinofast/cuda-build}
entry="$cache/$key"
if [ "$cache" != off ] && ls "$entry"/_C*.so >/dev/null 2>&1; then
  echo "CUDA build check: sources unchanged (key $key), using the cached extension in $entry"
  cp "$entry"/_C*.so "$src/dinofast/"
else
  start=$(date +%s)
  (cd "$src" && MAX_JOBS=${MAX_JOBS:-2} DINOFAST_CUDA_ARCHS="$archs" \
     "$venv/bin/python" setup.py -q build_ext --inplace)
  echo "CUDA build check: cold build took $(( $(date +%s) - start )) s (MAX_JOBS=${MAX_JOBS:-2}, $(nproc) cores)"
  if [ "$cache" != off ]; then
    mkdir -p "$cache"
    tmp=$(mktemp -d "$cache/.tmp.XXXXXX")
    cp "$src"/dinofast/_C*.so "$tmp/"
    rm -rf "$entry" && mv "$tmp" "$entry"  # a reader sees the whole entry or none
  fi
fi

cd "$(mktemp -d)"
PYTHONPATH="$src" "$venv/bin/python" - "$src" <<'PY'
import sys, torch, dinofast
from dinofast import _C
assert dinofast.__file__.startswith(sys.argv[1]), f"imported {dinofast.__file__}, not the checked sources"
assert _C.with_cuda(), "dinofast._C was built without CUDA"
assert dinofast._backend.load_C() is _C, "dinofast._C is stale for this torch"
ops = sorted({s.split(".")[0] for s in torch._C._dispatch_get_all_op_names() if s.startswith("dinofast_C::")})
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
print("dinofast_C ops:", ops)
assert ops and not missing, f"ops without a CUDA kernel: {missing}"
print(f"CUDA build check passed: torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{len(ops)} ops with CUDA kernels, built for sm_80 and sm_90")
PY
