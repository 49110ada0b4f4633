#!/usr/bin/env bash
# Set up embedctl on a fresh machine: a virtual environment in .venv with the CPU build of torch installed
# first (so pip never fetches a multi-GB CUDA build), then embedctl and its test tools.
# Usage: scripts/setup.sh            (idempotent; PYTHON=python3.12 scripts/setup.sh to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # On a CUDA host install the CUDA build of torch before running this script instead.
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[dev,minilm]"
echo "embedctl installed in .venv: $(.venv/bin/embedctl --version)"
