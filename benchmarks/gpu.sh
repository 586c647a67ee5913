#!/usr/bin/env bash
# The train step on this machine's GPUs (<= 8 minutes on one H100): images/s, MFU and
# the overlap of collectives with compute, for gspmd and data / lazy / hybrid with
# parallel.overlap none vs deferred. Writes benchmarks/gpu_<card>_<date>.md.
#
#   bash benchmarks/gpu.sh [extra flags for experiments.benchmark_gpu]
#
# Needs a CUDA jax: the project's requirements plus "jax[cuda12]==<the pinned jax>".
# The XLA GPU flags (latency-hiding scheduler, no combining of gradient buckets) are
# deep_image/parallel/mesh.py:GPU_OVERLAP_FLAGS, added by the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-gpu/bin/python ]; then
  "$PY" -m venv .venv-gpu
  JAX_VERSION=$(sed -n 's/^jax==//p' requirements.txt)
  .venv-gpu/bin/pip install -q -r requirements.txt "jax[cuda12]==${JAX_VERSION}" -e .
fi
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_' | tr -cd 'A-Za-z0-9_-')
OUT="benchmarks/gpu_${CARD}_$(date -u +%Y-%m-%d).md"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee /dev/stderr >/dev/null
timeout 480 .venv-gpu/bin/python -m experiments.benchmark_gpu --out="$OUT" "$@"
echo "wrote $OUT"
