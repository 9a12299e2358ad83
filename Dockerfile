# syntax=docker/dockerfile:1
# The DAT trainer image: CUDA PyTorch with the project installed, run as a non-root user. Pods start it as
#   dat-torchrun -m trainer --config /etc/dat/config.yaml   (torchrun that exits as its workers did; nodes,
#   rank and rendezvous from the operator's PET_* env)
# and the same image serves `datctl exporter`. Build: make image [IMAGE=registry/dat-k8s:tag]
# checkov:skip=CKV_DOCKER_7: FROM takes this ARG's default, a pinned tag (checkov does not resolve ARGs)
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="dat-k8s" \
      org.opencontainers.image.description="Distributed adversarial training (DAT) with JointSpar-LARS for Kubeflow PyTorchJobs"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch.compile (perf.compile=auto on GPUs) needs a host C compiler: Triton builds its kernel launchers with
# it. Newer runtime images ship gcc, older ones do not: install it only where it is missing. Unpinned, as
# the base image's distribution release fixes its version.
# hadolint ignore=DL3008
RUN command -v gcc >/dev/null \
    || { apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*; }

# Only what the package needs; the base image's torch/torchvision satisfy the pins, so pip keeps them.
COPY pyproject.toml README.md /tmp/dat-src/
COPY trainer /tmp/dat-src/trainer
COPY controller /tmp/dat-src/controller
RUN pip install --no-cache-dir /tmp/dat-src \
    && rm -rf /tmp/dat-src \
    && python -c "import torch, torchvision, timm, trainer.cli, controller.cli" \
    && command -v torchrun dat-torchrun dat-train datctl

# Non-root with a fixed UID/GID >= 10000, clear of the nodes' own users (the chart's securityContext runs as
# 10001:10001). The root filesystem is read-only in the pods: HOME and caches live on the /tmp emptyDir.
RUN groupadd --gid 10001 dat \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin dat
ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.config/matplotlib
WORKDIR /tmp
USER 10001:10001

# checkov:skip=CKV_DOCKER_2: no HEALTHCHECK: Kubernetes ignores it; the chart's probes (exporter) do that job
CMD ["datctl", "--help"]
