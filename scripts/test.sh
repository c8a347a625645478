#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
# The venv's console scripts (accelerate, hf-soups) are what the tests launch.
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest -q "$@"
