"""Re-carving on the real control plane, through a MIG-Manager stand-in: idle nodes re-carved for sustained
unmet demand and used, a busy node never touched, a returner killed at any step of a re-carve recovered."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from extender.core.migconfig import MIG_CONFIG_LABEL, OPT_IN_LABEL, RECORD_ANNOTATION
from extender.core.recarve import GPU_COUNT_LABEL, RECARVING_TAINT
from extender.kube.api import ApiError, path
from tests.e2e.conftest import Cluster, Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import create_node, replica_set
from tests.e2e.migmanager import APPLIED_ANNOTATION, MANAGED_LABEL, MigManager, mig_config_document

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"
BALANCED = {"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1}  # the GPU Operator's all-balanced on an A100-40GB
ALL_SMALL = {"nvidia.com/mig-1g.5gb": 7}  # all-1g.5gb
CONFIG_MAP = ("gpu-operator", "custom-mig-config")
OTHER_CONFIGS = {"all-balanced": BALANCED, "admins-own": {"3g.20gb": 2}}  # kept whatever migchain adds
NO_BORROW = {"migchain.io/borrow": "false"}
# Seconds, not minutes: a pod is unmet demand after 2 s; a node is re-carved once in the test's time.
RECARVE_ARGS = [
    "--recarve",
    "--recarve-sustained-seconds=2",
    "--recarve-cooldown-seconds=3600",
    "--recarve-max-in-flight=2",
    "--recarve-settle-seconds=0",
    "--recarve-quiet-seconds=1",
    f"--recarve-config-map={CONFIG_MAP[0]}/{CONFIG_MAP[1]}",
]


@pytest.fixture(scope="module")
def mig_manager(cluster: Cluster) -> Iterator[MigManager]:
    """The MIG Manager's ConfigMap, the stand-in that applies it, and the returner restarted with --recarve."""
    cluster.plane.ensure_namespace(CONFIG_MAP[0])
    configmaps = path("api", "v1", "namespaces", CONFIG_MAP[0], "configmaps")
    with contextlib.suppress(ApiError):  # left by an earlier run of this module
        cluster.api.delete(f"{configmaps}/{CONFIG_MAP[1]}")
    cluster.api.create(
        configmaps,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": CONFIG_MAP[1]},
            "data": {"config.yaml": mig_config_document(OTHER_CONFIGS)},
        },
    )
    manager = MigManager(cluster.api, CONFIG_MAP).start()
    restart_returner(cluster, RECARVE_ARGS)
    yield manager
    manager.stop()
    restart_returner(cluster, [])


def restart_returner(cluster: Cluster, args: list[str], env: dict[str, str] | None = None) -> None:
    [returner] = cluster.returners
    returner.stop()
    cluster.start_returner("returner-a", env=env, args=args)
    # The lease names returner-a already: the new process's own gauge says when it leads.
    wait_until(lambda: cluster.returner_metric("migchain_returner_leader") == 1, 60, "the returner to lead")


def balanced_node(scenario: Scenario, name: str, *, gpus: int = 1) -> str:
    """An A100-40GB node of `gpus` GPUs carved all-balanced by the stand-in, opted in to re-carving."""
    create_node(scenario.api, name, A100, {p: n * gpus for p, n in BALANCED.items()}, scenario.test)
    scenario.api.patch(
        path("api", "v1", "nodes", name),
        {
            "metadata": {
                "labels": {
                    OPT_IN_LABEL: "true",
                    MANAGED_LABEL: "true",
                    GPU_COUNT_LABEL: str(gpus),
                    MIG_CONFIG_LABEL: "all-balanced",
                },
                "annotations": {APPLIED_ANNOTATION: "all-balanced"},
            }
        },
    )
    return name


def node(scenario: Scenario, name: str) -> dict[str, Any]:
    return scenario.api.get(path("api", "v1", "nodes", name))


def mig_allocatable(obj: dict[str, Any]) -> dict[str, int]:
    allocatable = obj["status"].get("allocatable") or {}
    return {r: int(n) for r, n in allocatable.items() if r.startswith("nvidia.com/mig-") and int(n)}


