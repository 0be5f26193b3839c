#!/usr/bin/env bash
# Run here, with network, before a GPU visit: puts into .gpu_visit/ (git-ignored) what the bare GPU
# machine cannot download, namely the badam 1.4 wheel (pure Python, no required dependencies) that
# the end-to-end benchmark compares with. Name .gpu_visit in the device tool's `carry`;
# scripts/gpu_check.sh installs it from there with --no-index --no-deps.
# PYTHON selects the interpreter whose pip downloads (default: .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
mkdir -p .gpu_visit
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --dest .gpu_visit badam==1.4
ls -l .gpu_visit
