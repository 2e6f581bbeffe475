# QuillGPT API (and playground) image: CPU PyTorch, a non-root user, the bundled models inside.
#
#   docker build -t quillgpt .                 # from python:3.11-slim
#   docker run -p 8080:8080 quillgpt           # serves the bundled models (models/) on :8080
#
# BASE may also be a bare Debian bookworm (debootstrap --variant=minbase + podman import, see
# scripts/container-check.sh): Debian's own Python 3.11 is installed when the base has none.
# CPU PyTorch comes from a wheel in ./wheels/ when there is one, else from TORCH_INDEX_URL
# (PyTorch's CPU index: no CUDA libraries). Settings: QUILL_* variables (docs/serving.md).

ARG BASE=python:3.11-slim

FROM ${BASE} AS base
SHELL ["/bin/sh", "-eu", "-c"]
# hadolint ignore=DL3008
RUN if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3 python3-venv ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

FROM base AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# A CA bundle for pip, when the network between here and PyPI re-signs TLS (mount it at build time).
ARG PIP_CA_BUNDLE=""
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/venv
# PyTorch first: the heaviest layer changes least.
COPY constraints.txt wheel[s] /tmp/wheels/
# hadolint ignore=DL3013
RUN if [ -n "$PIP_CA_BUNDLE" ]; then export PIP_CERT="$PIP_CA_BUNDLE"; fi; \
    pip install --no-cache-dir --find-links /tmp/wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        -c /tmp/wheels/constraints.txt torch
COPY . /src
# hadolint ignore=DL3013
RUN if [ -n "$PIP_CA_BUNDLE" ]; then export PIP_CERT="$PIP_CA_BUNDLE"; fi; \
    pip install --no-cache-dir -c /tmp/wheels/constraints.txt "/src[serve,ui]"; \
    mkdir -p /src/models; \
    python -c "import torch, quillgpt.serve.app; assert torch.version.cuda is None, 'not a CPU build'"

FROM base AS runtime
RUN groupadd --system --gid 10001 quill \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/quill --shell /usr/sbin/nologin quill
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --from=build --chown=10001:10001 /src/models /app/models
COPY --from=build /src/main.py /src/app.py /app/
ENV PATH=/opt/venv/bin:$PATH \
    QUILL_HOST=0.0.0.0 \
    QUILL_PORT=8080 \
    QUILL_DEVICE=cpu \
    QUILL_MODELS_DIR=/app/models
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('QUILL_PORT', '8080'), timeout=4)"]
CMD ["python", "main.py"]
