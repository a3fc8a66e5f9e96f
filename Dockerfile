# syntax=docker/dockerfile:1
# intercom-forwarder, as a sidecar container. Build: `docker build -t intercom-forwarder .`
# Configure with FORWARDER_<SECTION>__<KEY> variables; deploy: docs/deploy-sidecar.md.
#
# Intake stays on 127.0.0.1:8377 (the pod's shared loopback). A separate container reaches
# it through a Unix socket on a shared volume (FORWARDER_INTAKE__UNIX_SOCKET), or over the
# network with FORWARDER_INTAKE__HOST=0.0.0.0. The token comes from INTERCOM_ACCESS_TOKEN or,
# better, a mounted secret: FORWARDER_INTERCOM__ACCESS_TOKEN_FILE=/run/secrets/intercom-access-token.
# Stopping drains for up to shutdown.drain_seconds (20 s): give `docker stop` / compose
# stop_grace_period / terminationGracePeriodSeconds more than that (30 s).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: build the wheel, install it with its dependencies and uvloop into a venv ----
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
# .dockerignore is an allowlist: only what builds the wheel is in the context.
COPY . .
# Installing from the wheel file (not by name from an index) means a same-named package
# on PyPI can never stand in for ours. pip compiles .pyc at install, so the read-only
# venv never needs to write bytecode at run time.
RUN python -m venv /opt/intercom-forwarder \
 && python -m pip wheel --no-deps --wheel-dir /wheels . \
 && wheel=$(echo /wheels/intercom_forwarder-*.whl) \
 && /opt/intercom-forwarder/bin/pip install "${wheel}[uvloop]" \
 && /opt/intercom-forwarder/bin/intercom-forwarder --version

# ---- runtime: the interpreter and that venv, nothing else ---------------------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="intercom-forwarder" \
      org.opencontainers.image.description="Local daemon that validates, de-duplicates and forwards Intercom data events"

# A fixed, unprivileged uid/gid so volume ownership and fsGroup can be set ahead of time.
RUN groupadd --system --gid 10001 forwarder \
 && useradd --system --uid 10001 --gid forwarder --no-create-home \
        --home-dir /var/lib/intercom-forwarder --shell /usr/sbin/nologin forwarder \
 && install -d -o forwarder -g forwarder -m 0750 /var/lib/intercom-forwarder \
 && install -d -o forwarder -g forwarder -m 0755 /run/intercom-forwarder

COPY --from=builder /opt/intercom-forwarder /opt/intercom-forwarder

ENV PATH=/opt/intercom-forwarder/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FORWARDER_STORAGE__STATE_DIR=/var/lib/intercom-forwarder \
    FORWARDER_LOG__FORMAT=json

USER 10001:10001
WORKDIR /var/lib/intercom-forwarder
# Spool (unsent events at stop) and dead letters: keep them across container restarts.
VOLUME ["/var/lib/intercom-forwarder"]
EXPOSE 8377

# stdlib-only probe of GET /healthz on 127.0.0.1:$FORWARDER_INTAKE__PORT (exit 0 or 1).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "forwarder.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["intercom-forwarder"]
CMD ["serve"]
