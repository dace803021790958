# migchain: migchain-extender, migchain-returner and the migchain CLI in one image.
# manifests/ run it as UID 65532 (the user made here) with a read-only root filesystem.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what `pip install .` reads: setup.cfg takes the long description from README.md.
COPY pyproject.toml setup.cfg README.md constraints.txt ./
COPY extender ./extender
# Runtime dependencies only (no test or sim extras), at the versions of constraints.txt.
RUN pip install --no-cache-dir --constraint constraints.txt . \
    && rm -rf /src

RUN groupadd --gid 65532 migchain \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin migchain
USER 65532:65532
WORKDIR /

EXPOSE 8443
CMD ["migchain-extender"]
