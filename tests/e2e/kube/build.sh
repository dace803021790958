#!/usr/bin/env bash
# Builds the real control plane for the e2e tests from Go modules: kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, kubelet (k8s.io/kubernetes,
# pinned in go.mod), etcd (go.etcd.io/etcd/server/v3), kwok (sigs.k8s.io/kwok,
# which simulates the fake GPU nodes' kubelets), and for the real node the MIG
# device-plugin stand-in (./migdeviceplugin) and the sandbox process (./pause).
# Skips the build when the binaries exist and were built from the same go.mod,
# go.sum and sources.
# Usage: bash tests/e2e/kube/build.sh   -> .cache/kube/bin/
#        MIGCHAIN_KUBE_OUT=DIR bash tests/e2e/kube/build.sh   -> DIR/bin/
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
out="${MIGCHAIN_KUBE_OUT:-$root/.cache/kube}/bin"
stamp="$out/.built-from"
binaries=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet etcd kwok migdeviceplugin pause)

want=$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" "$here"/migdeviceplugin/*.go "$here"/pause/*.go | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  missing=0
  for binary in "${binaries[@]}"; do [[ -x "$out/$binary" ]] || missing=1; done
  if [[ $missing == 0 ]]; then
    echo "control plane binaries up to date in $out"
    exit 0
  fi
fi

command -v go >/dev/null || { echo "build.sh: Go is needed to build the control plane (go.dev/dl)" >&2; exit 1; }
start=$(date +%s)
mkdir -p "$out"
cd "$here"
# Stamp the release into the binaries as the Kubernetes release build does:
# components derive their emulation and compatibility versions from it.
version=$(awk '$1 == "k8s.io/kubernetes" { print $2 }' go.mod)
minor=${version#v1.}; minor=${minor%%.*}
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
# One `go build` for all the main packages, so the packages they share compile once.
CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags="$ldflags" -o "$out/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubectl \
  k8s.io/kubernetes/cmd/kubelet \
  go.etcd.io/etcd/server/v3 \
  sigs.k8s.io/kwok/cmd/kwok \
  ./migdeviceplugin \
  ./pause
# go names a binary after its package path less the major version: .../server/v3 -> server.
mv -f "$out/server" "$out/etcd"
echo "$want" > "$stamp"
echo "built ${binaries[*]} into $out in $(( $(date +%s) - start ))s"
