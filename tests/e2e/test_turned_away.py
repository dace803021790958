"""A borrowing copy its node's kubelet refuses at admission (issue 19), on the real control plane.

A pod bound straight to the node (spec.nodeName) takes the slice migchain has
just given a borrower; the kubelet then refuses the borrower with
UnexpectedAdmissionError and leaves it Failed. Here the test plays that
node's kubelet (no kwok on it), so the refusal comes exactly then;
tests/e2e/test_real_node.py sees a real kubelet do it.
"""

from __future__ import annotations

from typing import Any

import pytest

from extender.kube.api import ApiError, path
from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import create_node, mig_pod, replica_set

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"  # chain a100-40gb: on-demand returns
G1, G2 = "nvidia.com/mig-1g.5gb", "nvidia.com/mig-2g.10gb"
REPLACED_UID = "migchain.io/replaced-uid"
TURNED_AWAY = "migchain_turned_away_borrowers_total"
DEVICES_UNAVAILABLE = (
    "Pod was rejected: Allocate failed due to requested number of devices unavailable for nvidia.com/mig-2g.10gb. "
    "Requested: 1, Available: 0, which is unexpected"
)


def limits(pod: dict[str, Any]) -> dict[str, str]:
    return dict(pod["spec"]["containers"][0]["resources"]["limits"])


def copy_bound(scenario: Scenario, name: str | None = None) -> dict[str, Any] | None:
    """The borrowing copy (of pod `name`, or any), once bound; not one its node refused."""
    for pod in scenario.pods():
        annotations = pod["metadata"].get("annotations") or {}
        if pod.get("status", {}).get("phase") == "Failed":
            continue
        if REPLACED_UID in annotations and pod["spec"].get("nodeName") and name in (None, pod["metadata"]["name"]):
            return pod
    return None


def take_behind_migchains_back(scenario: Scenario, node: str, copy: dict[str, Any]) -> None:
    """A pod bound straight to `node` takes its 2g.10gb, and the node's kubelet refuses the copy, as a real one
    does: Failed, UnexpectedAdmissionError."""
    sneak = mig_pod("sneak", scenario.test, {"2g.10gb": 1}, spec={"nodeName": node})
    scenario.api.create(path("api", "v1", "namespaces", scenario.namespace, "pods"), sneak)
    scenario.api.patch(
        path("api", "v1", "namespaces", scenario.namespace, "pods", copy["metadata"]["name"], "status"),
        {"status": {"phase": "Failed", "reason": "UnexpectedAdmissionError", "message": DEVICES_UNAVAILABLE}},
    )


def fill_and_borrow(scenario: Scenario, node: str) -> None:
    create_node(scenario.api, node, A100, {"1g.5gb": 1, "2g.10gb": 1}, scenario.test, kwok=False)
    scenario.create_pod("filler", {"1g.5gb": 1})
    assert scenario.wait_bound("filler") == node


def test_a_bare_borrower_its_node_refuses_is_brought_back_pending_under_its_name(scenario: Scenario):
    node = f"gpu-{scenario.test}-a"
    fill_and_borrow(scenario, node)
    brought_back_before = scenario.cluster.returner_metric(TURNED_AWAY, outcome="brought-back")
    original = scenario.create_pod("notebook", {"1g.5gb": 1})
    copy = wait_until(lambda: copy_bound(scenario, "notebook"), 30, "notebook to borrow the 2g.10gb")
    take_behind_migchains_back(scenario, node, copy)

    def brought_back() -> dict[str, Any] | None:
        try:
            pod = scenario.pod("notebook")
        except ApiError:
            return None
        if pod["metadata"]["uid"] in (copy["metadata"]["uid"], original["metadata"]["uid"]):
            return None
        return pod

    back = wait_until(brought_back, 30, "the refused borrower to be brought back")
    # Pending under its name, asking for what it asked for, with no loan: nothing is lost.
    assert limits(back) == {G1: "1"}
    assert not back["spec"].get("nodeName")
    assert back.get("status", {}).get("phase") == "Pending"
    annotations = back["metadata"].get("annotations") or {}
    assert REPLACED_UID not in annotations
    assert annotations["migchain.io/restarts"] == "1"  # a restart: a node that keeps refusing cannot cycle it
    # The event is written once the pod is back: waited for, not read once.
    [event] = wait_until(lambda: scenario.events("notebook", "TurnedAway"), 30, "migchain's TurnedAway event")
    assert f"node {node} refused the borrowed slices at admission (UnexpectedAdmissionError)" in event
    assert "brought back pending under its name" in event
    assert scenario.cluster.returner_metric(TURNED_AWAY, outcome="brought-back") == brought_back_before + 1
    # The refused copy held nothing: once the pod behind migchain's back goes, the 2g.10gb is lent again.
    scenario.api.delete(path("api", "v1", "namespaces", scenario.namespace, "pods", "sneak"), {"gracePeriodSeconds": 0})
    again = wait_until(lambda: copy_bound(scenario, "notebook"), 30, "notebook to borrow the 2g.10gb again")
    assert limits(again) == {G2: "1"}


def test_an_owned_borrower_its_node_refuses_is_left_to_its_controller_and_holds_nothing(scenario: Scenario):
    node = f"gpu-{scenario.test}-a"
    fill_and_borrow(scenario, node)
    left_before = scenario.cluster.returner_metric(TURNED_AWAY, outcome="left-to-controller")
    owner = scenario.api.create(
        path("apis", "apps", "v1", "namespaces", scenario.namespace, "replicasets"),
        replica_set("trainer", scenario.test, {"1g.5gb": 1}, 1),
    )
    copy = wait_until(lambda: copy_bound(scenario), 30, "the ReplicaSet's pod to borrow the 2g.10gb")
    take_behind_migchains_back(scenario, node, copy)

    def new_pod() -> dict[str, Any] | None:
        for pod in scenario.pods():
            owners = [ref.get("uid") for ref in pod["metadata"].get("ownerReferences") or []]
            if owner["metadata"]["uid"] in owners and pod["metadata"]["uid"] != copy["metadata"]["uid"]:
                return pod
        return None

    # The ReplicaSet makes a new pod from its template (its original request); migchain leaves the refused one.
    fresh = wait_until(new_pod, 30, "the ReplicaSet to replace its refused pod")
    assert limits(fresh) == {G1: "1"}
    wait_until(lambda: scenario.events(copy["metadata"]["name"], "TurnedAway"), 30, "the TurnedAway event")
    [event] = scenario.events(copy["metadata"]["name"], "TurnedAway")
    assert "left to its controller" in event
    assert scenario.cluster.returner_metric(TURNED_AWAY, outcome="left-to-controller") == left_before + 1
    refused = scenario.pod(copy["metadata"]["name"])
    assert (refused["metadata"]["uid"], refused["status"]["phase"]) == (copy["metadata"]["uid"], "Failed")
    # Its slices are not counted: once the pod behind migchain's back goes, the new pod borrows that 2g.10gb.
    scenario.api.delete(path("api", "v1", "namespaces", scenario.namespace, "pods", "sneak"), {"gracePeriodSeconds": 0})
    again = wait_until(
        lambda: (pod := copy_bound(scenario)) and pod["metadata"]["uid"] != copy["metadata"]["uid"] and pod,
        30,
        "the ReplicaSet's new pod to borrow the 2g.10gb",
    )
    assert limits(again) == {G2: "1"}
