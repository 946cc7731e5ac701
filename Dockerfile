# syntax=docker/dockerfile:1
#
# normcore service image.
#
#   docker build -t normcore:cpu .
#   docker build -t normcore:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#
# PyTorch is installed first, pinned, from TORCH_INDEX_URL (the CPU-only index by default) so
# that no later requirement can pull a CUDA build; the project is then installed non-editable
# from its own pyproject.toml. Nothing secret is baked in: NORMCORE_API_TOKEN is given at run
# time (compose reads it from an optional .env file).

ARG PYTHON_IMAGE=python:3.12.12-slim-trixie

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# A C++ compiler for the fused kernels, in this stage only: they are built below for this
# machine's CPU (-march=native) and the runtime image carries the library, not the compiler.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# Own layer: only changes when the torch pin or index changes, not with the project's source.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
# .dockerignore admits only what the package build needs (pyproject, README, sources).
COPY . .
# torch is already satisfied, so this resolves the remaining runtime deps from PyPI.
RUN pip install --no-cache-dir . \
    && python -c "import torch, normcore, service; print('torch', torch.__version__)"

# The kernels, compiled now (the build key is this CPU's flags, the interpreter and torch):
# an image run on this machine loads them at start. Elsewhere the key differs, nothing can
# be built (no compiler, a read-only folder) and the service logs one warning and serves
# from its plain torch path. A failed build here is that same warning, not a failed image.
ENV TORCH_EXTENSIONS_DIR=/opt/normcore-kernels
RUN python -c "import normcore.kernels as k; print('kernels', 'built' if k.warm_up() else 'NOT built')"

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="normcore" \
      org.opencontainers.image.description="Normalization layers with PyTorch's exact semantics, served over HTTP" \
      org.opencontainers.image.licenses="Apache-2.0"

# Fixed, non-root UID/GID 10001 (numeric USER so that runAsNonRoot-style checks can verify it).
RUN groupadd --system --gid 10001 normcore \
    && useradd --system --no-log-init --uid 10001 --gid normcore \
        --home-dir /home/normcore --create-home --shell /usr/sbin/nologin normcore \
    && install -d -o normcore -g normcore -m 0750 /var/lib/normcore \
    && install -d -m 0755 /etc/normcore

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/normcore-kernels /opt/normcore-kernels

ENV PATH=/opt/venv/bin:$PATH \
    TORCH_EXTENSIONS_DIR=/opt/normcore-kernels \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    NORMCORE_HOST=0.0.0.0 \
    NORMCORE_PORT=8000 \
    NORMCORE_GRPC_PORT=8001 \
    NORMCORE_STATE_DIR=/var/lib/normcore

# State (flushed on SIGTERM) and an optional user catalog folder: point NORMCORE_CATALOG at a
# TOML inside /etc/normcore; when unset the catalog shipped in the package is used.
VOLUME ["/var/lib/normcore", "/etc/normcore"]

WORKDIR /home/normcore
USER 10001:10001

# HTTP (REST and KServe V2), then gRPC (KServe V2).
EXPOSE 8000
EXPOSE 8001

# No curl in a slim image: probe /readyz with the standard library (503 -> exception -> exit 1).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; r = u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('NORMCORE_PORT', '8000'), timeout=4); sys.exit(r.status != 200)"]

# The server finishes in-flight requests and flushes state on SIGTERM, then exits 0.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]
