# streamengine engine image: `streamengine run` (ingest, scheduler, outbox relay, admin API) and
# `streamengine worker` (GPU trainer) from one image. torch is installed first, pinned, from PyPI
# (its Linux x86_64 wheel bundles the CUDA runtime; the host needs only the NVIDIA driver), then the
# project in one resolve.
#   docker build -t streamengine .
#   docker run --rm streamengine --help
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip && pip install torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY streamengine ./streamengine
RUN pip install '.[train]'

FROM python:${PYTHON_VERSION}-slim
LABEL org.opencontainers.image.title="streamengine" \
      org.opencontainers.image.description="Continual-learning engine for LLM serving fleets" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 streamengine \
 && useradd --system --uid 10001 --gid streamengine --home-dir /var/lib/streamengine --create-home streamengine
COPY --from=build /opt/venv /opt/venv
# The admin API of `run` listens on every interface of the container, so `run` needs a real
# STREAMENGINE_API__TOKEN: without one it exits (code 2) naming the setting.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/var/lib/streamengine/hf \
    STREAMENGINE_API__HOST=0.0.0.0 \
    STREAMENGINE_WORKER__WORK_DIR=/var/lib/streamengine/work \
    STREAMENGINE_SERVING__DOWNLOAD_DIR=/var/lib/streamengine/adapters
USER streamengine
WORKDIR /var/lib/streamengine
VOLUME ["/var/lib/streamengine"]
# 8080: admin API and /metrics of `run`; 9100: /metrics of `worker` (STREAMENGINE_METRICS__PORT).
EXPOSE 8080 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=4 \
  CMD python -c "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('STREAMENGINE_API__PORT', '8080'), timeout=4)" || exit 1
ENTRYPOINT ["streamengine"]
CMD ["run"]
