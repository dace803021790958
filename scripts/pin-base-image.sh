#!/usr/bin/env bash
# Pins the Dockerfile's base image to the digest its tag points at now (the
# multi-architecture index), or to TAG if given: `make image-pin [TAG=3.11.15-slim-bookworm]`.
# Needs one of: docker (buildx), crane, skopeo; and the registry's network.
set -euo pipefail
cd "$(dirname "$0")/.."
current=$(sed -n 's/^FROM python:\([^@ ]*\)@sha256:[0-9a-f]\{64\}$/\1/p' Dockerfile)
tag=${1:-$current}
[[ -n "$tag" ]] || { echo "pin-base-image: no 'FROM python:TAG@sha256:...' line in Dockerfile" >&2; exit 1; }
image="docker.io/library/python:$tag"
if command -v docker >/dev/null && docker buildx version >/dev/null 2>&1; then
  digest=$(docker buildx imagetools inspect "$image" --format '{{json .Manifest.Digest}}' | tr -d '"')
elif command -v crane >/dev/null; then
  digest=$(crane digest "$image")
elif command -v skopeo >/dev/null; then
  digest=$(skopeo inspect --raw "docker://$image" | sha256sum | sed 's/^\([0-9a-f]*\).*/sha256:\1/')
else
  echo "pin-base-image: install docker (buildx), crane or skopeo" >&2
  exit 1
fi
[[ "$digest" =~ ^sha256:[0-9a-f]{64}$ ]] || { echo "pin-base-image: unexpected digest '$digest'" >&2; exit 1; }
sed -i "s|^FROM python:[^ ]*$|FROM python:$tag@$digest|" Dockerfile
echo "Dockerfile: FROM python:$tag@$digest"
