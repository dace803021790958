"""On a real node (tests/e2e/realnode.py): real kubelet admission and real containers for an exact fit, a borrow and
a return.

Part of `make test` when run as root (skipped otherwise, or with MIGCHAIN_E2E_REALNODE=0). Alone:
    .venv/bin/pytest -m realnode tests/e2e/test_real_node.py
It needs the kubelet, migdeviceplugin and pause of tests/e2e/kube/build.sh (MIGCHAIN_E2E_NODE_BIN names their
folder when it is not .cache/kube/bin).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from extender.core.loan import DELETION_COST_ANNOTATION as DELETION_COST
from extender.core.loan import LOWEST_DELETION_COST
from extender.kube.api import ApiError, path
from tests.e2e import realnode
from tests.e2e.conftest import Cluster, Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import FAKE_NODE_LABEL, TEST_LABEL, gpu_node, mig_pod, replica_set
from tests.e2e.realnode import BUSYBOX_IMAGE, REALNODE_MARKS, RealNode, real_node
from tests.e2e.test_status import status

pytestmark = REALNODE_MARKS

NODE = "realnode-0"
EAGER_GPU = "TEST-EAGER-GPU"  # tests/fixtures/chains/e2e-eager.yaml: 1g.5gb -> 2g.10gb -> 3g.20gb, eager returns
LAYOUT = {"1g.5gb": 1, "2g.10gb": 1}
G2 = "nvidia.com/mig-2g.10gb"


def device_ids(profile: str) -> set[str]:
    return realnode.device_ids(NODE, LAYOUT, profile)


@pytest.fixture(scope="module")
def node(cluster: Cluster) -> Iterator[RealNode]:
    labels = dict(gpu_node(NODE, EAGER_GPU, LAYOUT, "none")[0]["metadata"]["labels"])
    del labels[FAKE_NODE_LABEL]  # kwok leaves this node to the real kubelet
    del labels[TEST_LABEL]  # given to one test at a time
    with real_node(cluster.plane, NODE, LAYOUT, labels) as started:
        wait_until(lambda: allocatable(cluster, "2g.10gb") == "1", 60, "the real node to advertise its MIG slices")
        yield started


def allocatable(cluster: Cluster, profile: str, name: str = NODE) -> str | None:
    status = cluster.api.get(path("api", "v1", "nodes", name))["status"]
    conditions = {item["type"]: item["status"] for item in status.get("conditions", [])}
    if conditions.get("Ready") != "True":
        return None
    value = status.get("allocatable", {}).get(f"nvidia.com/mig-{profile}")
    return str(value) if value is not None else None


@pytest.fixture
def on_node(node: RealNode, scenario: Scenario) -> Iterator[RealNode]:
    """The real node, in this test's scenario for the test's length; empty of pods afterwards."""
    with in_scenario(node, scenario):
        yield node


@contextlib.contextmanager
def in_scenario(node: RealNode, scenario: Scenario) -> Iterator[None]:
    """A real node in `scenario` (its pods may land there) until the end; empty of pods afterwards."""
    scenario.api.patch(path("api", "v1", "nodes", node.name), {"metadata": {"labels": {TEST_LABEL: scenario.test}}})
    try:
        yield
    finally:
        scenario.api.delete(  # its controllers first: they would make new pods
            path("apis", "apps", "v1", "namespaces", scenario.namespace, "replicasets"), {"propagationPolicy": "Orphan"}
        )
        for pod in scenario.pods():
            with contextlib.suppress(ApiError):
                scenario.api.delete(
                    path("api", "v1", "namespaces", scenario.namespace, "pods", pod["metadata"]["name"]),
                    {"gracePeriodSeconds": 1},  # not 0 (forced): the kubelet confirms, its devices are free
                )
        wait_until(lambda: not pods_on_node(scenario, node.name), 60, "the real node to be empty")
        wait_until(lambda: not node.running_tasks(), 60, "the real node's containers to stop")
        scenario.api.patch(path("api", "v1", "nodes", node.name), {"metadata": {"labels": {TEST_LABEL: None}}})


def pods_on_node(scenario: Scenario, name: str = NODE) -> list[dict[str, Any]]:
    items, _ = scenario.api.list_all("/api/v1/pods", fieldSelector=f"spec.nodeName={name}")
    return items


def real_pod(scenario: Scenario, name: str, requests: dict[str, int], **kwargs: Any) -> dict[str, Any]:
    """A MIG pod whose container really runs on the node (the local busybox image: no registry is reachable);
    `kwargs` as `mig_pod`'s."""
    pod = mig_pod(name, scenario.test, requests, **kwargs)
    container = pod["spec"]["containers"][0]
    container |= {"image": BUSYBOX_IMAGE, "imagePullPolicy": "Never", "command": ["/bin/busybox", "sleep", "3600"]}
    return scenario.api.create(path("api", "v1", "namespaces", scenario.namespace, "pods"), pod)


