#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the fine-tune demo; extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/finetune_demo.py "$@"
