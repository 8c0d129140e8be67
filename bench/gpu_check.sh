#!/usr/bin/env bash
# GPU check for operators with an NVIDIA GPU and the `gpu` extra (pip install -e '.[gpu,dev]'):
# bench/gpu_check.py measures, on CUDA, raw ONNX Runtime per cudnn_conv_algo_search (shape-change
# costs, batch 1 and 64, IO binding, CUDA graph, parity with the CPU), the echo floor, and the
# service per batch-shape option (max, pow2, any) x search (EXHAUSTIVE, DEFAULT) at 1, 16 and 64
# connections, with the batch shapes the session ran; a table, the targets of issue 20 and a
# recommended default are printed, every figure goes to bench/results/gpu-check.json.
# Exits 1 with "FAIL: CUDA is not in use" when raw ORT or the service would run on the CPU, or
# onnxruntime-gpu is not installed. About 5 minutes (`--budget` seconds caps it); extra arguments
# go to bench/gpu_check.py (e.g. --duration 3 --rounds 1, --variants max/EXHAUSTIVE pow2/DEFAULT).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
exec "$python" bench/gpu_check.py "$@"
