# syntax=docker/dockerfile:1
#
# attnserve image. GPU by default; `--build-arg VARIANT=cpu` builds the CPU-only image.
#   docker build -t attnserve:0.1.0-gpu .
#   docker build --build-arg VARIANT=cpu -t attnserve:0.1.0-cpu .
# Both variants share one Ubuntu 24.04 userland (Python 3.12), so the virtualenv built in the
# builder stage runs unchanged in the final stage. The torch wheel brings its own CUDA user-space
# libraries (cuBLAS, cuDNN, ...), so the GPU base is the slim CUDA `base` flavour: cudart plus the
# NVIDIA container-runtime settings that check the host driver (CUDA 13.0 needs driver >= 580).

ARG VARIANT=gpu

FROM nvidia/cuda:13.0.2-base-ubuntu24.04 AS base-gpu
FROM ubuntu:24.04 AS base-cpu

# The Python interpreter that the builder and the final stage share. `base-${VARIANT}` is one of
# the two stages above, which hadolint cannot resolve (DL3006). Apt versions follow the pinned
# base image's release: Ubuntu's archive keeps only the newest build, so exact pins would rot
# (DL3008).
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*

FROM base AS builder
ARG VARIANT
# Wheel index flavour for the GPU variant; it must match the CUDA major of the base image.
ARG CUDA_WHEELS=cu130
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src

# torch first, in its own layer, from the PyTorch index of the chosen variant at the version
# pinned in constraints.txt; its remaining dependencies resolve from PyPI in the next step.
COPY constraints.txt ./
RUN set -eu; \
    case "${VARIANT}" in \
      gpu) flavour="${CUDA_WHEELS}" ;; \
      cpu) flavour=cpu ;; \
      *) echo "VARIANT must be gpu or cpu, not '${VARIANT}'" >&2; exit 1 ;; \
    esac; \
    pip install --no-deps --index-url "https://download.pytorch.org/whl/${flavour}" \
        --constraint constraints.txt torch

# The service itself, non-editable, with the same constraints as `make run`. PIP_CONSTRAINT also
# pins the isolated build environment (setuptools).
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
RUN PIP_CONSTRAINT=/src/constraints.txt pip install . \
    && pip check \
    && pip uninstall --yes pip
# Fail the build, not the first start, when the app does not import or the zoo is missing.
RUN python -c "import sys, service.app, service.settings as s; r = s.default_model_repository(); \
    sys.exit(0 if any(r.glob('*/card.json')) else f'no model package in {r}')"

FROM base AS runtime
LABEL org.opencontainers.image.title="attnserve" \
      org.opencontainers.image.description="Attention-based image classifiers over REST with dynamic batching" \
      org.opencontainers.image.licenses="MIT"
RUN groupadd --system --gid 10001 attnserve \
    && useradd --system --uid 10001 --gid attnserve --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin attnserve
COPY --from=builder /opt/venv /opt/venv
# Read-only root filesystem: nothing writes outside /tmp (no bytecode, caches under /tmp).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/torch \
    TRITON_CACHE_DIR=/tmp/triton \
    ATTNSERVE_HOST=0.0.0.0 \
    ATTNSERVE_PORT=8000 \
    ATTNSERVE_GRPC_PORT=8001
USER 10001:10001
# HTTP (REST and the Open Inference Protocol), gRPC (KServe v2 / Triton)
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('ATTNSERVE_PORT', '8000'), timeout=4)"]
# uvicorn handles SIGTERM itself: stop accepting, drain in-flight requests, run the shutdown.
STOPSIGNAL SIGTERM
ENTRYPOINT ["attnserve"]
CMD ["serve"]