def running(scenario: Scenario, name: str, uid: str | None = None) -> dict[str, Any] | None:
    """The pod once its container runs (and, given `uid`, once it is another pod than that one)."""
    try:
        pod = scenario.pod(name)
    except ApiError:
        return None
    if uid is not None and pod["metadata"]["uid"] == uid:
        return None
    statuses = pod.get("status", {}).get("containerStatuses") or []
    if pod.get("status", {}).get("phase") == "Failed":
        raise AssertionError(f"{name} failed: {pod['status']}")
    if pod.get("status", {}).get("phase") == "Running" and statuses and statuses[0].get("containerID"):
        return pod
    return None


def granted(node: RealNode, pod: dict[str, Any]) -> tuple[str, str]:
    """The device the container sees (NVIDIA_VISIBLE_DEVICES) and its profile, from its process's environment."""
    env = node.container_env(pod["status"]["containerStatuses"][0]["containerID"])
    return env["NVIDIA_VISIBLE_DEVICES"], env["MIGCHAIN_TEST_MIG_PROFILE"]


def limits(pod: dict[str, Any]) -> dict[str, str]:
    return dict(pod["spec"]["containers"][0]["resources"]["limits"])


def exact_fit_and_borrow(scenario: Scenario, node: RealNode) -> tuple[dict[str, Any], dict[str, Any]]:
    real_pod(scenario, "fits", {"1g.5gb": 1})
    fits = wait_until(lambda: running(scenario, "fits"), 60, "fits to run")
    assert fits["spec"]["nodeName"] == NODE
    device, profile = granted(node, fits)
    assert (profile, device in device_ids("1g.5gb")) == ("1g.5gb", True)
    real_pod(scenario, "borrows", {"1g.5gb": 1})
    borrows = wait_until(lambda: running(scenario, "borrows"), 60, "borrows to run")
    assert limits(borrows) == {"nvidia.com/mig-2g.10gb": "1"}
    assert "migchain.io/replaced-uid" in borrows["metadata"]["annotations"]
    device, profile = granted(node, borrows)
    assert (profile, device in device_ids("2g.10gb")) == ("2g.10gb", True)
    return fits, borrows


def test_an_exact_fit_and_a_borrow_run_in_real_containers_on_devices_of_the_granted_type(
    scenario: Scenario, on_node: RealNode
):
    exact_fit_and_borrow(scenario, on_node)
    assert not scenario.events("borrows", "UnexpectedAdmissionError")