def record(obj: dict[str, Any]) -> dict[str, Any]:
    text = (obj["metadata"].get("annotations") or {}).get(RECORD_ANNOTATION)
    return json.loads(text) if text else {}


def done(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The node once its record says its re-carve is done; None before."""
    return obj if record(obj).get("step") == "done" else None


def settled(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The node once its MIG Manager reports success; None before."""
    return obj if obj["metadata"]["labels"].get("nvidia.com/mig.config.state") == "success" else None


def configs(scenario: Scenario) -> dict[str, Any]:
    configmap = scenario.api.get(path("api", "v1", "namespaces", CONFIG_MAP[0], "configmaps", CONFIG_MAP[1]))
    return dict(yaml.safe_load(configmap["data"]["config.yaml"])["mig-configs"])


def node_events(scenario: Scenario, name: str, reason: str) -> list[str]:
    items, _ = scenario.api.list_all(
        path("api", "v1", "namespaces", "default", "events"),
        fieldSelector=f"involvedObject.kind=Node,involvedObject.name={name},reason={reason}",
    )
    return [item.get("message", "") for item in items]


def small_pods(scenario: Scenario, count: int) -> list[str]:
    """Pods of three 1g.5gb slices each, which no all-balanced GPU holds (two each), not borrowing."""
    names = [f"small-{index}" for index in range(count)]
    for name in names:
        scenario.create_pod(name, {"1g.5gb": 3}, annotations=NO_BORROW)
    return names


def test_idle_balanced_nodes_are_recarved_for_small_pods_and_used_and_a_busy_one_is_never_touched(
    scenario: Scenario, mig_manager: MigManager
):
    cluster = scenario.cluster
    applied_before = cluster.returner_metric("migchain_recarves_total", outcome="applied")
    idle = [balanced_node(scenario, f"gpu-{scenario.test}-{i}") for i in range(2)]
    busy = balanced_node(scenario, f"gpu-{scenario.test}-busy")
    # The holder asks for 1g.5gb, the type the re-carves serve: a 3g.20gb pod arrived within the hour would leave
    # no 3g.20gb spare for the second re-carve (the forecast keeps the one free 3g for the next such pod).
    scenario.create_pod("holder", {"1g.5gb": 1}, node_selector={"kubernetes.io/hostname": busy})
    assert scenario.wait_bound("holder") == busy
    started = time.monotonic()
    pods = small_pods(scenario, 4)  # 12 slices of 1g.5gb: two all-1g.5gb GPUs hold 14
    bound = {name: scenario.wait_bound(name, timeout=90) for name in pods}
    assert set(bound.values()) == set(idle)
    for name in idle:
        # The pods may run before the re-carver's next round sees the new allocatable and writes done.
        obj = wait_until(lambda n=name: done(node(scenario, n)), 30, f"{name}'s record to say done")
        assert mig_allocatable(obj) == ALL_SMALL
        assert obj["metadata"]["labels"][MIG_CONFIG_LABEL] == "migchain-7x1g.5gb"
        assert obj["metadata"]["labels"]["nvidia.com/mig.config.state"] == "success"
        assert [item.outcome for item in mig_manager.applied_to(name)] == ["success"]
        assert node_events(scenario, name, "Recarved")
        assert not [t for t in obj["spec"].get("taints") or [] if t["key"] == RECARVING_TAINT]
    busy_obj = node(scenario, busy)
    assert busy_obj["metadata"]["labels"][MIG_CONFIG_LABEL] == "all-balanced"
    assert mig_allocatable(busy_obj) == {f"nvidia.com/mig-{p}": n for p, n in BALANCED.items()}
    assert not mig_manager.applied_to(busy)
    assert RECORD_ANNOTATION not in (busy_obj["metadata"].get("annotations") or {})
    kept = configs(scenario)
    assert kept["migchain-7x1g.5gb"] == [{"devices": "all", "mig-enabled": True, "mig-devices": {"1g.5gb": 7}}]
    assert {name: kept[name] for name in OTHER_CONFIGS} == yaml.safe_load(mig_config_document(OTHER_CONFIGS))[
        "mig-configs"
    ]
    assert cluster.returner_metric("migchain_recarves_total", outcome="applied") - applied_before == 2
    count = cluster.returner_metric("migchain_recarve_seconds_count")
    seconds = cluster.returner_metric("migchain_recarve_seconds_sum") / count
    # The stand-in applies in about a second; the re-carver notices within a round (2 s) on a loaded machine.
    print(f"recarve: {len(pods)} pods bound in {time.monotonic() - started:.1f} s; time to capacity {seconds:.1f} s")
    assert count >= 2 and seconds < 30


def bind_intruder(scenario: Scenario, target: str) -> None:
    """A pod holding a 1g.5gb on `target`, bound by its spec (no scheduler, so no taint keeps it off)."""
    intruder = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "intruder"},
        "spec": {
            "nodeName": target,
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "main",
                    "image": "registry.k8s.io/pause:3.10",
                    "resources": {"limits": {"nvidia.com/mig-1g.5gb": "1"}},
                }
            ],
        },
    }
    scenario.api.create(path("api", "v1", "namespaces", scenario.namespace, "pods"), intruder)


