# migchain: migchain-extender, migchain-returner and the migchain CLI in one image.
# manifests/ run it as UID 65532 (the user made here) with a read-only root filesystem.
# The base is pinned by digest (the multi-architecture index of the tag), so a
# rebuild gets the same bytes whatever the tag points at later; refresh both
# with `make image-pin` (scripts/pin-base-image.sh).
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what `pip install .` reads: setup.cfg takes the long description from README.md.
COPY pyproject.toml setup.cfg README.md requirements.lock ./
COPY extender ./extender
# Runtime dependencies only (no test or sim extras) and the build backend, at
# the versions of constraints.txt, each file checked against its sha256 in
# requirements.lock (`make lock`); then migchain itself, built with that
# backend and fetching nothing.
RUN pip install --no-cache-dir --require-hashes --no-deps --requirement requirements.lock \
    && pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf /src

RUN groupadd --gid 65532 migchain \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin migchain
USER 65532:65532
WORKDIR /

EXPOSE 8443
CMD ["migchain-extender"]
