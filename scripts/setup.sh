#!/usr/bin/env bash
# Create a virtual environment with a pinned stack and build badam_kernels in it, in place (editable).
#   bash scripts/setup.sh                  .venv:        the newest supported stack (requirements.txt)
#   bash scripts/setup.sh --stack oldest   .venv-oldest: the oldest (requirements-oldest.txt), whose torch
#                                          has CUDA: the CUDA kernels are built too when a CUDA 13 toolkit is found
# Idempotent: a second run keeps the venv and rebuilds the extension (pip builds it in a fresh temporary
# folder, so every run compiles it whole). PYTHON selects the interpreter for a new venv.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stacks.sh "$@"
if [ ! -x "$VENV/bin/python" ]; then
  python=$(find_python)
  echo "creating $VENV with $python ($("$python" --version 2>&1))"
  "$python" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
# Two parallel compiles fit any machine's memory; the CUDA glue is the largest translation unit.
MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  --no-build-isolation -e .
# pip hides the build's output; say what was built (setup.py records it) and why CUDA was left out.
"$VENV/bin/python" - <<'PY'
import runpy
import sys

info = runpy.run_path(f"badam_kernels/_build_info_{sys.implementation.cache_tag.replace('-', '_')}.py")
kernels = "CPU and CUDA kernels" if info["CUDA_KERNELS"] else "CPU kernels only"
print(f"badam_kernels built against torch {info['TORCH_VERSION']}: {kernels} ({info['CUDA_REASON']})")
if info["CUDA_WARN"]:
    print("WARNING: this torch has CUDA but the CUDA kernels were not built; see the reason above.")
PY