def test_a_pod_that_takes_a_slice_before_the_label_is_set_keeps_the_node_as_it_is(
    scenario: Scenario, mig_manager: MigManager
):
    cluster = scenario.cluster
    target = balanced_node(scenario, f"gpu-{scenario.test}-0")
    # The re-carver stalls 4 s between its record and its label: a pod is bound to the node meanwhile.
    restart_returner(cluster, RECARVE_ARGS, env={**os.environ, "MIGCHAIN_FAILPOINTS": "recarve-after-record@4"})
    try:
        small_pods(scenario, 1)
        wait_until(lambda: record(node(scenario, target)).get("step") == "planned", 60, "the re-carve to be planned")
        bind_intruder(scenario, target)
        wait_until(lambda: record(node(scenario, target)).get("step") == "abandoned", 60, "the re-carve abandoned")
    finally:
        restart_returner(cluster, RECARVE_ARGS)
    obj = node(scenario, target)
    assert obj["metadata"]["labels"][MIG_CONFIG_LABEL] == "all-balanced"
    assert mig_allocatable(obj) == {f"nvidia.com/mig-{p}": n for p, n in BALANCED.items()}
    assert not mig_manager.applied_to(target)
    assert "intruder" in record(obj)["reason"]
    assert node_events(scenario, target, "RecarveFailed")


def test_a_config_the_mig_manager_refuses_puts_the_label_back_and_changes_nothing(
    scenario: Scenario, mig_manager: MigManager
):
    cluster = scenario.cluster
    failed_before = cluster.returner_metric("migchain_recarves_total", outcome="failed")
    target = balanced_node(scenario, f"gpu-{scenario.test}-0")
    # The re-carver stalls 4 s between the config and the label, after its last read of the node's pods: a pod
    # bound meanwhile holds a slice when the MIG Manager applies, which refuses (as a real one on a busy instance).
    [returner] = cluster.returners
    restart_returner(cluster, RECARVE_ARGS, env={**os.environ, "MIGCHAIN_FAILPOINTS": "recarve-after-config@4"})
    since = len(returner.log.read_text())
    try:
        small_pods(scenario, 1)
        stalling = "failpoint recarve-after-config: stalling"  # after its last read of the pods, before the label
        wait_until(lambda: stalling in returner.log.read_text()[since:], 60, "the re-carver to stall")
        bind_intruder(scenario, target)
        wait_until(lambda: record(node(scenario, target)).get("step") == "failed", 60, "the re-carve to fail")
        obj = wait_until(lambda: settled(node(scenario, target)), 30, "the old config applied again")
        assert cluster.returner_metric("migchain_recarves_total", outcome="failed") - failed_before == 1
    finally:
        restart_returner(cluster, RECARVE_ARGS)
    assert obj["metadata"]["labels"][MIG_CONFIG_LABEL] == "all-balanced"
    assert mig_allocatable(obj) == {f"nvidia.com/mig-{p}": n for p, n in BALANCED.items()}
    assert [item.outcome for item in mig_manager.applied_to(target)] == ["failed"]
    assert not obj["spec"].get("taints")
    assert node_events(scenario, target, "RecarveFailed")


