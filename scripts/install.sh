#!/usr/bin/env bash
# Install gpt2 (editable) into the current Python. Usage: bash scripts/install.sh [EXTRAS]
# e.g. `bash scripts/install.sh dev` for the test tools.
# torch is installed first, pinned to 2.13.0, where none is present (a torch already
# there, a CUDA build say, is kept). On machines with a local CPU wheel (find-links)
# the pin picks it; elsewhere PyPI's Linux wheel is the CUDA build: for the CPU one,
# install torch from https://download.pytorch.org/whl/cpu before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".${1:+[$1]}"
