"""Re-carving a real node (tests/e2e/realnode.py): the MIG-Manager stand-in re-partitions it through the stand-in
device plugin, the kubelet's allocatable follows, and a pending pod runs in a container on a device of the new
layout.

Part of `make test` when run as root (skipped otherwise, or with MIGCHAIN_E2E_REALNODE=0). Alone:
    .venv/bin/pytest -m realnode tests/e2e/test_real_node_recarve.py
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from extender.core.migconfig import MIG_CONFIG_LABEL, OPT_IN_LABEL
from extender.core.recarve import GPU_COUNT_LABEL, RECARVING_TAINT
from extender.kube.api import path
from tests.e2e import test_real_node as one_node
from tests.e2e import test_recarve as recarve
from tests.e2e.conftest import Cluster, Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import FAKE_NODE_LABEL, TEST_LABEL, gpu_node
from tests.e2e.migmanager import APPLIED_ANNOTATION, MANAGED_LABEL, MigManager
from tests.e2e.realnode import REALNODE_MARKS, RealNode, device_ids, real_node

pytestmark = REALNODE_MARKS

# The ConfigMap, the stand-in and the returner with --recarve of tests/e2e/test_recarve.py, one for this module.
mig_manager = recarve.mig_manager

NODE = "realnode-recarve"
ALL_SMALL = {"1g.5gb": 7}  # the layout the re-carve makes: profile -> devices the plugin advertises
SMALL = "nvidia.com/mig-1g.5gb"


@pytest.fixture(scope="module")
def node(cluster: Cluster, mig_manager: MigManager) -> Iterator[RealNode]:
    """A real A100-40GB node of one GPU carved all-balanced, idle, opted in, its MIG Manager the stand-in: one
    kubelet for the module."""
    labels = dict(gpu_node(NODE, recarve.A100, recarve.BALANCED, "none")[0]["metadata"]["labels"])
    del labels[FAKE_NODE_LABEL]  # kwok leaves this node to the real kubelet
    del labels[TEST_LABEL]  # given to one test at a time
    labels |= {GPU_COUNT_LABEL: "1", MIG_CONFIG_LABEL: "all-balanced"}
    with real_node(cluster.plane, NODE, dict(recarve.BALANCED), labels) as started:
        wait_until(lambda: kubelet_slices(cluster) == recarve.BALANCED, 60, "the real node to advertise its slices")
        mig_manager.device_plugins[NODE] = started
        # Managed and opted in once the stand-in knows what it carved and how to reach the device plugin.
        cluster.api.patch(
            path("api", "v1", "nodes", NODE),
            {
                "metadata": {
                    "labels": {MANAGED_LABEL: "true", OPT_IN_LABEL: "true"},
                    "annotations": {APPLIED_ANNOTATION: "all-balanced"},
                }
            },
        )
        yield started


def kubelet_slices(cluster: Cluster) -> dict[str, int] | None:
    """The node's MIG devices the kubelet offers (profile -> count, none at 0), once Ready."""
    status = cluster.api.get(path("api", "v1", "nodes", NODE))["status"]
    if {item["type"]: item["status"] for item in status.get("conditions", [])}.get("Ready") != "True":
        return None
    allocatable = status.get("allocatable") or {}
    return {
        resource.removeprefix("nvidia.com/mig-"): int(count)
        for resource, count in allocatable.items()
        if resource.startswith("nvidia.com/mig-") and int(count)
    }


def status_writers(obj: dict[str, Any], resource: str) -> set[str]:
    """The field managers that own the node's allocatable `resource` (the kubelet's own status updates, or a patch)."""
    return {
        entry["manager"]
        for entry in obj["metadata"].get("managedFields") or []
        if f"f:{resource}" in ((entry.get("fieldsV1") or {}).get("f:status") or {}).get("f:allocatable", {})
    }


@pytest.fixture
def on_node(node: RealNode, scenario: Scenario) -> Iterator[RealNode]:
    with one_node.in_scenario(node, scenario):
        yield node


