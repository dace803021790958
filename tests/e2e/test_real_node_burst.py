"""A 100-pod borrow-heavy burst across the real node (tests/e2e/realnode.py) and a kwok fleet: the kubelet rejects
no pod at admission, every slice of the cluster ends up running a pod, and each container on the real node sees a
device of the type it was granted.
"""

from __future__ import annotations

import collections
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from extender.kube.api import path
from tests.e2e import test_real_node as one_node
from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import create_node
from tests.e2e.invariants import borrowing, check_invariants, mig_requests
from tests.e2e.realnode import REALNODE_MARKS, RealNode, device_ids

pytestmark = REALNODE_MARKS

# The real node of tests/e2e/test_real_node.py, one for this module.
node = one_node.node
on_node = one_node.on_node

# 12 real containers, most of them on slices larger than the small type: many borrowers among them.
REAL_LAYOUT = {"1g.5gb": 2, "2g.10gb": 6, "3g.20gb": 4}
FLEET, FLEET_LAYOUT = 8, {"1g.5gb": 3, "2g.10gb": 3, "3g.20gb": 2}
SMALL, MEDIUM = 85, 15  # pods of 1g.5gb and of 2g.10gb: 100, mostly the small type, so most must borrow
REJECTED = ("UnexpectedAdmissionError", "OutOf")  # kubelet admission: devices unavailable, OutOfcpu, OutOfpods...


def rejections(scenario: Scenario, pods: list[dict[str, Any]]) -> list[str]:
    """Pods the kubelet refused at admission, and the Events saying so."""
    found = [
        f"{pod['metadata']['name']}: {pod['status'].get('reason')}: {pod['status'].get('message')}"
        for pod in pods
        if str(pod.get("status", {}).get("reason") or "").startswith(REJECTED)
    ]
    events, _ = scenario.api.list_all(path("api", "v1", "namespaces", scenario.namespace, "events"))
    return found + [
        f"event {event['involvedObject']['name']}: {event['reason']}: {event.get('message')}"
        for event in events
        if str(event.get("reason") or "").startswith(REJECTED)
    ]


def started(pod: dict[str, Any]) -> bool:
    """Running, and on the real node its container too."""
    statuses = pod.get("status", {}).get("containerStatuses") or []
    if pod.get("status", {}).get("phase") != "Running":
        return False
    return pod["spec"].get("nodeName") != one_node.NODE or bool(statuses and statuses[0].get("containerID"))


def test_a_borrow_heavy_burst_of_100_pods_across_the_real_node_and_a_kwok_fleet_runs_with_no_admission_rejection(
    scenario: Scenario, on_node: RealNode
):
    on_node.relayout(REAL_LAYOUT)
    wait_until(lambda: one_node.allocatable(scenario.cluster, "3g.20gb") == "4", 60, "the real node's larger layout")
    for index in range(FLEET):
        create_node(scenario.api, f"gpu-{scenario.test}-{index}", one_node.EAGER_GPU, FLEET_LAYOUT, scenario.test)
    slices = sum(REAL_LAYOUT.values()) + FLEET * sum(FLEET_LAYOUT.values())
    expected = min(SMALL + MEDIUM, slices)  # every type lends to the 1g.5gb pods: every slice can hold one
    names = [f"small-{i}" for i in range(SMALL)] + [f"medium-{i}" for i in range(MEDIUM)]
    random.Random(19).shuffle(names)
    created: dict[str, float] = {}
    running_since: dict[str, float] = {}

    def create(name: str) -> None:
        created[name] = time.monotonic()
        one_node.real_pod(scenario, name, {"1g.5gb" if name.startswith("small") else "2g.10gb": 1})

    def all_running() -> list[dict[str, Any]] | None:
        pods = scenario.pods()
        refused = rejections(scenario, pods)
        assert not refused, f"the kubelet rejected pods: {refused}"
        failed = [pod["metadata"]["name"] for pod in pods if pod.get("status", {}).get("phase") == "Failed"]
        assert not failed, f"pods failed: {failed}"
        now = time.monotonic()
        for pod in pods:
            if started(pod):
                running_since.setdefault(pod["metadata"]["name"], now)
        return pods if len(running_since) >= expected else None

    begin = time.monotonic()
    with ThreadPoolExecutor(8, thread_name_prefix="burst") as pool:
        list(pool.map(create, names))
    wait_until(all_running, 110, f"{expected} pods running", interval=0.5)
    all_in = time.monotonic() - begin
    time.sleep(5)  # a few scheduling retries of the pods left pending, and kubelet syncs: nothing changes
    pods = check_invariants(scenario.api, scenario.namespace, bare=names)  # no over-commit, no pod lost
    assert not rejections(scenario, pods)

    running = [pod for pod in pods if started(pod)]
    pending = [
        pod for pod in pods if pod.get("status", {}).get("phase") == "Pending" and not pod["spec"].get("nodeName")
    ]
    assert (len(running), len(pending)) == (expected, len(names) - expected)
    on_real = [pod for pod in running if pod["spec"]["nodeName"] == one_node.NODE]
    devices: collections.Counter[str] = collections.Counter()
    for pod in on_real:
        [resource] = mig_requests(pod)
        device, profile = one_node.granted(on_node, pod)
        granted_ids = device_ids(one_node.NODE, REAL_LAYOUT, profile)
        assert (profile, device in granted_ids) == (resource.removeprefix("nvidia.com/mig-"), True), pod
        devices[device] += 1
    assert len(on_real) == sum(REAL_LAYOUT.values()) and max(devices.values()) == 1  # every device, each once

    waits = sorted(running_since[name] - created[name] for name in running_since)
    borrowers = [pod for pod in running if borrowing(pod)]
    figures = {
        "pods": len(names),
        "slices": slices,
        "running": len(running),
        "pending": len(pending),
        "borrowers": len(borrowers),
        "borrowers on the real node": len([pod for pod in on_real if borrowing(pod)]),
        "create to all running s": round(all_in, 1),
        "p50 to running s": round(statistics.median(waits), 1),
        "p95 to running s": round(waits[int(0.95 * (len(waits) - 1))], 1),
    }
    print(f"\nburst: {figures}")
