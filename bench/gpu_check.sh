#!/usr/bin/env bash
# GPU check for operators with an NVIDIA GPU and the `gpu` extra (pip install -e '.[gpu,dev]'):
# runs the serving benchmark (bench/serving.py) with RCEGATE_PROVIDERS=cuda for the service and
# raw ONNX Runtime on CUDAExecutionProvider, prints the providers really in use (the service's
# GET /v1/models/<name> `providers`, raw session.get_providers()) and the raw-vs-service figures.
# Exits 1 with "FAIL: CUDA is not in use" when either fell back to CPU or when onnxruntime-gpu
# is not installed. Extra arguments go to bench/serving.py (e.g. --duration 3 --rounds 1).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
exec "$python" bench/serving.py --cuda "$@"
