# lossd for GPU hosts: the CUDA build of PyTorch from the official image, lossd's server on top.
#   docker build -t lossd .
#   docker run --gpus all -p 50051:50051 -p 9464:9464 lossd
# Settings are LOSSD_* environment variables (see the README); extra arguments go to `lossd serve`.
# HOME is /tmp: the user has no home, and caches (CUDA's kernel cache) need a writable place, also
# under a read-only root filesystem where /tmp is a volume (deploy/kubernetes).
# The base image's torch is kept (it is the CUDA build); everything else is pinned by constraints.txt.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp

WORKDIR /opt/lossd
COPY pyproject.toml README.md constraints.txt ./
COPY proto ./proto
COPY wire ./wire
COPY server ./server
COPY client ./client
RUN grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt ".[server]" \
    && rm /tmp/constraints.txt \
    && groupadd --system --gid 10001 lossd \
    && useradd --system --uid 10001 --gid lossd --no-create-home --shell /usr/sbin/nologin lossd

USER 10001:10001

# Kubernetes' terminationGracePeriodSeconds (deploy/kubernetes) leaves 5 s more than this grace.
ENV LOSSD_HOST="[::]" \
    LOSSD_PORT=50051 \
    LOSSD_METRICS_PORT=9464 \
    LOSSD_SHUTDOWN_GRACE_S=25 \
    LOSSD_LOG_LEVEL=INFO
EXPOSE 50051 9464

HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["lossd", "health", "--timeout", "4"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["lossd", "serve"]
