#!/usr/bin/env bash
# Create .venv and install lowrankclone with its test tools and the eval and wandb extras.
# torch: with an NVIDIA GPU, the newest build pip resolves (no old pin). Without one, a CPU build: a local
# torch==2.13.0 CPU wheel where pip's find-links has one; else the index named by LRC_TORCH_INDEX_URL (e.g.
# PyTorch's CPU-only index); else torch as pip resolves it (on Linux that is a large CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.6"
  # torch alone, without its dependencies (they come with the package install below): from pip's find-links
  # only (no index), which fails fast where no such wheel lies on disk ...
  elif python -m pip install -q --no-index --no-deps "torch==2.13.0" 2>/dev/null; then
    :
  # ... or from the CPU-only index the user names
  elif [ -n "${LRC_TORCH_INDEX_URL:-}" ]; then
    python -m pip install -q --no-deps torch --index-url "$LRC_TORCH_INDEX_URL"
  else
    echo "setup: no GPU, no local CPU torch wheel and no LRC_TORCH_INDEX_URL: installing torch as pip resolves it" >&2
    python -m pip install -q "torch>=2.6"
  fi
fi
# eval (lm-eval) and wandb: their tests (the shipped next-line task against a hand count, W&B offline) run in CI
python -m pip install -q -e ".[test,eval,wandb]"
echo "lowrankclone installed in $(pwd)/.venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
