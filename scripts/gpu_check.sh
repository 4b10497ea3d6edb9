#!/usr/bin/env bash
# The checks that need a GPU, in one short run (target: under 8 minutes on one H200):
#   1. python -m pytest -m gpu -v   (tests/end_to_end/test_gpu.py: bf16 distil + resume + export on CUDA; torchrun over
#      NCCL for ddp and fsdp where there are 2 GPUs, skipped with the reason otherwise)
#   2. benchmarks/gpu_real_shape.py (a random Llama-3.2-1B-shaped teacher distilled to hidden 1024 at batch
#      4 x 2048 tokens, bf16: tokens/s and peak CUDA memory)
#   3. on 2+ GPUs: tests/end_to_end/test_multinode.py on CUDA (2 "nodes" at a rendezvous endpoint vs one node) and
#      `lrc plan --gpus N` for the Llama-3.1-8B row on this machine's GPUs
# Logs and the benchmark's JSON go to ${OUT:-gpu-check-out}. Nothing is downloaded. Exit status: 0 when both
# parts pass, else 1. Python: $PYTHON, else .venv/bin/python, else python3; the checkout's src/ comes first
# on the path, so an installed lowrankclone is not needed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -z "${LRC_CACHE:-}" ]; then  # a token cache of our own, removed at the end
  LRC_CACHE="$(mktemp -d)"
  trap 'rm -rf "$LRC_CACHE"' EXIT
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false LRC_CACHE

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda,
"transformers", transformers.__version__); print("devices:", [torch.cuda.get_device_name(i)
for i in range(torch.cuda.device_count())] or "none")'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} 2>&1 | tee "$OUT/environment.txt"

status=0
echo "== pytest -m gpu" | tee "$OUT/pytest_gpu.log"
SECONDS=0
timeout "${PYTEST_TIMEOUT:-300}" "$PY" -m pytest -m gpu -v -p no:cacheprovider 2>&1 | tee -a "$OUT/pytest_gpu.log"
rc=${PIPESTATUS[0]}
echo "== pytest -m gpu: exit status $rc after ${SECONDS} s" | tee -a "$OUT/pytest_gpu.log"
[ "$rc" -eq 0 ] || status=1

echo "== benchmarks/gpu_real_shape.py" | tee "$OUT/gpu_real_shape.log"
SECONDS=0
timeout "${BENCH_TIMEOUT:-300}" "$PY" benchmarks/gpu_real_shape.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/gpu_real_shape.log"
rc=${PIPESTATUS[0]}
echo "== gpu_real_shape: exit status $rc after ${SECONDS} s" | tee -a "$OUT/gpu_real_shape.log"
[ "$rc" -eq 0 ] || status=1

# 3. several GPUs (skipped on one): the fsdp run on all of them as 2 "nodes" meeting at a rendezvous endpoint
#    (tests/end_to_end/test_multinode.py, as on a cluster), and `lrc plan --gpus N` on this machine's GPUs for the 8B row
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "${NGPU:-0}" -ge 2 ]; then
  echo "== multi-GPU: $NGPU GPUs" | tee "$OUT/multi_gpu.log"
  SECONDS=0
  "$PY" -m lrc plan --teacher benchmarks/configs/llama-3.1-8b --hidden-size 2048 --method lrc --parallel fsdp --batch-size 2 \
    --seq-len 2048 --precision bf16 --grad-checkpointing --gpus "$NGPU" 2>&1 | tee -a "$OUT/multi_gpu.log"
  LRC_TEST_DEVICE=cuda LRC_TEST_PER_NODE=$((NGPU / 2 < 2 ? 1 : 2)) timeout "${MULTI_TIMEOUT:-300}" "$PY" -m pytest tests/end_to_end/test_multinode.py -v \
    -p no:cacheprovider 2>&1 | tee -a "$OUT/multi_gpu.log"
  rc=${PIPESTATUS[0]}
  echo "== multi-GPU: exit status $rc after ${SECONDS} s" | tee -a "$OUT/multi_gpu.log"
  [ "$rc" -eq 0 ] || status=1
else
  echo "== multi-GPU: skipped ($NGPU GPU(s))" | tee "$OUT/multi_gpu.log"
fi

echo "gpu_check: $([ $status -eq 0 ] && echo passed || echo FAILED); logs in $OUT"
exit $status
