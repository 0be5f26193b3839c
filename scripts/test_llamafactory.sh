#!/usr/bin/env bash
# LLaMA-Factory integration tests (tests/test_llamafactory.py, tests/test_badam_alias.py) in their
# own environment, .venv-llamafactory: the oldest end of the supported range (Python 3.12, torch 2.11.0
# built for CUDA 13.0, as on the lent GPU machines) with torchvision 0.26.0 and torchaudio 2.11.0,
# LLaMA-Factory 0.9.5 with its own pins (transformers 5.6.0, accelerate 1.11.0, peft 0.18.1, trl
# 0.24.0), the real badam 1.4 to compare with, and badam_kernels installed from this tree the way the
# README says (pip's dependency check included). About 8 GB; kept apart from .venv (torch 2.13).
# Idempotent. PYTHON selects the interpreter of a new environment; extra arguments go to pytest.
# The CPU build (BADAM_KERNELS_NO_CUDA=1, the default here: the tests run on the CPU and compiling
# the CUDA kernels costs minutes); BADAM_KERNELS_NO_CUDA=0 builds them too (torch's cu130 needs nvcc 13.x).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stacks.sh --stack oldest  # find_python: the oldest stack's Python 3.12
venv=.venv-llamafactory
if [ ! -x "$venv/bin/python" ]; then
  python=$(find_python)
  echo "creating $venv with $python ($("$python" --version 2>&1))"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" -r scripts/llamafactory-requirements.txt

# Built from a copy of the tree: building here would overwrite the in-place build (build/,
# badam_kernels/_build_info_*.py) that .venv and .venv-oldest use. Installed like the README's command, with the
# extra, so pip checks that badam_kernels' and LLaMA-Factory's requirements agree with the pins above.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$src"
"$venv/bin/python" -m pip uninstall --quiet --yes badam_kernels 2>/dev/null || true
BADAM_KERNELS_NO_CUDA=${BADAM_KERNELS_NO_CUDA:-1} MAX_JOBS=${MAX_JOBS:-2} \
  "${pip[@]}" --no-build-isolation "$src[llamafactory]"
"$venv/bin/python" -m pip check
# -P: the installed copy, not this tree's badam_kernels (the current directory is not put on sys.path).
"$venv/bin/python" -P -c "
import badam_kernels, torch
print(f'badam_kernels in {badam_kernels.__path__[0]}, torch {torch.__version__}: backends', badam_kernels.available_backends('cuda'), badam_kernels.available_backends('cpu'))"

# pytest's own launcher, not `python -m pytest`, which would put this tree (whose badam_kernels
# has .venv's extension) ahead of the installed copy on sys.path.
"$venv/bin/pytest" -q -p no:cacheprovider tests/test_badam_alias.py tests/test_llamafactory.py "$@"