def test_a_busy_real_node_is_never_recarved_and_its_container_runs_on(
    scenario: Scenario, on_node: RealNode, mig_manager: MigManager
):
    # First in the module: once re-carved, the node cools down for an hour and would be left alone anyway.
    one_node.real_pod(scenario, "holder", {"1g.5gb": 1})
    holder = wait_until(lambda: one_node.running(scenario, "holder"), 60, "holder to run")
    container = holder["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    plugin_log = on_node.processes["migdeviceplugin"].log
    logged_before = len(plugin_log.read_text())
    one_node.real_pod(scenario, "small-0", {"1g.5gb": 3}, annotations=recarve.NO_BORROW)
    wait_until(lambda: scenario.events("small-0", "FailedScheduling"), 30, "small-0 to find no node")
    time.sleep(8)  # unmet demand after 2 s, then rounds of the re-carver: none may touch the node
    obj = recarve.node(scenario, NODE)
    assert not recarve.record(obj)
    assert obj["metadata"]["labels"][MIG_CONFIG_LABEL] == "all-balanced"
    assert not obj["spec"].get("taints")
    assert not mig_manager.applied_to(NODE)
    assert "registered" not in plugin_log.read_text()[logged_before:]
    assert kubelet_slices(scenario.cluster) == recarve.BALANCED
    assert container in on_node.running_tasks()
    # The pending pod goes before the holder: an idle node with demand left would be re-carved meanwhile.
    scenario.api.delete(path("api", "v1", "namespaces", scenario.namespace, "pods", "small-0"))
    wait_until(lambda: "small-0" not in [pod["metadata"]["name"] for pod in scenario.pods()], 30, "small-0 gone")


def test_an_idle_real_node_is_recarved_through_its_device_plugin_and_a_pending_pod_runs_on_a_new_device(
    scenario: Scenario, on_node: RealNode, mig_manager: MigManager
):
    cluster = scenario.cluster
    assert kubelet_slices(cluster) == recarve.BALANCED
    plugin_log = on_node.processes["migdeviceplugin"].log
    logged_before = len(plugin_log.read_text())
    started = time.monotonic()
    # A stream of pods of three 1g.5gb each, which no all-balanced GPU holds (two), not borrowing; both wait
    # together (the re-carver counts a pod after 2 s): the re-carve serves both with seven.
    names = ["small-0", "small-1"]
    for name in names:
        one_node.real_pod(scenario, name, {"1g.5gb": 3}, annotations=recarve.NO_BORROW)
    obj = wait_until(lambda: recarve.done(recarve.node(scenario, NODE)), 120, "the re-carve to be done")
    recarved = time.monotonic() - started
    assert obj["metadata"]["labels"][MIG_CONFIG_LABEL] == "migchain-7x1g.5gb"
    assert [item.outcome for item in mig_manager.applied_to(NODE)] == ["success"]
    assert not [t for t in obj["spec"].get("taints") or [] if t["key"] == RECARVING_TAINT]
    # The kubelet offers the new layout, from the device plugin: it re-registered seven devices, and the allocatable
    # is the kubelet's own status, not a patch.
    assert kubelet_slices(cluster) == ALL_SMALL
    assert "registered nvidia.com/mig-1g.5gb with 7 devices" in plugin_log.read_text()[logged_before:]
    assert status_writers(obj, SMALL) == {"kubelet"}
    # Both pods run in containers on the new devices: six distinct ones, at least four that the old layout lacked.
    new_ids, old_ids = device_ids(NODE, ALL_SMALL, "1g.5gb"), device_ids(NODE, recarve.BALANCED, "1g.5gb")
    granted: list[str] = []
    for name in names:
        pod = wait_until(lambda n=name: one_node.running(scenario, n), 90, f"{name} to run")
        assert pod["spec"]["nodeName"] == NODE
        devices, profile = one_node.granted(on_node, pod)
        assert profile == "1g.5gb"
        granted += devices.split(",")
    ran = time.monotonic() - started
    assert len(granted) == len(set(granted)) == 6 and set(granted) <= new_ids
    assert set(granted) - old_ids
    assert not scenario.events(names[0], "UnexpectedAdmissionError")
    assert not scenario.events(names[1], "UnexpectedAdmissionError")
    seconds = cluster.returner_metric("migchain_recarve_seconds_sum") / cluster.returner_metric(
        "migchain_recarve_seconds_count"
    )
    print(f"real-node recarve: done in {recarved:.1f} s, pods running in {ran:.1f} s; time to capacity {seconds:.1f} s")
