# Sourced by setup.sh and test.sh: the two tested ends of the supported range.
#   newest (default)  .venv         requirements.txt         Python 3.11  torch 2.13 CPU build, triton 3.9,
#                                                                         transformers 5.23, badam 1.4
#   oldest            .venv-oldest  requirements-oldest.txt  Python 3.12  torch 2.11 built for CUDA 13.0,
#                                                                         triton 3.6, transformers 5.17, no badam
# `--stack NAME` (or --stack=NAME) may come first in the arguments; the rest are left in ARGS.
# Sets STACK, VENV, REQUIREMENTS, PYTHON_VERSION and ARGS.

STACK=newest
case "${1:-}" in
  --stack) STACK=${2:?--stack needs a name: newest or oldest}; shift 2 ;;
  --stack=*) STACK=${1#--stack=}; shift ;;
esac
case "$STACK" in
  newest) VENV=.venv; REQUIREMENTS=requirements.txt; PYTHON_VERSION=3.11 ;;
  oldest) VENV=.venv-oldest; REQUIREMENTS=requirements-oldest.txt; PYTHON_VERSION=3.12 ;;
  *) echo "unknown stack '$STACK' (expected newest or oldest)" >&2; exit 2 ;;
esac
ARGS=("$@")

# The interpreter for a new virtual environment: $PYTHON if set, else pythonX.Y on the PATH, else a
# pyenv installation of X.Y (whose shim only answers when that version is selected), else python3.
find_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  if "python$PYTHON_VERSION" -c '' 2>/dev/null; then echo "python$PYTHON_VERSION"; return; fi
  local candidate
  for candidate in "$(pyenv root 2>/dev/null)/versions/$PYTHON_VERSION".*/bin/python; do
    if [ -x "$candidate" ]; then echo "$candidate"; return; fi
  done
  echo "python3"
}
