# syntax=docker/dockerfile:1
# seqserve images (docs/operations.md). Targets:
#   server (the default, last stage): the CPU server; models are read from the /models volume.
#   export: trains a model and writes its bundle into the /models volume.
# BASE must be a Debian-like image with python3 (3.11 or newer) and its venv module.
ARG BASE=python:3.12-slim

# ---- build: every wheel the server needs, then a virtual environment installed from them only.
# Compilers, caches and the source tree stay in this stage.
FROM ${BASE} AS build
# Extra pip options for the wheel build, e.g. a mirror, or "--no-index --find-links /src/wheelhouse"
# to build from wheels prepared outside (the tests do this: no index is reachable inside their builds).
ARG PIP_OPTIONS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY . .
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip wheel ${PIP_OPTIONS} --wheel-dir /wheels ".[server]" \
    && /opt/venv/bin/pip install --no-index --find-links /wheels "seqserve[server]"

# ---- export-build: the export tools, with the CPU build of torch (no CUDA libraries).
FROM ${BASE} AS export-build
ARG PIP_OPTIONS=""
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY . .
# torch first, from the CPU index, so the export extra's torch range is already satisfied.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install ${PIP_OPTIONS} --index-url "${TORCH_INDEX_URL}" "torch==2.13.0" \
    && /opt/venv/bin/pip install ${PIP_OPTIONS} ".[export]"

# ---- export: `seqserve export ...`, by default the default language model into /models.
FROM ${BASE} AS export
RUN useradd --user-group --uid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin seqserve \
    && mkdir /models && chown seqserve:seqserve /models
COPY --from=export-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /models
VOLUME ["/models"]
ENTRYPOINT ["seqserve", "export"]
CMD ["lm", "--out", "/models"]

# ---- server: the CPU server. Settings are SEQSERVE_<NAME> variables, so `docker run -e` or extra
# arguments after the image name (`--max-batch 64`) change them without repeating the rest.
FROM ${BASE} AS server
RUN useradd --user-group --uid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin seqserve \
    && mkdir /models && chown seqserve:seqserve /models
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SEQSERVE_MODELS=/models \
    SEQSERVE_HOST=0.0.0.0 \
    SEQSERVE_PORT=50051 \
    SEQSERVE_METRICS_HOST=0.0.0.0 \
    SEQSERVE_METRICS_PORT=9460
USER 10001:10001
VOLUME ["/models"]
EXPOSE 50051 9460
# The server drains on SIGTERM (shutdown_grace_s, 10 s by default): give it longer than that to stop,
# e.g. `docker stop -t 30` or compose's stop_grace_period.
STOPSIGNAL SIGTERM
# `seqserve health` asks the gRPC health service on 127.0.0.1:$SEQSERVE_PORT; exit 0 only when SERVING.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["seqserve", "health"]
# Exec form: the server is PID 1 and receives SIGTERM itself (no shell in between).
ENTRYPOINT ["seqserve", "serve"]
