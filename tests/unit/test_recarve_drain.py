"""Drain to re-carve in the live re-carver (--recarve-drain) against a scripted API server, and its pure pieces."""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from extender.core.cluster import NodeState
from extender.core.migconfig import RECORD_ANNOTATION, RecarveRecord, read_record
from extender.core.recarve import RECARVING_TAINT, RecarvePolicy, drain_cost, drain_waste, free_compute
from extender.kube.events import EventRecorder
from extender.kube.executor import EvictionBlocked
from extender.kube.explain import render
from extender.kube.recarver import Recarver
from extender.kube.snapshot import read_cluster
from extender.metrics import ReturnerMetrics
from tests.unit.objects import A100, G1, G2, G3, RULES, node, pod
from tests.unit.test_recarver import (
    BALANCED,
    CONFIG_MAP,
    NOW,
    ScriptedApi,
    carvable,
    outcomes,
    round_of,
    taints,
    waiting,
)

OWNED_BY_REPLICA_SET = {
    "apiVersion": "apps/v1",
    "kind": "ReplicaSet",
    "name": "rs",
    "uid": "rs-uid",
    "controller": True,
}


def stamp(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat().replace("+00:00", "Z")


def holder(
    name: str, owner: Mapping[str, Any] | None = OWNED_BY_REPLICA_SET, *, started: float = NOW - 10
) -> dict[str, Any]:
    """A pod holding one 1g.5gb on node busy, created `started`, owned by `owner` (None: a bare pod)."""
    obj = pod(name, {G1: 1}, "busy", created=stamp(started))
    if owner is not None:
        obj["metadata"]["ownerReferences"] = [dict(owner)]
    return obj


class Evictions:
    """The Eviction API as the re-carver sees it (Executor.evict): the pods it evicts, or a PDB that refuses."""

    def __init__(self, api: ScriptedApi) -> None:
        self.api = api
        self.evicted: list[str] = []
        self.refuse = False

    def __call__(self, obj: Mapping[str, Any]) -> None:
        if self.refuse:
            raise EvictionBlocked("Cannot evict pod as it would violate the pod's disruption budget.")
        self.evicted.append(obj["metadata"]["name"])


def fleet(*holders: dict[str, Any]) -> ScriptedApi:
    """Node busy (opted in, balanced, its two 1g.5gb held by `holders`), node other (not opted in: its free 2g.10gb
    and 3g.20gb make the busy node's spare), and a pending pod asking for three 1g.5gb, which fit no GPU."""
    other = node("other", BALANCED)
    other["metadata"]["resourceVersion"] = "1"
    return ScriptedApi([carvable("busy"), other], [*holders, waiting("p1")])


def drainer(
    api: ScriptedApi, evict: Evictions, *, drain: bool = True, metrics: ReturnerMetrics | None = None
) -> Recarver:
    return Recarver(
        api,  # type: ignore[arg-type]
        EventRecorder(api),  # type: ignore[arg-type]
        metrics or ReturnerMetrics(),
        RecarvePolicy(sustained_seconds=60, cooldown_seconds=600, max_in_flight=2, drain=drain),
        CONFIG_MAP,
        quiet_seconds=0.0,
        clock=lambda: NOW,
        evict=evict,
    )


def step(api: ScriptedApi) -> str:
    text = api.nodes["busy"]["metadata"]["annotations"].get(RECORD_ANNOTATION)
    return str(json.loads(text)["step"]) if text else ""


def evictions(metrics: ReturnerMetrics) -> float:
    return metrics.registry.get_sample_value("migchain_recarve_drain_evictions_total") or 0.0


def gone(api: ScriptedApi, names: list[str]) -> None:
    """The evicted pods are gone (their ReplicaSet recreates them, pending: the node is tainted)."""
    api.pods = [obj for obj in api.pods if obj["metadata"]["name"] not in names]


def test_a_busy_node_is_cordoned_its_holders_evicted_once_waiting_wastes_more_and_then_it_is_recarved():
    api = fleet(holder("h1"), holder("h2"))
    evict, metrics = Evictions(api), ReturnerMetrics()
    subject = drainer(api, evict, metrics=metrics)
    round_of(subject, api)
    assert step(api) == "draining" and taints(api, "busy") == [RECARVING_TAINT]
    assert ("busy", "Draining") in api.events
    # 5 compute slices free (2g.10gb, 3g.20gb) since NOW; 2 held since NOW - 10: evict once 5 t >= 2 (t + 10).
    round_of(subject, api, NOW + 6)
    assert not evict.evicted and step(api) == "draining"
    round_of(subject, api, NOW + 7)
    assert sorted(evict.evicted) == ["h1", "h2"] and evictions(metrics) == 2
    assert ("busy", "DrainEvicted") in api.events and step(api) == "draining"
    gone(api, evict.evicted)
    round_of(subject, api, NOW + 8)
    record = api.record("busy")
    assert record["step"] == "labelled" and record["layout"][G1] >= 5
    assert taints(api, "busy") == [RECARVING_TAINT]  # never uncordoned between the drain and the re-carve
    api.carve("busy", record["layout"])
    round_of(subject, api, NOW + 9)
    assert api.record("busy")["step"] == "done" and not taints(api, "busy")
    assert outcomes(metrics) == {"applied": 1.0} and len(evict.evicted) == 2


def test_a_disruption_budget_that_refuses_is_waited_for_and_asked_again_never_forced():
    api = fleet(holder("h1"), holder("h2"))
    evict, metrics = Evictions(api), ReturnerMetrics()
    subject = drainer(api, evict, metrics=metrics)
    round_of(subject, api)
    evict.refuse = True
    round_of(subject, api, NOW + 30)
    round_of(subject, api, NOW + 32)
    assert not evict.evicted and evictions(metrics) == 0 and step(api) == "draining"
    assert api.events.count(("busy", "DrainWaits")) == 2  # told once per pod, not per round
    evict.refuse = False
    round_of(subject, api, NOW + 34)
    assert sorted(evict.evicted) == ["h1", "h2"] and evictions(metrics) == 2


def test_a_bare_holder_or_a_jobs_is_waited_for_and_nothing_on_the_node_is_evicted():
    job = {**OWNED_BY_REPLICA_SET, "apiVersion": "batch/v1", "kind": "Job"}
    for other in (holder("h2", owner=None), holder("h2", owner=job)):
        api = fleet(holder("h1"), other)
        evict = Evictions(api)
        subject = drainer(api, evict)
        round_of(subject, api)
        round_of(subject, api, NOW + 60)
        assert not evict.evicted and step(api) == "draining" and ("busy", "DrainWaits") in api.events
        gone(api, ["h2"])  # it ends by itself: the owned one is evicted then
        round_of(subject, api, NOW + 61)
        assert evict.evicted == ["h1"]


def test_a_drain_is_given_up_the_taint_removed_when_the_demand_goes():
    api = fleet(holder("h1"), holder("h2"))
    evict, metrics = Evictions(api), ReturnerMetrics()
    subject = drainer(api, evict, metrics=metrics)
    round_of(subject, api)
    gone(api, ["p1"])  # the pending pod went elsewhere, or was deleted
    round_of(subject, api, NOW + 30)
    assert step(api) == "abandoned" and not taints(api, "busy") and not evict.evicted
    assert ("busy", "DrainAbandoned") in api.events and outcomes(metrics) == {"drain-abandoned": 1.0}
    assert api.record("busy")["history"] == []  # no re-carve happened: nothing against the limits


def test_a_new_leader_carries_on_the_drain_from_the_record_on_the_node():
    api = fleet(holder("h1"), holder("h2"))
    round_of(drainer(api, Evictions(api)), api)
    assert step(api) == "draining"
    evict = Evictions(api)
    second = drainer(api, evict)  # the first was killed: the second knows only the Node
    round_of(second, api, NOW + 3)
    assert not evict.evicted  # the waste counts from the cordon (NOW) in the record, not from this term
    round_of(second, api, NOW + 7)
    assert sorted(evict.evicted) == ["h1", "h2"]
    assert api.record("busy")["drained"] == NOW


def test_a_holder_that_ends_is_a_new_reading_of_the_unused_slices_on_the_record():
    api = fleet(holder("h1"), holder("h2", started=NOW - 1000))
    evict = Evictions(api)
    subject = drainer(api, evict)
    round_of(subject, api)
    assert api.record("busy")["unused"] == 5
    api.pods[0]["status"]["phase"] = "Succeeded"  # h1 ends at NOW + 10: 6 compute slices free from then
    round_of(subject, api, NOW + 10)
    record = api.record("busy")
    assert (record["unused"], record["waste"], record["waste_at"]) == (6, 50.0, NOW + 10)
    round_of(subject, api, NOW + 150)  # waste 50 + 6 x 140 = 890 < 1 x 1150: still waiting
    assert not evict.evicted
    round_of(subject, api, NOW + 200)  # 50 + 6 x 190 = 1190 >= 1200? no; at NOW + 202: 1202 >= 1202
    assert not evict.evicted
    round_of(subject, api, NOW + 202)
    assert evict.evicted == ["h2"]


def test_without_drain_a_busy_node_is_never_cordoned_nor_any_pod_evicted():
    api = fleet(holder("h1"), holder("h2"))
    evict = Evictions(api)
    subject = drainer(api, evict, drain=False)
    for later in (0, 30, 600):
        round_of(subject, api, NOW + later)
    assert not step(api) and not taints(api, "busy") and not evict.evicted


def test_a_drain_left_by_a_leader_with_drain_on_is_given_up_by_one_without():
    api = fleet(holder("h1"), holder("h2"))
    round_of(drainer(api, Evictions(api)), api)
    evict = Evictions(api)
    round_of(drainer(api, evict, drain=False), api, NOW + 30)
    assert step(api) == "abandoned" and not taints(api, "busy") and not evict.evicted


def test_a_draining_record_reads_back_as_written_and_a_broken_number_is_a_reason():
    record = RecarveRecord(
        step="draining", config="migchain-7x1g.5gb", layout={G1: 7}, drained=NOW, waste=12.5, waste_at=NOW + 3, unused=5
    )
    assert read_record(record.text()) == record
    for broken in ({"waste": "NaN"}, {"waste_at": 1e400}, {"unused": -1}, {"unused": True}, {"drained": "x"}):
        data = {**json.loads(record.text()), **broken}
        assert isinstance(read_record(json.dumps(data).replace('"NaN"', "NaN")), str)


def test_free_compute_counts_the_free_mig_slices_only():
    state = NodeState("a", A100, "success", {G1: 2, G2: 1, G3: 1, "cpu": 64}, {G1: 2, G3: 1})
    assert free_compute(state) == 2


def test_the_work_an_eviction_loses_is_slices_times_time_run():
    assert drain_cost([(((G1, 1),), NOW - 10), (((G3, 1), (G1, 2)), NOW - 100)], NOW) == 10 + 500
    assert drain_cost([(((G1, 1),), NOW + 5)], NOW) == 0  # a clock behind the pod's: no negative work


@given(
    st.lists(st.tuples(st.floats(0, 100), st.integers(0, 7)), min_size=1, max_size=20),
    st.lists(st.floats(0, 100), max_size=20),
    st.booleans(),
)
def test_the_waste_a_drain_reads_is_never_more_than_what_was_left_unused(changes, rounds, grow):
    """The free slices change at some moments (a holder ends); the re-carver reads them at its rounds, and
    writes a new reading when they differ. The waste it computes never exceeds the true integral when the free
    slices only grow (nothing lands on a cordoned node), or when a round falls on every change; it is exact when
    both hold."""
    moments: list[float] = []
    unused: list[int] = []
    at = 0.0
    counts = sorted(count for _, count in changes) if grow else [count for _, count in changes]
    for (gap, _), count in zip(changes, counts, strict=True):
        at += gap
        moments.append(at)
        unused.append(count)

    def truly(now: float) -> float:  # the integral of the free slices from the first moment to `now`
        total = 0.0
        for index, start in enumerate(moments):
            end = moments[index + 1] if index + 1 < len(moments) else now
            total += unused[index] * max(0.0, min(end, now) - start)
        return total

    def free_at(now: float) -> int:
        return unused[max(i for i, start in enumerate(moments) if start <= now)]

    end = moments[-1] + 10
    growing = unused == sorted(unused)
    for reads in (sorted({moments[0], *(moments[0] + r for r in rounds if moments[0] + r <= end)}), moments):
        waste, waste_at, seen = 0.0, moments[0], unused[0]
        for now in [*reads, end]:
            current = free_at(now)
            waste_now = drain_waste(waste, waste_at, seen, current, now)
            if growing or reads is moments:
                assert waste_now <= truly(now) + 1e-6
            if current != seen:
                waste, waste_at, seen = waste_now, now, current
        if reads is moments and growing:
            assert abs(drain_waste(waste, waste_at, seen, free_at(end), end) - truly(end)) < 1e-6


def test_explain_says_a_pending_pod_waits_for_a_node_draining_for_it():
    api = fleet(holder("h1"), holder("h2"))
    round_of(drainer(api, Evictions(api)), api)
    text = render(read_cluster(api), RULES, "ml", "p1", nodes=None, output="text")  # type: ignore[arg-type]
    assert f"it waits for a re-carve: node busy is being re-carved as {api.record('busy')['config']} (draining" in text