def test_the_stand_in_refuses_a_config_on_a_node_whose_slices_are_in_use(scenario: Scenario, mig_manager: MigManager):
    target = balanced_node(scenario, f"gpu-{scenario.test}-0")
    scenario.api.patch(path("api", "v1", "nodes", target), {"metadata": {"labels": {OPT_IN_LABEL: None}}})
    scenario.create_pod("holder", {"1g.5gb": 1})
    scenario.wait_bound("holder")
    scenario.api.patch(path("api", "v1", "nodes", target), {"metadata": {"labels": {MIG_CONFIG_LABEL: "admins-own"}}})
    wait_until(
        lambda: node(scenario, target)["metadata"]["labels"]["nvidia.com/mig.config.state"] == "failed",
        30,
        "the stand-in to fail",
    )
    [refused] = mig_manager.applied_to(target)
    assert refused.outcome == "failed" and "holder" in refused.why
    assert mig_allocatable(node(scenario, target)) == {f"nvidia.com/mig-{p}": n for p, n in BALANCED.items()}


@pytest.mark.parametrize("step", ["recarve-after-record", "recarve-after-config", "recarve-after-label"])
def test_a_returner_killed_mid_recarve_is_followed_by_one_that_finishes_it(
    scenario: Scenario, mig_manager: MigManager, step: str
):
    cluster = scenario.cluster
    [returner] = cluster.returners
    target = balanced_node(scenario, f"gpu-{scenario.test}-0")
    restart_returner(cluster, RECARVE_ARGS, env={**os.environ, "MIGCHAIN_FAILPOINTS": step})
    try:
        [pod] = small_pods(scenario, 1)
        wait_until(lambda: not returner.alive(), 60, f"the returner to die at {step}")
        died = node(scenario, target)
        assert record(died)["step"] == ("labelled" if step == "recarve-after-label" else "planned")
    finally:
        restart_returner(cluster, RECARVE_ARGS)
    assert scenario.wait_bound(pod, timeout=90) == target
    obj = wait_until(lambda: done(node(scenario, target)), 60, "the record to say done")
    # One pod asks for three 1g.5gb: the planner keeps what it can of the rest (five 1g.5gb and a 2g.10gb).
    carved = record(obj)
    assert mig_allocatable(obj) == carved["layout"] and carved["layout"]["nvidia.com/mig-1g.5gb"] >= 3
    assert obj["metadata"]["labels"][MIG_CONFIG_LABEL] == carved["config"]
    assert len(carved["history"]) == 1  # one re-carve, not two
    assert [(item.config, item.outcome) for item in mig_manager.applied_to(target)] == [(carved["config"], "success")]
    assert set(configs(scenario)) >= {carved["config"], *OTHER_CONFIGS}


def test_dry_run_announces_the_recarve_on_the_node_and_writes_nothing(scenario: Scenario, mig_manager: MigManager):
    cluster = scenario.cluster
    restart_returner(cluster, ["--recarve-dry-run" if arg == "--recarve" else arg for arg in RECARVE_ARGS])
    try:
        target = balanced_node(scenario, f"gpu-{scenario.test}-0")
        small_pods(scenario, 1)
        [message] = wait_until(lambda: node_events(scenario, target, "WouldRecarve"), 60, "the dry run's Event")
        time.sleep(4)  # two more rounds: still nothing written, announced once
        assert len(node_events(scenario, target, "WouldRecarve")) == 1
        # Read before the live re-carver is back: it would rightly re-carve this node for the pods still pending.
        obj = node(scenario, target)
        applied = mig_manager.applied_to(target)
        for name in [pod["metadata"]["name"] for pod in scenario.pods()]:
            scenario.api.delete(path("api", "v1", "namespaces", scenario.namespace, "pods", name))
    finally:
        restart_returner(cluster, RECARVE_ARGS)
    assert message.startswith("dry run: would re-carve every GPU as migchain-")
    assert RECORD_ANNOTATION not in (obj["metadata"].get("annotations") or {})
    assert obj["metadata"]["labels"][MIG_CONFIG_LABEL] == "all-balanced" and not obj["spec"].get("taints")
    assert not applied


