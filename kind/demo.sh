#!/usr/bin/env bash
# migchain on kind: install manifests/, fake two A100-40GB workers, then a pod
# borrows a larger MIG slice and the returner gives it back.
#
#   kind/demo.sh         the whole demo (needs docker, kind, kubectl)
#   kind/demo.sh nodes   only (re)write the fake MIG capacity on the workers
#   kind delete cluster --name migchain   removes it all
#
# Fake MIG capacity. kind's nodes have no GPU and run no NVIDIA device plugin,
# so this script writes nvidia.com/mig-* into each worker's Node status and
# the labels GPU feature discovery would set, as tests/e2e/fleet.py does. The
# kubelet keeps that capacity (checked in Kubernetes v1.37.2):
# - its status updates start from the Node's current capacity and overwrite
#   only what it manages: cpu, memory, pods, ephemeral-storage, hugepages and
#   device-plugin resources; then allocatable is recomputed from capacity
#   (pkg/kubelet/nodestatus/setters.go MachineInfo: "avoid blindly overwriting
#   the capacity in case opaque resources are being advertised"). It is the
#   documented way to advertise extended resources for a node.
# - it admits pods asking for them: pkg/kubelet/cm/devicemanager allocates
#   only the resources a plugin registered, and counts the rest like any
#   other extended resource.
# - but when a kubelet restarts, finds its Node already there and its device
#   manager has no checkpoint (none is ever written without a device plugin),
#   it zeroes every extended resource (pkg/kubelet/kubelet_node_status.go
#   reconcileExtendedResource). After a node container restarts, run
#   `kind/demo.sh nodes` again.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."  # kind/cluster.yaml's hostPath is relative to the repository root

CLUSTER=${CLUSTER:-migchain}
IMAGE=${IMAGE:-migchain:0.1.0}  # NAME:TAG
NS=migchain-demo
PRODUCT=NVIDIA-A100-SXM4-40GB
# One A100-40GB per worker, the GPU Operator's all-balanced layout.
LAYOUT=(1g.5gb=2 2g.10gb=1 3g.20gb=1)

step() { printf '\n== %s\n' "$*"; }

