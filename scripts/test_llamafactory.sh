#!/usr/bin/env bash
# LLaMA-Factory integration tests (tests/test_llamafactory.py, tests/test_badam_alias.py) in their
# own environment, .venv-llamafactory: LLaMA-Factory 0.9.5 with the torch 2.9.1 (CUDA build, with
# torchvision and torchaudio) and transformers 5.6.0 it pins, the real badam 1.4 to compare with,
# and badam_kernels built and installed from this tree. About 8 GB; kept apart from .venv
# (torch 2.13). Idempotent. PYTHON selects the interpreter (default python3); extra arguments go
# to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-llamafactory
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" -r scripts/llamafactory-requirements.txt

# Built from a copy of the tree: an in-place build would replace .venv's extension (built for
# torch 2.13) with one for torch 2.9.1. BADAM_KERNELS_NO_CUDA=1: this torch is built with CUDA
# 12.8 and the machine's nvcc may be another version, which torch's extension build refuses.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$src"
BADAM_KERNELS_NO_CUDA=1 "${pip[@]}" --no-build-isolation --no-deps --force-reinstall "$src"

# pytest's own launcher, not `python -m pytest`, which would put this tree (whose badam_kernels
# has .venv's extension) ahead of the installed copy on sys.path.
"$venv/bin/pytest" -q -p no:cacheprovider tests/test_badam_alias.py tests/test_llamafactory.py "$@"
