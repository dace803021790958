"""Fake GPU nodes: Node objects with MIG capacity and the labels GPU feature discovery sets; and MIG pods."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from extender.config import load_rules
from extender.core.mig import MIG_RESOURCE_PREFIX
from extender.kube.api import KubeApi, path

FAKE_NODE_LABEL = "e2e.migchain.io/fake-node"  # kwok plays these nodes' kubelet (tests/e2e/kube/stages.yaml)
TEST_LABEL = "e2e.migchain.io/test"
SCHEDULER = "migchain-scheduler"
PAUSE = "registry.k8s.io/pause:3.10"  # never pulled: kwok runs no containers
# A pod annotated so ends that long (a Go duration, "90s"; or an RFC 3339 time) after kwok started it.
SUCCEED_AFTER = "e2e.migchain.io/succeed-after"  # Succeeded, exit code 0
FAIL_AFTER = "e2e.migchain.io/fail-after"  # Failed, exit code 1


def gpu_node(
    name: str, product: str, slices: Mapping[str, int], test: str, state: str = "success"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Node object and its status, as a kubelet with the NVIDIA device plugin (mixed strategy) reports them."""
    labels = {
        FAKE_NODE_LABEL: "true",
        TEST_LABEL: test,
        "kubernetes.io/hostname": name,
        "nvidia.com/gpu.product": product,
        "nvidia.com/mig.capable": "true",
        "nvidia.com/mig.strategy": "mixed",
        "nvidia.com/mig.config.state": state,
    }
    resources = {"cpu": "64", "memory": "512Gi", "pods": "110"}
    for profile, count in slices.items():
        labels[f"nvidia.com/mig-{profile}.count"] = str(count)
        resources[f"{MIG_RESOURCE_PREFIX}{profile}"] = str(count)
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}
    status = {
        "capacity": resources,
        "allocatable": resources,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kwok"}],
    }
    return node, status


def create_node(
    api: KubeApi, name: str, product: str, slices: Mapping[str, int], test: str, *, kwok: bool = True
) -> None:
    """A fake GPU node, Ready; without `kwok`, no one plays its kubelet (its pods stay as the test leaves them)."""
    node, status = gpu_node(name, product, slices, test)
    if not kwok:
        del node["metadata"]["labels"][FAKE_NODE_LABEL]
    api.create("/api/v1/nodes", node)
    api.patch(path("api", "v1", "nodes", name, "status"), {"status": status})


def fleet_from_chain(
    api: KubeApi, chain_file: Path, layout: Mapping[str, int], *, nodes: int, gpus_per_node: int, test: str
) -> list[str]:
    """`nodes` nodes of the chain's first GPU model, each GPU partitioned as `layout` (profile -> count)."""
    [chain, *_] = load_rules([chain_file]).chains
    for profile in layout:
        if f"{MIG_RESOURCE_PREFIX}{profile}" not in chain.types:
            raise ValueError(f"{profile} is not on chain {chain.name}")
    product = sorted(chain.gpu_products)[0]
    names = [f"gpu-{test}-{index}" for index in range(nodes)]
    for name in names:
        create_node(api, name, product, {p: n * gpus_per_node for p, n in layout.items()}, test)
    return names


def mig_pod(
    name: str,
    test: str,
    requests: Mapping[str, int],
    *,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    node_selector: Mapping[str, str] | None = None,
    spec: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A pod for migchain-scheduler asking for MIG slices (profile -> count), kept on this test's nodes.

    `node_selector` adds to the selector of this test's nodes; `spec` sets more fields of the spec.
    """
    limits = {f"{MIG_RESOURCE_PREFIX}{profile}": str(count) for profile, count in requests.items()}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": dict(labels or {}), "annotations": dict(annotations or {})},
        "spec": {
            "schedulerName": SCHEDULER,
            "nodeSelector": {TEST_LABEL: test, **(node_selector or {})},
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "main", "image": PAUSE, "resources": {"limits": limits}}],
            **(spec or {}),
        },
    }


def pod_template(test: str, requests: Mapping[str, int], labels: Mapping[str, str]) -> dict[str, Any]:
    """A pod template (of a ReplicaSet, a Deployment, a Job) for pods like `mig_pod`'s."""
    return {"metadata": {"labels": dict(labels)}, "spec": mig_pod("", test, requests)["spec"]}


def replica_set(name: str, test: str, requests: Mapping[str, int], replicas: int) -> dict[str, Any]:
    """A ReplicaSet of `replicas` pods like `mig_pod`'s, labelled app=NAME."""
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": pod_template(test, requests, labels),
        },
    }
