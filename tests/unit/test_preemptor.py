"""The preemptor adapter with a scripted API: check, nominate, evict in that order; PDBs spare; dry run; metrics."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, cast

import pytest

from extender.config import load_rules
from extender.core.cluster import Snapshot, node_state, pod_record
from extender.kube.api import ApiError, KubeApi
from extender.kube.events import EventRecorder
from extender.kube.executor import EvictionBlocked, Executor
from extender.kube.preemptor import Preemptor
from extender.metrics import ReturnerMetrics
from tests.unit.objects import LOAN_KEY
from tests.unit.test_manifests import ROOT

RULES = load_rules([ROOT / "chains" / "a100-40gb.yaml"])
A100 = "NVIDIA-A100-SXM4-40GB"
G1 = "nvidia.com/mig-1g.5gb"


def pod(name: str, node: str = "", priority: int = 10, **metadata: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running" if node else "Pending"}
    if not node:
        status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]
    return {
        "metadata": {"name": name, "namespace": "ml", "uid": f"uid-{name}", **metadata},
        "spec": {
            "schedulerName": "migchain-scheduler",
            "priority": priority,
            "nodeName": node,
            "containers": [{"name": "c", "resources": {"limits": {G1: "1"}}}],
        },
        "status": status,
    }


def node(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.product": A100}},
        "status": {"allocatable": {G1: "1"}},
    }


class ScriptedExecutor:
    """Executor calls recorded in order; evictions of the pods named in `budgets` refused with 429."""

    loan_key = LOAN_KEY

    def __init__(self, pods: list[dict[str, Any]], budgets: Collection[str] = (), fail: str = "") -> None:
        self.api = self
        self.pods = {p["metadata"]["name"]: p for p in pods}
        self.budgets = budgets
        self.fail = fail
        self.calls: list[tuple[str, str]] = []
        self.events: list[tuple[str, str]] = []

    def get(self, resource: str, **_: Any) -> dict[str, Any]:
        name = resource.rsplit("/", 1)[1]
        if name not in self.pods:
            raise ApiError(404, "NotFound", resource)
        return self.pods[name]

    def create(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:  # events only
        self.events.append((body["involvedObject"]["name"], body["reason"]))
        return body

    def evict(self, target: dict[str, Any], *, dry_run: bool = False) -> None:
        name = target["metadata"]["name"]
        self.calls.append(("check" if dry_run else "evict", name))
        if name in self.budgets:
            raise EvictionBlocked("Cannot evict pod as it would violate the pod's disruption budget.")

    def nominate(self, target: dict[str, Any], where: str) -> None:
        if self.fail == "nominate":
            raise ApiError(500, "InternalError", "etcd timeout")
        self.calls.append(("nominate", f"{target['metadata']['name']}->{where}"))

    def restore(self, target: dict[str, Any], restored: dict[str, Any], owned: bool) -> str:
        self.calls.append(("restore", target["metadata"]["name"]))
        return "evicted and recreated"


def run(executor: ScriptedExecutor, *, dry_run: bool = False, metrics: ReturnerMetrics | None = None) -> Preemptor:
    metrics = metrics or ReturnerMetrics()
    preemptor = Preemptor(cast(Executor, executor), EventRecorder(cast(KubeApi, executor)), metrics, dry_run=dry_run)
    preemptor_round(preemptor, executor)
    return preemptor


def preemptor_round(preemptor: Preemptor, executor: ScriptedExecutor) -> None:
    records = [pod_record(p) for p in executor.pods.values()]
    used: dict[str, dict[str, int]] = {}
    for record in records:
        if record.node:
            used.setdefault(record.node, {})[G1] = used.get(record.node, {}).get(G1, 0) + 1
    snapshot = Snapshot.of(node_state(node(name), counts) for name, counts in sorted(used.items()))  # all full
    preemptor.round(snapshot, records, RULES, leading=lambda: True)


def outcomes(metrics: ReturnerMetrics) -> dict[str, float]:
    return {
        sample.labels["outcome"]: sample.value
        for family in metrics.registry.collect()
        if family.name == "migchain_preemptions"
        for sample in family.samples
        if sample.name == "migchain_preemptions_total"
    }


def test_checks_every_victim_then_nominates_then_evicts_and_tells_both_pods():
    metrics = ReturnerMetrics()
    executor = ScriptedExecutor([pod("holder", "gpu-a"), pod("urgent", priority=1000)])
    run(executor, metrics=metrics)
    assert executor.calls == [("check", "holder"), ("nominate", "urgent->gpu-a"), ("evict", "holder")]
    assert executor.events == [("urgent", "Preempting"), ("holder", "Preempted")]
    assert outcomes(metrics) == {"preempted": 1}


def test_a_budget_that_refuses_spares_its_pod_and_the_next_round_takes_another_node():
    metrics = ReturnerMetrics()
    kept = pod("kept", "gpu-a", creationTimestamp="2026-11-30T10:00:30Z")  # the later victim: picked first
    free = pod("free", "gpu-b", creationTimestamp="2026-11-30T10:00:01Z")
    executor = ScriptedExecutor([kept, free, pod("urgent", priority=1000)], budgets={"kept"})
    preemptor = run(executor, metrics=metrics)
    assert executor.calls == [("check", "kept")]  # nothing nominated, nothing evicted
    assert executor.events == [("urgent", "PreemptionBlocked")]
    preemptor_round(preemptor, executor)
    assert executor.calls[1:] == [("check", "free"), ("nominate", "urgent->gpu-b"), ("evict", "free")]
    assert outcomes(metrics) == {"blocked": 1, "preempted": 1}


def test_a_preemptor_is_not_preempted_for_twice_while_its_victims_leave():
    executor = ScriptedExecutor([pod("holder", "gpu-a"), pod("other", "gpu-b"), pod("urgent", priority=1000)])
    preemptor = run(executor)
    preemptor_round(preemptor, executor)  # the cache has not seen the eviction yet
    assert [call for call in executor.calls if call[0] == "evict"] == [("evict", "holder")]


def test_a_borrower_victim_is_restored_not_evicted_for_good():
    loan = {
        "migchain.io/original-requests": "nvidia.com/mig-1g.5gb=1",
        "migchain.io/borrowed-requests": "nvidia.com/mig-1g.5gb=1",
        "migchain.io/chain": "a100-40gb",
        "migchain.io/steps": "0",
        "migchain.io/replaced-uid": "old",
    }
    executor = ScriptedExecutor([pod("borrower", "gpu-a", annotations=loan), pod("urgent", priority=1000)])
    run(executor)
    assert executor.calls[-1] == ("restore", "borrower")


@pytest.mark.parametrize(
    ("pods", "fail", "outcome"),
    [
        ([pod("holder", "gpu-b"), pod("urgent", priority=1000)], "", "gone"),  # the cache said gpu-a
        ([pod("holder", "gpu-a"), pod("urgent", priority=1000)], "nominate", "failed"),
    ],
)
def test_a_pod_that_changed_or_an_api_error_stops_the_preemption_before_any_eviction(pods, fail, outcome):
    metrics = ReturnerMetrics()
    executor = ScriptedExecutor(pods, fail=fail)
    preemptor = Preemptor(cast(Executor, executor), EventRecorder(cast(KubeApi, executor)), metrics)
    records = [pod_record(pod("holder", "gpu-a")), pod_record(pod("urgent", priority=1000))]
    snapshot = Snapshot.of([node_state(node("gpu-a"), {G1: 1}), node_state(node("gpu-b"), {G1: 1})])
    preemptor.round(snapshot, records, RULES, leading=lambda: True)
    assert not [call for call in executor.calls if call[0] == "evict"]
    assert outcomes(metrics) == {outcome: 1}


def test_dry_run_announces_once_and_touches_nothing():
    metrics = ReturnerMetrics()
    executor = ScriptedExecutor([pod("holder", "gpu-a"), pod("urgent", priority=1000)])
    preemptor = run(executor, dry_run=True, metrics=metrics)
    preemptor_round(preemptor, executor)
    assert executor.calls == []
    assert executor.events == [("urgent", "WouldPreempt")]
    assert outcomes(metrics) == {"dry-run": 1}


def test_a_borrower_victim_whose_record_turns_unreadable_is_not_restored_and_the_round_goes_on():
    """Issue 17: restored_pod's ObjectError (a record edited since the cache read it) ended the whole round."""
    loan = {
        "migchain.io/original-requests": "nvidia.com/mig-1g.5gb=1",
        "migchain.io/borrowed-requests": "nvidia.com/mig-1g.5gb=1",
        "migchain.io/chain": "a100-40gb",
        "migchain.io/steps": "0",
        "migchain.io/replaced-uid": "old",
    }
    seen = pod("borrower", "gpu-a", annotations=loan)
    edited = pod("borrower", "gpu-a", annotations={**loan, "migchain.io/original-resources": "{"})
    metrics = ReturnerMetrics()
    executor = ScriptedExecutor([edited, pod("urgent", priority=1000)])
    preemptor = Preemptor(cast(Executor, executor), EventRecorder(cast(KubeApi, executor)), metrics)
    records = [pod_record(seen), pod_record(pod("urgent", priority=1000))]
    preemptor.round(Snapshot.of([node_state(node("gpu-a"), {G1: 1})]), records, RULES, leading=lambda: True)
    assert ("restore", "borrower") not in executor.calls
    assert outcomes(metrics) == {"failed": 1}