def holders_on_a_busy_node(scenario: Scenario) -> tuple[str, dict[str, str]]:
    """A fleet with no idle opted-in node: one balanced node, opted in, whose two 1g.5gb slices two pods of a
    ReplicaSet hold; and one balanced node not opted in, whose free 2g.10gb and 3g.20gb make the busy node's spare
    for the forecast (a drain starts only with twice what it takes spare). Returns the busy node and the holders
    (name -> uid)."""
    busy = balanced_node(scenario, f"gpu-{scenario.test}-busy")
    create_node(scenario.api, f"gpu-{scenario.test}-other", A100, BALANCED, scenario.test)
    holders = replica_set("holders", scenario.test, {"1g.5gb": 1}, 2)
    holders["spec"]["template"]["spec"]["nodeSelector"]["kubernetes.io/hostname"] = busy
    scenario.api.create(path("apis", "apps", "v1", "namespaces", scenario.namespace, "replicasets"), holders)
    running = wait_until(lambda: running_holders(scenario, busy, 2), 60, "the holders to run on the busy node")
    return busy, running


def running_holders(scenario: Scenario, where: str, count: int) -> dict[str, str] | None:
    """The ReplicaSet's pods (name -> uid) once `count` of them run on `where`, none leaving; None before."""
    pods = [pod for pod in scenario.pods() if pod["metadata"].get("labels", {}).get("app") == "holders"]
    running = {
        pod["metadata"]["name"]: pod["metadata"]["uid"]
        for pod in pods
        if pod["spec"].get("nodeName") == where
        and pod.get("status", {}).get("phase") == "Running"
        and not pod["metadata"].get("deletionTimestamp")
    }
    return running if len(running) == count == len(pods) else None


