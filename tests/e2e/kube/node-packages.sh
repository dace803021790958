#!/usr/bin/env bash
# Installs what the real-node e2e tests (tests/e2e/realnode.py) need from Debian,
# when missing: containerd, runc, containernetworking-plugins, busybox-static.
# Only as root (the tests need root anyway; without it they are skipped), and not
# with MIGCHAIN_E2E_REALNODE=0 (which turns them off). apt-get update runs only
# if the install fails (no package lists yet, on a fresh machine).
# Usage: bash tests/e2e/kube/node-packages.sh
set -euo pipefail

if [[ "${MIGCHAIN_E2E_REALNODE:-}" == "0" ]]; then
  exit 0
fi
if [[ $(id -u) != 0 ]]; then
  echo "node-packages.sh: not root: the real-node tests will be skipped (run make test as root to include them)" >&2
  exit 0
fi

missing=()
command -v containerd >/dev/null || missing+=(containerd)
command -v runc >/dev/null || missing+=(runc)
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] || missing+=(containernetworking-plugins)
[[ -x /bin/busybox ]] || missing+=(busybox-static)
if [[ ${#missing[@]} == 0 ]]; then
  exit 0
fi
command -v apt-get >/dev/null || {
  echo "node-packages.sh: missing ${missing[*]} and no apt-get: install them, or set MIGCHAIN_E2E_REALNODE=0" >&2
  exit 1
}
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
if ! install 2>/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  install
fi
echo "node-packages.sh: installed ${missing[*]}"