def test_a_return_stops_the_borrowers_container_and_runs_it_again_on_its_own_type(
    scenario: Scenario, on_node: RealNode
):
    _, borrows = exact_fit_and_borrow(scenario, on_node)
    old_container = borrows["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    assert old_container in on_node.running_tasks()
    scenario.api.delete(path("api", "v1", "namespaces", scenario.namespace, "pods", "fits"), {"gracePeriodSeconds": 1})
    back = wait_until(lambda: running(scenario, "borrows", borrows["metadata"]["uid"]), 90, "borrows to be returned")
    assert limits(back) == {"nvidia.com/mig-1g.5gb": "1"}
    assert "migchain.io/replaced-uid" not in (back["metadata"].get("annotations") or {})
    assert back["spec"]["nodeName"] == NODE
    device, profile = granted(on_node, back)
    assert (profile, device in device_ids("1g.5gb")) == ("1g.5gb", True)
    wait_until(lambda: old_container not in on_node.running_tasks(), 30, "the evicted container to stop")


def slices_in_status(scenario: Scenario) -> dict[str, dict[str, int]]:
    """The real node's slices as migchain sees them (`migchain status -o json`)."""
    [row] = [row for row in json.loads(status(scenario, "-o", "json"))["nodes"] if row["name"] == NODE]
    return dict(row["slices"])


def test_a_device_plugin_restart_keeps_running_pods_and_migchain_follows_the_allocatable(
    scenario: Scenario, on_node: RealNode
):
    real_pod(scenario, "holder", {"1g.5gb": 1})
    holder = wait_until(lambda: running(scenario, "holder"), 60, "holder to run")
    container = holder["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")

    on_node.relayout({"1g.5gb": 1})  # mig-manager re-partitions: the 2g.10gb goes away
    wait_until(lambda: allocatable(scenario.cluster, "2g.10gb") == "0", 60, "the 2g.10gb to leave the allocatable")
    wait_until(lambda: slices_in_status(scenario)[G2]["allocatable"] == 0, 30, "migchain to see no 2g.10gb")
    real_pod(scenario, "waits", {"1g.5gb": 1})
    time.sleep(6)  # three scheduling retries at least: the slice that went away is lent to no one
    assert not scenario.pod("waits")["spec"].get("nodeName")

    on_node.relayout(LAYOUT)  # and comes back
    wait_until(lambda: allocatable(scenario.cluster, "2g.10gb") == "1", 60, "the 2g.10gb to come back")
    waits = wait_until(lambda: running(scenario, "waits"), 90, "waits to borrow the 2g.10gb back and run")
    assert limits(waits) == {G2: "1"}
    assert granted(on_node, waits)[1] == "2g.10gb"
    assert container in on_node.running_tasks()  # the holder ran on throughout
    assert scenario.pod("holder")["metadata"]["uid"] == holder["metadata"]["uid"]
    assert slices_in_status(scenario)[G2] == {"allocatable": 1, "used": 1, "borrowed": 1, "free": 0}
    assert not scenario.events("waits", "UnexpectedAdmissionError")


def brought_back(scenario: Scenario, name: str, failed_uid: str) -> dict[str, Any] | None:
    """The bare pod back under its name, a new pod, not Failed, with its own request (no loan)."""
    try:
        pod = scenario.pod(name)
    except ApiError:
        return None
    if pod["metadata"]["uid"] == failed_uid or pod.get("status", {}).get("phase") == "Failed":
        return None
    return pod if limits(pod) == {"nvidia.com/mig-1g.5gb": "1"} else None


def gone_or_replaced(scenario: Scenario, name: str, uid: str) -> bool:
    try:
        return bool(scenario.pod(name)["metadata"]["uid"] != uid)
    except ApiError:
        return True


@contextlib.contextmanager
def extender_stalls(cluster: Cluster, failpoint: str) -> Iterator[None]:
    """migchain's extender stalls 6 s at `failpoint` of a borrow, as on a slow API server."""
    cluster.extender.env = {**os.environ, "MIGCHAIN_FAILPOINTS": f"{failpoint}@6"}
    cluster.restart_extender(kill=False)
    try:
        yield
    finally:
        cluster.extender.env = None
        cluster.restart_extender(kill=False)


def sneak_in(scenario: Scenario) -> None:
    """A pod bound straight to the node takes its 2g.10gb, behind migchain's back, and runs."""
    sneak = mig_pod("sneak", scenario.test, {"2g.10gb": 1}, spec={"nodeName": NODE})
    sneak["spec"]["containers"][0] |= {
        "image": BUSYBOX_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["/bin/busybox", "sleep", "3600"],
    }
    scenario.api.create(path("api", "v1", "namespaces", scenario.namespace, "pods"), sneak)
    wait_until(lambda: running(scenario, "sneak"), 30, "the pod behind migchain's back to run")


def refused_by_kubelet(scenario: Scenario, name: str) -> dict[str, Any]:
    """What the kubelet does (and what the fake kubelet never did): it refuses the borrowing copy.

    Read from the kubelet's Event, which stays: the returner may bring a bare pod back within a
    quarter of a second, before a poll of the pod sees it Failed. The refused pod, if still there.
    """

    def refusal() -> dict[str, Any] | None:
        items, _ = scenario.api.list_all(
            path("api", "v1", "namespaces", scenario.namespace, "events"),
            fieldSelector=f"involvedObject.name={name},reason=UnexpectedAdmissionError",
        )
        return items[0] if items else None

    event: dict[str, Any] = wait_until(refusal, 60, f"the kubelet to refuse {name}")
    assert "requested number of devices unavailable" in event["message"]
    uid = event["involvedObject"]["uid"]
    gone = {"metadata": {"name": name, "uid": uid}}

    def failed_or_gone() -> dict[str, Any] | None:
        try:
            pod = scenario.pod(name)
        except ApiError:
            return gone
        if pod["metadata"]["uid"] != uid:
            return gone  # brought back already, under its name
        return pod if pod.get("status", {}).get("phase") == "Failed" else None

    refused: dict[str, Any] = wait_until(failed_or_gone, 30, f"the refused {name} to be Failed")
    return refused


def test_a_bare_borrower_the_kubelet_rejects_for_a_slice_taken_behind_migchains_back_is_brought_back(
    scenario: Scenario, on_node: RealNode
):
    real_pod(scenario, "fits", {"1g.5gb": 1})
    wait_until(lambda: running(scenario, "fits"), 60, "fits to run")
    # migchain stalls between deleting the bare pod and creating its borrowing copy; meanwhile a pod bound
    # straight to the node takes the 2g.10gb it is about to give.
    with extender_stalls(scenario.cluster, "bare-after-delete"):
        original = real_pod(scenario, "borrows", {"1g.5gb": 1})
        wait_until(lambda: gone_or_replaced(scenario, "borrows", original["metadata"]["uid"]), 30, "the delete")
        sneak_in(scenario)
        failed = refused_by_kubelet(scenario, "borrows")
    back = wait_until(lambda: brought_back(scenario, "borrows", failed["metadata"]["uid"]), 60, "borrows to come back")
    assert not back["spec"].get("nodeName")  # pending: the node is full
    [event] = wait_until(lambda: scenario.events("borrows", "TurnedAway"), 30, "migchain's TurnedAway event")
    assert "brought back pending under its name" in event
    # The refused copy held nothing: once the pod behind migchain's back goes, borrows gets its 2g.10gb.
    scenario.api.delete(path("api", "v1", "namespaces", scenario.namespace, "pods", "sneak"), {"gracePeriodSeconds": 1})
    runs = wait_until(lambda: running(scenario, "borrows", failed["metadata"]["uid"]), 90, "borrows to run")
    assert granted(on_node, runs)[1] == "2g.10gb"


def test_an_owned_borrower_the_kubelet_rejects_is_left_to_its_controller_and_its_slices_are_not_counted(
    scenario: Scenario, on_node: RealNode
):
    real_pod(scenario, "fits", {"1g.5gb": 1})
    wait_until(lambda: running(scenario, "fits"), 60, "fits to run")
    trainer = replica_set("trainer", scenario.test, {"1g.5gb": 1}, 1)
    trainer["spec"]["template"]["spec"]["containers"][0] |= {
        "image": BUSYBOX_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["/bin/busybox", "sleep", "3600"],
    }
    trainer["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 1
    # migchain stalls before it creates the borrowing copy (once it has marked the original cheapest to delete).
    with extender_stalls(scenario.cluster, "owned-before-create"):
        owner = scenario.api.create(
            path("apis", "apps", "v1", "namespaces", scenario.namespace, "replicasets"), trainer
        )
        wait_until(lambda: marked_cheapest(scenario), 30, "migchain to start the borrow")
        sneak_in(scenario)
        copy = wait_until(lambda: owned_copy(scenario, owner["metadata"]["uid"]), 30, "the borrowing copy")
        failed = refused_by_kubelet(scenario, copy["metadata"]["name"])
    wait_until(lambda: scenario.events(copy["metadata"]["name"], "TurnedAway"), 30, "migchain's TurnedAway event")
    assert "left to its controller" in scenario.events(copy["metadata"]["name"], "TurnedAway")[0]
    assert scenario.pod(copy["metadata"]["name"])["metadata"]["uid"] == failed["metadata"]["uid"]  # left as it is
    # Its slices are not counted: the 2g.10gb is the pod's behind migchain's back, and only its.
    wait_until(lambda: slices_in_status(scenario)[G2]["used"] == 1, 30, "migchain to count the 2g.10gb once")
    assert slices_in_status(scenario)[G2] == {"allocatable": 1, "used": 1, "borrowed": 0, "free": 0}
    # The ReplicaSet's new pod borrows it once that pod goes, and runs.
    scenario.api.delete(path("api", "v1", "namespaces", scenario.namespace, "pods", "sneak"), {"gracePeriodSeconds": 1})
    fresh = wait_until(
        lambda: (
            (pod := owned_copy(scenario, owner["metadata"]["uid"], but=failed["metadata"]["uid"]))
            and running(scenario, pod["metadata"]["name"])
        ),
        90,
        "the ReplicaSet's new pod to borrow the 2g.10gb and run",
    )
    assert granted(on_node, fresh)[1] == "2g.10gb"


def marked_cheapest(scenario: Scenario) -> bool:
    """Whether migchain marked a ReplicaSet's pending pod the cheapest to delete: its borrow has begun."""
    return any(
        (pod["metadata"].get("annotations") or {}).get(DELETION_COST) == str(LOWEST_DELETION_COST)
        for pod in scenario.pods()
    )


def owned_copy(scenario: Scenario, owner_uid: str, but: str = "") -> dict[str, Any] | None:
    """The owner's borrowing copy (any but the pod `but`), once there is one."""
    for pod in scenario.pods():
        owners = [ref.get("uid") for ref in pod["metadata"].get("ownerReferences") or []]
        annotations = pod["metadata"].get("annotations") or {}
        if owner_uid in owners and "migchain.io/replaced-uid" in annotations and pod["metadata"]["uid"] != but:
            return pod
    return None
