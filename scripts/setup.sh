#!/usr/bin/env bash
# Create .venv and install lowrankclone with its test tools.
# torch: where there is no NVIDIA GPU, take a CPU build (a local 2.13.0+cpu wheel where pip's find-links
# has one, else PyTorch's CPU index); with a GPU, the newest CUDA build pip resolves (no old pin).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.6"
  else
    # torch alone from pip's find-links (no index): fails fast where no such wheel lies on disk; its
    # dependencies come with the package install below.
    python -m pip install -q --no-index --no-deps "torch==2.13.0" 2>/dev/null \
      || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu \
           --extra-index-url https://pypi.org/simple
  fi
fi
python -m pip install -q -e ".[test]"
echo "lowrankclone installed in $(pwd)/.venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
