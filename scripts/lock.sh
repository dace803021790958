#!/usr/bin/env bash
# Regenerates requirements.lock: the image's runtime dependencies (setup.cfg's
# install_requires) and its build backend (pyproject.toml's setuptools,
# wheel), at the versions of constraints.txt, each with the sha256 of every
# file PyPI serves for it. The Dockerfile installs it with --require-hashes,
# so a file that differs from the one locked here fails the build.
# Run after changing setup.cfg or constraints.txt: `make lock`.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP_TOOLS=pip-tools==7.6.2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet "$PIP_TOOLS"
# Only the files `pip install .` reads, so that no local state leaks in.
cp pyproject.toml setup.cfg README.md constraints.txt "$work/"
cp -r extender "$work/extender"
(
  cd "$work"
  CUSTOM_COMPILE_COMMAND="make lock" "$work/venv/bin/pip-compile" --quiet --generate-hashes --allow-unsafe \
    --strip-extras --all-build-deps --no-emit-index-url --no-emit-find-links --constraint constraints.txt \
    --output-file requirements.lock pyproject.toml
)
cp "$work/requirements.lock" requirements.lock
echo "wrote requirements.lock ($(grep -c '^[a-z]' requirements.lock) packages)"
