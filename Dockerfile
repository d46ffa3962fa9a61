# syntax=docker/dockerfile:1
# One image for every stage of sgpipe: `sgpipe ingest|process|sink|migrate`.
#
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) -t sgpipe .
#
# The base is pinned by exact tag, the same in both stages (the virtualenv built in the first is
# copied into the second and its interpreter path must exist there). Releases should pin the
# digest too (`FROM python:3.11.15-slim-bookworm@sha256:...`) and let Renovate/Dependabot bump it.
# Python 3.11 is what the test suite runs (pyproject's requires-python floor).

FROM python:3.11.15-slim-bookworm AS builder

WORKDIR /src
COPY . /src
# The same script tests/image/test_image_build.py runs: wheel, then a virtualenv with the wheel
# and its runtime dependencies only (no `embedded` extras, no pip).
RUN sh docker/build-venv.sh /src /wheels /opt/sgpipe


FROM python:3.11.15-slim-bookworm

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown

LABEL org.opencontainers.image.title="sgpipe" \
      org.opencontainers.image.description="Keep every SendGrid Event Webhook event: verified ingress -> Kafka -> Avro -> ClickHouse" \
      org.opencontainers.image.source="https://github.com/sgpipe/sgpipe" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"

# Only the virtualenv crosses over: no compiler, no wheel cache, no source tree, no pip in it.
COPY --from=builder /opt/sgpipe /opt/sgpipe

# Read-only root filesystem friendly: nothing writes bytecode at run time (uv compiled it at
# install), and HOME points at /tmp, the one writable path (an emptyDir in the Helm chart).
ENV PATH="/opt/sgpipe/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp

# A numeric user and group (Kubernetes' runAsNonRoot can verify a number, not a name). Not
# added to /etc/passwd: nothing in sgpipe looks its user up.
USER 10001:10001

# No tini: sgpipe is PID 1 itself. PID 1 gets no default signal actions from the kernel, so a
# process without handlers would ignore SIGTERM; sgpipe installs its own SIGTERM/SIGINT
# handlers (asyncio add_signal_handler in process/sink/migrate, aiohttp's run_app in ingest)
# that drain, flush and commit. Zombie reaping matters only for a process that spawns
# children: the stages of this image spawn none (only `sgpipe up` starts a broker subprocess,
# and its `embedded` extra is not installed here).
# No HEALTHCHECK: Kubernetes probes /healthz and /readyz (see helm/sgpipe).
ENTRYPOINT ["/opt/sgpipe/bin/sgpipe"]
CMD ["--help"]
