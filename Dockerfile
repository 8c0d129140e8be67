# syntax=docker/dockerfile:1
# The rcegate inference image: the FastAPI service, ONNX Runtime and the default model, nothing
# else (no torch, no training code). Two stages: `build` makes a virtualenv in /opt/venv, the
# runtime stage copies it next to the model repository and runs as a non-root user.
#
#   docker build -t rcegate .                           # GPU-ready (onnxruntime-gpu + CUDA wheels)
#   docker build --build-arg ORT_VARIANT=cpu -t rcegate:cpu .   # CPU only, much smaller
#
# ORT_VARIANT selects the pyproject extra: `gpu` brings onnxruntime-gpu[cuda,cudnn] (the CUDA
# and cuDNN runtime libraries come as wheels, so no CUDA base image is needed; on a host
# without a GPU the session falls back to the CPU provider), `cpu` brings onnxruntime.
# BASE_IMAGE can be any Debian-like image with python3 (>= 3.11) and python3-venv.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG ORT_VARIANT=gpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
RUN case "$ORT_VARIANT" in cpu|gpu) ;; *) echo "ORT_VARIANT must be cpu or gpu" >&2; exit 1;; esac \
 && python3 -m venv /opt/venv
WORKDIR /src
# Dependencies first, at the versions pinned in requirements/ (scripts/lock), so this (large)
# layer is reused while the lock does not change and every build gets the same libraries.
COPY requirements/service-${ORT_VARIANT}.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt
# Then the service itself, as a wheel installed in the runtime stage: /opt/venv keeps only the
# dependencies, so its layer (GBs for gpu) is reused when only the code changes. The context is
# an allow-list (.dockerignore): pyproject, README, requirements/, rcegate/ (the command),
# service/, models/ (code + the default model); no training/, so the wheel holds only `rcegate`,
# `service` and `models` (the manifest schema, the repository walker, the Triton converter).
COPY . ./
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${BASE_IMAGE} AS runtime
ARG ORT_VARIANT=gpu
# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it without /etc/passwd lookups.
RUN groupadd --system --gid 10001 rcegate \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin rcegate
COPY --from=build /opt/venv /opt/venv
# The gpu variant's CUDA and cuDNN libraries are wheels under site-packages/nvidia/*/lib, which
# the dynamic linker does not search: register them, so the CUDA execution provider loads
# without LD_LIBRARY_PATH or onnxruntime.preload_dlls(). (No-op for the cpu variant.)
RUN find /opt/venv -type d -path "*/site-packages/nvidia/*/lib" | sort > /etc/ld.so.conf.d/rcegate-nvidia.conf \
 && ldconfig
COPY --from=build /wheels /tmp/wheels
# The last check: without the training stage, `rcegate` holds the service's and the model
# repository's commands only (rcegate/cli.py skips an entry point whose package is absent).
RUN /opt/venv/bin/pip install --no-deps --no-index --no-cache-dir --disable-pip-version-check \
      /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels \
 && /opt/venv/bin/python -c "import service.app, models, onnxruntime as ort; print(ort.__version__, ort.get_available_providers())" \
 && /opt/venv/bin/python -c "import typer.main, rcegate.cli; names = sorted(typer.main.get_command(rcegate.cli.app).commands); assert names == ['api-key', 'export-triton', 'keygen', 'serve', 'sign'], names; print('rcegate', *names)"
# The model repository (`<name>/<version>/model.onnx + manifest.json`). The default model is baked
# in; mount more models under /models/<name> (read-only is fine) or a whole repository over /models.
COPY models/mnist-rce/ /models/mnist-rce/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RCEGATE_MODEL_DIR=/models \
    RCEGATE_HOST=0.0.0.0 \
    RCEGATE_PORT=8000 \
    RCEGATE_ORT_VARIANT=${ORT_VARIANT}
LABEL org.opencontainers.image.title="rcegate" \
      org.opencontainers.image.description="Image classification that says whether to trust each answer (RCE + K-density), ONNX Runtime" \
      org.opencontainers.image.licenses="Apache-2.0"
WORKDIR /tmp
USER 10001:10001
# 8000: HTTP (v1, OIP REST under /v2, metrics); 8001: OIP gRPC (RCEGATE_GRPC_PORT, 0 = off)
EXPOSE 8000 8001
# No curl in the image: ask /health/ready with the interpreter that is already there.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('RCEGATE_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health/ready', timeout=4).status == 200 else 1)"]
CMD ["rcegate", "serve"]