def recarving_taints(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [taint for taint in obj["spec"].get("taints") or [] if taint["key"] == RECARVING_TAINT]


def test_with_drain_a_busy_node_is_cordoned_its_holders_evicted_and_it_is_recarved_and_used_with_no_pod_lost(
    scenario: Scenario, mig_manager: MigManager
):
    cluster = scenario.cluster
    restart_returner(cluster, [*RECARVE_ARGS, "--recarve-drain"])
    try:
        busy, before = holders_on_a_busy_node(scenario)
        evictions = cluster.returner_metric("migchain_recarve_drain_evictions_total")
        started = time.monotonic()
        [pod] = small_pods(scenario, 1)  # three 1g.5gb: fits no GPU of the fleet, not by borrowing either
        draining = wait_until(
            lambda: record(node(scenario, busy)).get("step") == "draining" or None, 60, "the busy node to drain"
        )
        assert draining
        cordoned = node(scenario, busy)
        assert recarving_taints(cordoned) and recarving_taints(cordoned)[0]["effect"] == "NoSchedule"
        cordoned_after = time.monotonic() - started
        assert scenario.wait_bound(pod, timeout=120) == busy
        bound_after = time.monotonic() - started
        obj = wait_until(lambda: done(node(scenario, busy)), 60, "the record to say done")
        # No pod lost: the ReplicaSet's two pods run again, new ones (evicted, recreated), on the re-carved node.
        after = wait_until(lambda: running_holders(scenario, busy, 2), 60, "the holders to run again")
        evicted = cluster.returner_metric("migchain_recarve_drain_evictions_total") - evictions
    finally:
        restart_returner(cluster, RECARVE_ARGS)
    assert not set(after.values()) & set(before.values())
    assert evicted == 2
    [told] = node_events(scenario, busy, "DrainEvicted")
    assert all(name in told for name in before)
    assert node_events(scenario, busy, "Draining")
    carved = record(obj)
    assert mig_allocatable(obj) == carved["layout"] and carved["layout"]["nvidia.com/mig-1g.5gb"] >= 5
    assert obj["metadata"]["labels"][MIG_CONFIG_LABEL] == carved["config"]
    assert [(item.config, item.outcome) for item in mig_manager.applied_to(busy)] == [(carved["config"], "success")]
    assert len(carved["history"]) == 1 and not recarving_taints(obj)
    print(f"drain: cordoned after {cordoned_after:.1f} s, pod bound after {bound_after:.1f} s, {evicted:.0f} evicted")


def test_without_drain_no_busy_node_is_cordoned_nor_any_pod_evicted(scenario: Scenario, mig_manager: MigManager):
    cluster = scenario.cluster
    busy, before = holders_on_a_busy_node(scenario)
    evictions = cluster.returner_metric("migchain_recarve_drain_evictions_total")
    [pod] = small_pods(scenario, 1)
    # The pod is unmet demand after 2 s; the re-carver runs a round every 2 s or sooner: five rounds or more.
    time.sleep(12)
    obj = node(scenario, busy)
    assert not recarving_taints(obj) and RECORD_ANNOTATION not in (obj["metadata"].get("annotations") or {})
    assert running_holders(scenario, busy, 2) == before
    assert not scenario.pod(pod)["spec"].get("nodeName")
    assert cluster.returner_metric("migchain_recarve_drain_evictions_total") == evictions
    assert not mig_manager.applied_to(busy)


@pytest.mark.parametrize("step", ["recarve-after-drain", "recarve-after-evict"])
def test_a_returner_killed_mid_drain_is_followed_by_one_that_finishes_it_with_no_pod_lost(
    scenario: Scenario, mig_manager: MigManager, step: str
):
    cluster = scenario.cluster
    [returner] = cluster.returners
    drain = [*RECARVE_ARGS, "--recarve-drain"]
    try:
        busy, before = holders_on_a_busy_node(scenario)
        restart_returner(cluster, drain, env={**os.environ, "MIGCHAIN_FAILPOINTS": step})
        [pod] = small_pods(scenario, 1)
        wait_until(lambda: not returner.alive(), 60, f"the returner to die at {step}")
        died = node(scenario, busy)
        assert record(died)["step"] == "draining" and recarving_taints(died)
        restart_returner(cluster, drain)
        assert scenario.wait_bound(pod, timeout=120) == busy
        obj = wait_until(lambda: done(node(scenario, busy)), 60, "the record to say done")
        after = wait_until(lambda: running_holders(scenario, busy, 2), 60, "the holders to run again")
    finally:
        restart_returner(cluster, RECARVE_ARGS)
    assert not set(after.values()) & set(before.values())
    carved = record(obj)
    assert len(carved["history"]) == 1 and not recarving_taints(obj)
    assert [(item.config, item.outcome) for item in mig_manager.applied_to(busy)] == [(carved["config"], "success")]


def test_with_drain_a_disruption_budget_that_allows_none_is_waited_for_never_forced(
    scenario: Scenario, mig_manager: MigManager
):
    cluster = scenario.cluster
    budgets = path("apis", "policy", "v1", "namespaces", scenario.namespace, "poddisruptionbudgets")
    restart_returner(cluster, [*RECARVE_ARGS, "--recarve-drain"])
    try:
        busy, before = holders_on_a_busy_node(scenario)
        budget = {"minAvailable": 2, "selector": {"matchLabels": {"app": "holders"}}}
        scenario.api.create(
            budgets,
            {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "holders"}, "spec": budget},
        )
        evictions = cluster.returner_metric("migchain_recarve_drain_evictions_total")
        [pod] = small_pods(scenario, 1)
        waits = wait_until(lambda: node_events(scenario, busy, "DrainWaits"), 60, "the drain to wait for the budget")
        time.sleep(4)  # two rounds more: asked again, refused again
        assert all("PodDisruptionBudget" in message for message in waits)
        assert running_holders(scenario, busy, 2) == before
        assert cluster.returner_metric("migchain_recarve_drain_evictions_total") == evictions
        assert record(node(scenario, busy))["step"] == "draining" and not scenario.pod(pod)["spec"].get("nodeName")
        scenario.api.delete(f"{budgets}/holders")  # the budget goes: the next round evicts
        assert scenario.wait_bound(pod, timeout=120) == busy
        after = wait_until(lambda: running_holders(scenario, busy, 2), 60, "the holders to run again")
        evicted = cluster.returner_metric("migchain_recarve_drain_evictions_total") - evictions
    finally:
        restart_returner(cluster, RECARVE_ARGS)
    assert not set(after.values()) & set(before.values()) and evicted == 2
