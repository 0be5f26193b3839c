#!/usr/bin/env bash
# Set up a virtual environment (scripts/setup.sh) and run the test suite in it.
#   bash scripts/test.sh [pytest arguments]                  the newest supported stack, in .venv
#   bash scripts/test.sh --stack oldest [pytest arguments]   the oldest, in .venv-oldest
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stacks.sh "$@"
bash scripts/setup.sh --stack "$STACK"
exec "$VENV/bin/python" -m pytest -q tests "${ARGS[@]}"
