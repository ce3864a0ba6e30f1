# One image for every fleetgate process: gateway replica (the default command), health-checker,
# simulated node and the ops commands, e.g.
#   docker run --rm -p 8000:8000 -e FLEETGATE_REDIS_URL=redis://redis:6379/0 fleetgate
#   docker run --rm fleetgate health-checker --redis-url redis://redis:6379/0
#   docker run --rm fleetgate sim-node --host 0.0.0.0 --port 8001
#   docker run --rm -e FLEETGATE_REDIS_URL=... fleetgate nodes add http://10.0.0.5:23333
#   docker run --rm -e FLEETGATE_REDIS_URL=... --entrypoint python fleetgate scripts/nodes.py list
# Configure by FLEETGATE_* environment variables (README.md lists them) or by flags. Flags win
# over the environment: to set the gateway's address by FLEETGATE_HOST, give the command
# `serve` alone (as compose.yaml does) instead of the default `serve --host 0.0.0.0`.

# Both stages on the same base: the venv's python links to the base image's interpreter.
ARG PYTHON_IMAGE=python:3.11-slim

# -- build: install the project and its dependencies into a self-contained venv ---------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/fleetgate
WORKDIR /src
# Dependencies and the package in one step: the dependencies ship wheels for CPython 3.11 on
# amd64 and arm64, so the slim image needs no compiler. .dockerignore keeps the context to
# what is copied here.
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY shared_state ./shared_state
# pip byte-compiles what it installs: the non-root user could not write .pyc files later.
RUN /opt/fleetgate/bin/pip install --no-cache-dir .

# -- runtime: the venv, the ops scripts, and an unprivileged user -----------------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/fleetgate/bin:$PATH
RUN groupadd --system --gid 10001 fleetgate \
    && useradd --system --uid 10001 --gid fleetgate --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin fleetgate
COPY --from=build /opt/fleetgate /opt/fleetgate
WORKDIR /app
COPY scripts ./scripts
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["fleetgate"]
CMD ["serve", "--host", "0.0.0.0"]
