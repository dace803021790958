"""Which owners' pods borrow, on the real control plane (issue 18, item 6).

A borrow replaces a pod under a new name. ReplicaSets and Jobs count their
pods by labels and take the replacement as one of theirs; controllers that
track pods by name (Argo Workflows, Volcano, Kubeflow's training operator,
Spark) would see their pod vanish. Their pods keep asking for their own type.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from extender.kube.api import ApiError, path
from tests.e2e.conftest import Cluster, Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import create_node, mig_pod, replica_set

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"  # chain a100-40gb: 1g.5gb may borrow 2g.10gb
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
# Two owners whose kind is not on the list, as their controllers write them: an Argo-like Workflow, and a
# Volcano-like Job (kind Job, but not batch/v1: only the apiVersion-qualified kind is safe).
OWNERS = (("argoproj.io", "v1alpha1", "Workflow", "workflows"), ("batch.volcano.sh", "v1alpha1", "Job", "jobs"))
# How long the owners' pods are watched not being replaced while a slice they could borrow sits free: kube-scheduler
# tries a pending pod at once and again on every cluster event, so a borrow would come within a second or two.
WATCH_SECONDS = 15


def crd(group: str, version: str, kind: str, plural: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                }
            ],
        },
    }


def established(cluster: Cluster, name: str) -> bool:
    conditions = cluster.api.get(f"{CRDS}/{name}").get("status", {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


@pytest.fixture(scope="module")
def owner_crds(cluster: Cluster) -> Iterator[None]:
    names = []
    for owner in OWNERS:
        document = crd(*owner)
        names.append(document["metadata"]["name"])
        try:
            cluster.api.create(CRDS, document)
        except ApiError as error:
            if error.status != 409:
                raise
    for name in names:
        wait_until(lambda name=name: established(cluster, name), 30, f"CRD {name} established")
    yield
    for name in names:
        cluster.api.delete(f"{CRDS}/{name}")


def owned_pod(scenario: Scenario, name: str, owner: dict[str, Any]) -> dict[str, Any]:
    """A 1g.5gb pod whose controller is `owner`, as Argo or Volcano create them (blockOwnerDeletion included)."""
    pod = mig_pod(name, scenario.test, {"1g.5gb": 1})
    pod["metadata"]["ownerReferences"] = [
        {
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    return scenario.api.create(path("api", "v1", "namespaces", scenario.namespace, "pods"), pod)


@pytest.mark.usefixtures("owner_crds")
def test_pods_of_owners_not_on_the_list_are_never_replaced_and_say_why(scenario: Scenario) -> None:
    node = f"gpu-{scenario.test}"
    create_node(scenario.api, node, A100, {"2g.10gb": 2}, scenario.test)  # no 1g.5gb: only a borrow could run them
    pods = []
    for group, version, kind, plural in OWNERS:
        owner = scenario.api.create(
            path("apis", group, version, "namespaces", scenario.namespace, plural),
            {"apiVersion": f"{group}/{version}", "kind": kind, "metadata": {"name": f"{kind.lower()}-1"}},
        )
        pods.append(owned_pod(scenario, f"{group.split('.')[0]}-step-0", owner))
    names = {pod["metadata"]["name"]: pod["metadata"]["uid"] for pod in pods}

    # Neither is touched, and each is told why in the scheduler's event.
    deadline = time.monotonic() + WATCH_SECONDS
    while time.monotonic() < deadline:
        current = {pod["metadata"]["name"]: pod for pod in scenario.pods()}
        assert set(current) == set(names), f"pods replaced: {sorted(current)}"
        for name, uid in names.items():
            assert current[name]["metadata"]["uid"] == uid
            assert not current[name]["spec"].get("nodeName"), f"{name} was bound"
        time.sleep(1)
    for name, (_, _, kind, _) in zip(names, OWNERS, strict=True):
        wait_until(lambda name=name: scenario.events(name, "FailedScheduling"), 30, f"{name} FailedScheduling")
        messages = " ".join(scenario.events(name, "FailedScheduling"))
        assert f"pods owned by a {kind} (" in messages and "keep their own type" in messages, messages

    # The same slices are lent to a ReplicaSet's pod at once: the free 2g.10gb were there all along.
    scenario.api.create(
        path("apis", "apps", "v1", "namespaces", scenario.namespace, "replicasets"),
        replica_set("web", scenario.test, {"1g.5gb": 1}, 1),
    )

    def borrower() -> dict[str, Any] | None:
        return next(
            (
                pod
                for pod in scenario.pods()
                if pod["metadata"]["name"].startswith("web-")
                and pod["spec"].get("nodeName") == node
                and "migchain.io/replaced-uid" in (pod["metadata"].get("annotations") or {})
            ),
            None,
        )

    assert wait_until(borrower, 60, "the ReplicaSet's pod to borrow 2g.10gb")
    assert {pod["metadata"]["name"] for pod in scenario.pods() if pod["metadata"]["name"] in names} == set(names)
