#!/usr/bin/env bash
# Build dinofast's C++/CUDA sources against a CUDA build of torch (no GPU needed), import
# dinofast._C there and check that every op has its CUDA kernel registered.
# Usage: .ci/cuda_build_check.sh VENV   (a venv with a CUDA build of torch; created if missing)
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
# Build from a copy of the tracked files: the in-tree dinofast/_C belongs to the CPU venv.
src=$(mktemp -d)
(cd "$repo" && git ls-files -z | tar --null -cf - -T - | tar -xf - -C "$src")
(cd "$src" && MAX_JOBS=${MAX_JOBS:-2} DINOFAST_CUDA_ARCHS="80;90" \
   "$venv/bin/pip" install -q --no-build-isolation --no-deps .)
cd "$(mktemp -d)"
"$venv/bin/python" - <<'PY'
import re, torch, dinofast
from dinofast import _C
assert _C.with_cuda(), "dinofast._C was built without CUDA"
assert dinofast._backend.load_C() is _C, "dinofast._C is stale for this torch"
schemas = [s for s in torch._C._dispatch_get_registrations_for_dispatch_key("CUDA") if s.startswith("dinofast_C::")]
ops = sorted({s.split(".")[0] for s in torch._C._dispatch_get_all_op_names() if s.startswith("dinofast_C::")})
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
print("dinofast_C ops:", ops)
assert ops and not missing, f"ops without a CUDA kernel: {missing}"
print(f"CUDA build check passed: torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{len(ops)} ops with CUDA kernels, built for sm_80 and sm_90")
PY
