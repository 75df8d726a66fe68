#!/usr/bin/env bash
# Install gpt2 with its test tools and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
PY=${PYTHON:-python3}
"$PY" -m ruff check src tests bench
"$PY" -m pytest "$@"
