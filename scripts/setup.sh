#!/usr/bin/env bash
# Create .venv with the pinned requirements and build badam_kernels in place (editable).
# Idempotent: a second run only rebuilds what changed. PYTHON selects the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-build-isolation -e .
