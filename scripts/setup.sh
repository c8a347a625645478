#!/usr/bin/env bash
# Create .venv (if missing) and install hf_soups with its test and demo extras, torch pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
pip -c constraints.txt torch torchvision
pip -c constraints.txt -e ".[test,demo]"
.venv/bin/python -c "import torch, torchvision, open_clip, hf_soups; print('hf_soups ready, torch', torch.__version__)"