fake_mig() {
    local node labels patch profile count entry
    for node in $(kubectl get nodes --selector '!node-role.kubernetes.io/control-plane' --output name); do
        labels=(
            "nvidia.com/gpu.product=$PRODUCT" nvidia.com/mig.capable=true
            nvidia.com/mig.strategy=mixed nvidia.com/mig.config.state=success
        )
        patch=""
        for entry in "${LAYOUT[@]}"; do
            profile=${entry%=*} count=${entry#*=}
            labels+=("nvidia.com/mig-$profile.count=$count")
            # "/" in a resource name is "~1" in a JSON pointer.
            patch+="{\"op\":\"add\",\"path\":\"/status/capacity/nvidia.com~1mig-$profile\",\"value\":\"$count\"},"
            patch+="{\"op\":\"add\",\"path\":\"/status/allocatable/nvidia.com~1mig-$profile\",\"value\":\"$count\"},"
        done
        kubectl label "$node" --overwrite "${labels[@]}"
        kubectl patch "$node" --subresource=status --type=json --patch "[${patch%,}]"
    done
}

mig_pod() {  # NAME PROFILE: a bare pod for migchain-scheduler asking one slice
    kubectl --namespace "$NS" create --filename - <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $1
spec:
  schedulerName: migchain-scheduler
  terminationGracePeriodSeconds: 0
  containers:
    - name: main
      image: registry.k8s.io/pause:3.10
      resources:
        limits:
          nvidia.com/mig-$2: "1"
EOF
}

holds() {  # NAME PROFILE: the pod runs and its limits ask for that slice
    local seen
    seen=$(kubectl --namespace "$NS" get pod "$1" --output jsonpath='{.status.phase} {.spec.containers[0].resources.limits}' 2>/dev/null) || return 1
    [[ $seen == "Running "*"\"nvidia.com/mig-$2\""* ]]
}

wait_holds() {  # NAME PROFILE [SECONDS]
    local deadline=$((SECONDS + ${3:-120}))
    until holds "$1" "$2"; do
        if ((SECONDS > deadline)); then
            echo "timed out waiting for pod $1 to run on a $2 slice" >&2
            kubectl --namespace "$NS" describe pod "$1" >&2 || true
            exit 1
        fi
        sleep 2
    done
    echo "pod $1 runs on a $2 slice"
}

status() {
    kubectl --namespace "$NS" get pods --output \
        jsonpath='{range .items[*]}{.metadata.name}{"\t"}{.spec.nodeName}{"\t"}{.status.phase}{"\tasked "}{.metadata.annotations.migchain\.io/original-requests}{" holds "}{.metadata.annotations.migchain\.io/borrowed-requests}{" restarts "}{.metadata.annotations.migchain\.io/restarts}{"\n"}{end}'
    # migchain's own view, from inside its pod (the image has the CLI; the
    # extender's ServiceAccount may list nodes and pods, all status reads).
    kubectl --namespace migchain-system exec deployment/migchain-extender --container extender -- \
        migchain status || echo "(no migchain status in this image)"
}

if [[ ${1:-} == nodes ]]; then
    fake_mig
    exit 0
fi

step "kind cluster $CLUSTER"
if ! kind get clusters | grep --quiet --line-regexp "$CLUSTER"; then
    kind create cluster --name "$CLUSTER" --config kind/cluster.yaml
fi
kubectl config use-context "kind-$CLUSTER"
# kustomize takes no absolute path to a base: the overlay below lives in the
# repository, in the git-ignored .cache/.
work=.cache/kind-demo
mkdir -p "$work"

step "image $IMAGE"
docker build --tag "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

step "fake MIG slices on the workers: ${LAYOUT[*]} each"
fake_mig

step "kubectl apply -k manifests/"
# An overlay of manifests/ with this image and the cluster's own kube-scheduler
# version (kind's node images hold that image already; a scheduler newer than
# its API server is unsupported).
version=$(kubectl get --raw /version | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p')
cat >"$work/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../manifests
images:
  - name: migchain
    newName: ${IMAGE%:*}
    newTag: ${IMAGE##*:}
  - name: registry.k8s.io/kube-scheduler
    newTag: $version
EOF
kubectl apply -k "$work"
kubectl --namespace migchain-system wait --for=condition=complete job/migchain-certs --timeout=180s
kubectl --namespace migchain-system wait --for=condition=complete job/migchain-loan-key --timeout=180s
# Two extender replicas, only the leader ever ready: `rollout status` would wait
# for both; wait for the Service's ready endpoint (the leader) instead.
for _ in $(seq 90); do
  ready=$(kubectl --namespace migchain-system get endpointslices \
    --selector kubernetes.io/service-name=migchain-extender \
    --output jsonpath='{.items[*].endpoints[*].conditions.ready}' || true)
  [[ $ready == *true* ]] && break
  sleep 2
done
[[ $ready == *true* ]] || { echo "no migchain-extender replica became ready (the leader)" >&2; exit 1; }
kubectl --namespace migchain-system rollout status deployment/migchain-returner --timeout=180s
kubectl --namespace migchain-system rollout status deployment/migchain-scheduler --timeout=180s

kubectl create namespace "$NS" --dry-run=client --output yaml | kubectl apply --filename -
kubectl --namespace "$NS" delete pods --all --wait

step "every 1g.5gb and 3g.20gb slice taken, exactly"
for name in small-1 small-2 small-3 small-4; do mig_pod "$name" 1g.5gb; done
for name in large-1 large-2; do mig_pod "$name" 3g.20gb; done
for name in small-1 small-2 small-3 small-4; do wait_holds "$name" 1g.5gb; done
for name in large-1 large-2; do wait_holds "$name" 3g.20gb; done

step "a 1g.5gb pod finds no free 1g.5gb: it borrows a 2g.10gb (2 steps up the A100-40GB chain)"
mig_pod borrower 1g.5gb
wait_holds borrower 2g.10gb
mig_pod medium-1 2g.10gb
wait_holds medium-1 2g.10gb
status

step "small-1 ends: a 1g.5gb frees; nobody waits for the 2g.10gb, so nothing moves (returnMode on-demand)"
kubectl --namespace "$NS" delete pod small-1 --wait
sleep 10
if holds borrower 2g.10gb; then echo "borrower still holds the 2g.10gb"; fi
status

step "a 2g.10gb pod arrives: the returner returns the borrower to the free 1g.5gb, freeing its 2g.10gb"
mig_pod medium-2 2g.10gb
wait_holds borrower 1g.5gb 300
wait_holds medium-2 2g.10gb 300
kubectl --namespace "$NS" get events --field-selector involvedObject.name=borrower
status
