"""kwok as the fake nodes' kubelet: it keeps their MIG allocatable, renews their leases, ends annotated pods."""

from __future__ import annotations

import datetime
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from extender.kube.api import ApiError, path
from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import FAIL_AFTER, SUCCEED_AFTER, create_node, mig_pod

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"
RUN_FOR = 8  # seconds the succeeding pod runs


def moment(stamp: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def phase(scenario: Scenario, name: str) -> str:
    return str(scenario.pod(name)["status"].get("phase", ""))


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    [status] = pod["status"]["containerStatuses"]
    return dict(status["state"]["terminated"])


def node_lease(scenario: Scenario, node: str) -> dict[str, Any]:
    return scenario.api.get(path("apis", "coordination.k8s.io", "v1", "namespaces", "kube-node-lease", "leases", node))


def test_kwok_initialises_the_node_and_keeps_its_mig_allocatable(scenario: Scenario):
    node = f"gpu-{scenario.test}"
    create_node(scenario.api, node, A100, {"1g.5gb": 7}, scenario.test)
    status = wait_until(
        lambda: (s := scenario.api.get(path("api", "v1", "nodes", node))["status"]).get("phase") == "Running" and s,
        30,
        "kwok to initialise the node",
    )
    assert status["nodeInfo"]["kubeletVersion"].startswith("kwok-")
    assert status["allocatable"]["nvidia.com/mig-1g.5gb"] == "7"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    # A re-partition as the tests write it (the device plugin's new count) stays: kwok does not reset it.
    scenario.api.patch(
        path("api", "v1", "nodes", node, "status"),
        {"status": {"allocatable": {"nvidia.com/mig-1g.5gb": "3"}, "capacity": {"nvidia.com/mig-1g.5gb": "3"}}},
    )
    time.sleep(3)
    assert scenario.api.get(path("api", "v1", "nodes", node))["status"]["allocatable"]["nvidia.com/mig-1g.5gb"] == "3"


def test_kwok_renews_the_node_lease(scenario: Scenario):
    node = f"gpu-{scenario.test}"
    create_node(scenario.api, node, A100, {"1g.5gb": 7}, scenario.test)
    first = wait_until(lambda: node_lease(scenario, node)["spec"].get("renewTime"), 30, "kwok to take the node lease")
    lease = node_lease(scenario, node)
    assert lease["spec"]["leaseDurationSeconds"] == 40
    assert lease["metadata"]["ownerReferences"][0]["name"] == node
    # Renewed every quarter of its duration (10 s), as a kubelet renews its own.
    wait_until(lambda: node_lease(scenario, node)["spec"]["renewTime"] != first, 30, "kwok to renew the lease")


def test_annotated_pods_end_after_their_duration_and_deletions_finish(scenario: Scenario):
    node = f"gpu-{scenario.test}"
    create_node(scenario.api, node, A100, {"1g.5gb": 7}, scenario.test)
    scenario.create_pod("succeeds", {"1g.5gb": 1}, annotations={SUCCEED_AFTER: f"{RUN_FOR}s"})
    scenario.create_pod("fails", {"1g.5gb": 1}, annotations={FAIL_AFTER: "1s"})
    scenario.create_pod("runs", {"1g.5gb": 1})
    scenario.create_pod("told", {"1g.5gb": 1})
    for name in ("succeeds", "runs", "told"):
        wait_until(lambda name=name: phase(scenario, name) == "Running", 30, f"kwok to run {name}")

    # The failing pod: exit code 1, Failed; its slice is free again.
    wait_until(lambda: phase(scenario, "fails") == "Failed", 30, "kwok to fail `fails`")
    assert terminated(scenario.pod("fails"))["exitCode"] == 1

    # The succeeding pod runs its annotated duration (the API's timestamps have whole seconds), then exits 0.
    wait_until(lambda: phase(scenario, "succeeds") == "Succeeded", RUN_FOR + 30, "kwok to complete `succeeds`")
    pod = scenario.pod("succeeds")
    assert terminated(pod)["exitCode"] == 0
    ran = (moment(terminated(pod)["finishedAt"]) - moment(pod["status"]["startTime"])).total_seconds()
    assert ran >= RUN_FOR - 1

    # A pod without the annotation keeps running; one a test ends itself stays ended.
    scenario.set_phase("told", "Succeeded")
    time.sleep(3)
    assert phase(scenario, "runs") == "Running"
    assert phase(scenario, "told") == "Succeeded"

    # A graceful deletion finishes: kwok confirms it as a kubelet would once the containers stopped.
    scenario.api.delete(
        path("api", "v1", "namespaces", scenario.namespace, "pods", "runs"),
        {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 30},
    )

    def gone() -> bool:
        try:
            scenario.pod("runs")
        except ApiError as error:
            return error.status == 404
        return False

    wait_until(gone, 15, "the terminating pod to go")


def test_a_pod_recreated_under_the_name_of_one_evicted_at_once_is_left_alone(scenario: Scenario):
    """As a bare borrower a reclaim returns: evicted (grace period 0), recreated under its name, pending. kwok
    deletes by name, without the UID precondition a kubelet sends: it must not take the new pod for the old."""
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"1g.5gb": 30}, scenario.test)
    pods = path("api", "v1", "namespaces", scenario.namespace, "pods")

    def evict_and_recreate(index: int) -> None:
        name = f"p{index}"
        old = scenario.api.create(pods, mig_pod(name, scenario.test, {"1g.5gb": 1}, spec={"nodeName": node}))
        wait_until(lambda: phase(scenario, name) == "Running", 30, f"{name} to run")
        eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name}}
        eviction["deleteOptions"] = {"preconditions": {"uid": old["metadata"]["uid"]}}
        scenario.api.create(f"{pods}/{name}/eviction", eviction)
        wait_until(lambda: gone_or_replaced(scenario, name, old["metadata"]["uid"]), 30, f"{name} to go")
        scenario.api.create(pods, mig_pod(name, scenario.test, {"1g.5gb": 1}, node_selector={"nowhere": "x"}))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(evict_and_recreate, range(30)))
    time.sleep(3)  # longer than the pod-delete Stage's delay
    names = {pod["metadata"]["name"] for pod in scenario.pods()}
    assert [f"p{index}" for index in range(30) if f"p{index}" not in names] == []


def gone_or_replaced(scenario: Scenario, name: str, uid: str) -> bool:
    try:
        return bool(scenario.pod(name)["metadata"]["uid"] != uid)
    except ApiError:
        return True
