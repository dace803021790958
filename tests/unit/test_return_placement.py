"""The return planner counts a pending pod only where it may run, and only if migchain's scheduler will run it.

Pods and nodes are written as the API server lists them and read by the same
functions the cache uses, so these tests say what a cluster with these
objects gets from the returner.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extender.core.cluster import node_state, pod_record
from extender.core.explain import candidate_nodes, explain
from extender.core.returns import Restore, borrowers_of, pending_requests, plan_returns
from extender.core.rules import ChainRules, ReturnMode
from extender.ledger import Ledger
from extender.sim.engine import Job, SimPolicy, simulate
from tests.unit.objects import G1, G2, G3, RULES
from tests.unit.objects import borrower as borrower_of
from tests.unit.objects import node as gpu_node
from tests.unit.objects import pod as mig_pod

EAGER_RULES = ChainRules(
    dataclasses.replace(chain, policy=dataclasses.replace(chain.policy, return_mode=ReturnMode.EAGER))
    for chain in RULES.chains
)
HOSTNAME = "kubernetes.io/hostname"


def node(name: str, slices: dict[str, int], *, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    """A GPU node labelled as GPU feature discovery and kubelet label it; `spec` adds taints or unschedulable."""
    obj = gpu_node(name, slices)
    obj["metadata"]["labels"] |= {HOSTNAME: name, **(labels or {})}
    return {"kind": "Node", **obj, "spec": dict(spec)}


def pod(name: str, requests: dict[str, int], node_name: str = "", **spec: Any) -> dict[str, Any]:
    obj = mig_pod(name, requests, node_name, phase="Running" if node_name else "Pending")
    obj["spec"] |= spec
    return {"kind": "Pod", **obj}


def borrower(name: str, requests: dict[str, int], node_name: str, free: dict[str, int]) -> dict[str, Any]:
    return {"kind": "Pod", **borrower_of(name, requests, node_name, free)}


def pinned(name: str, requests: dict[str, int], to: str) -> dict[str, Any]:
    return pod(name, requests, nodeSelector={HOSTNAME: to})


def affinity(*terms: dict[str, Any]) -> dict[str, Any]:
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}}}


def plan(*objects: dict[str, Any], rules: Any = RULES) -> tuple[Restore, ...]:
    """What the returner plans for a cluster of these Node and Pod objects, read as its cache reads them."""
    ledger = Ledger.of_objects(objects)
    records = list(ledger.pods())
    return plan_returns(ledger.snapshot(), borrowers_of(records, rules), pending_requests(records), rules)


def summary(plans: tuple[Restore, ...]) -> list[tuple[str, str, str]]:
    return [(p.borrower.key, p.target, p.unblocks) for p in plans]


# The cluster: home {1g.5gb, 3g.20gb}, elsewhere {1g.5gb}; a borrower on home holds the
# 3g.20gb for a 1g.5gb, and home's 1g.5gb has just freed (elsewhere's is taken).
HOME = node("home", {G1: 1, G3: 1})
ELSEWHERE = node("elsewhere", {G1: 1})
TAKEN = pod("filler", {G1: 1}, "elsewhere")
B = borrower("b", {G1: 1}, "home", {G3: 1})
CLUSTER = (HOME, ELSEWHERE, TAKEN, B)


def test_on_demand_a_pod_pinned_elsewhere_evicts_nobody():
    assert plan(*CLUSTER, pinned("needs-3g", {G3: 1}, "elsewhere")) == ()


def test_on_demand_the_same_pod_free_to_run_on_home_is_worth_the_return():
    assert summary(plan(*CLUSTER, pod("needs-3g", {G3: 1}))) == [("ml/b", "home", "ml/needs-3g")]
    assert summary(plan(*CLUSTER, pinned("needs-3g", {G3: 1}, "home"))) == [("ml/b", "home", "ml/needs-3g")]


def test_eager_a_pod_pinned_elsewhere_does_not_take_the_free_slice_it_may_not_run_on():
    home = node("home", {G1: 1, G2: 1})
    b = borrower("b", {G1: 1}, "home", {G2: 1})
    waiting = pinned("waits", {G1: 1}, "elsewhere")
    assert summary(plan(home, ELSEWHERE, TAKEN, b, waiting, rules=EAGER_RULES)) == [("ml/b", "home", "")]
    # Free to run on home, it takes home's 1g.5gb first: nobody is returned onto it.
    assert plan(home, ELSEWHERE, TAKEN, b, pod("waits", {G1: 1}), rules=EAGER_RULES) == ()


PHANTOMS: dict[str, dict[str, Any]] = {
    "gated": {"schedulingGates": [{"name": "example.com/not-yet"}]},
    "foreign scheduler": {"schedulerName": "nobody-runs-this-scheduler"},
    "impossible selector": {"nodeSelector": {"pool": "nowhere"}},
    "impossible affinity": {
        "affinity": affinity({"matchExpressions": [{"key": "pool", "operator": "In", "values": ["none"]}]})
    },
    "untolerated taint": {},  # home is tainted below; the borrower tolerates it, this pod does not
    "unreadable affinity": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": 7}}},
}


def test_a_pod_that_can_never_run_evicts_nobody():
    gpu_taint = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    home = node("home", {G1: 1, G3: 1}, taints=gpu_taint)
    b = borrower("b", {G1: 1}, "home", {G3: 1})
    b["spec"]["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    for kind, spec in PHANTOMS.items():
        assert plan(home, ELSEWHERE, TAKEN, b, pod("phantom", {G3: 1}, **spec)) == (), kind
    tolerant = pod("needs-3g", {G3: 1}, tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}])
    assert summary(plan(home, ELSEWHERE, TAKEN, b, tolerant)) == [("ml/b", "home", "ml/needs-3g")]


def test_a_pod_counts_only_on_gpu_models_whose_chain_serves_it():
    # home is an H100: the A100 chain never lends it, and it has no 2g.10gb of its own.
    home = node("home", {G1: 1, G3: 1})
    home["metadata"]["labels"]["nvidia.com/gpu.product"] = "NVIDIA-H100-80GB-HBM3"
    b = borrower("b", {G1: 1}, "home", {G3: 1})  # a loan made on the rules of its day
    assert plan(home, ELSEWHERE, TAKEN, b, pod("needs-2g", {G2: 1})) == ()
    assert summary(plan(home, ELSEWHERE, TAKEN, b, pod("needs-3g", {G3: 1}))) == [("ml/b", "home", "ml/needs-3g")]


def test_a_restored_borrower_goes_back_only_where_it_may_run():
    # The only free 1g.5gb is on a node the borrower's own selector excludes: no return to it; the pod
    # waiting for its own 3g.20gb takes it back, and the borrower waits, pending, where it may run.
    other = node("other", {G1: 1}, labels={"pool": "other"})
    home = node("home", {G3: 1}, labels={"pool": "mine"})
    b = borrower("b", {G1: 1}, "home", {G3: 1})
    b["spec"]["nodeSelector"] = {"pool": "mine"}
    assert summary(plan(home, other, b, pod("needs-3g", {G3: 1}))) == [("ml/b", "", "ml/needs-3g")]
    del b["spec"]["nodeSelector"]
    assert summary(plan(home, other, b, pod("needs-3g", {G3: 1}))) == [("ml/b", "other", "ml/needs-3g")]


def test_only_pods_for_the_given_schedulers_are_demand():
    records = [pod_record(pod("mine", {G1: 1}, schedulerName="migchain-scheduler"))]
    records.append(pod_record(pod("theirs", {G1: 1}, schedulerName="default-scheduler")))
    records.append(pod_record(pod("gated", {G1: 1}, schedulingGates=[{"name": "x"}])))
    assert [r.key for r in pending_requests(records)] == ["ml/mine"]
    assert [r.key for r in pending_requests(records, ("default-scheduler",))] == ["ml/theirs"]


# -- properties ---------------------------------------------------------------

POOLS = ("a", "b")
NAMES = ("n0", "n1", "n2")


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Nodes in pools, borrowers running on them, other pods holding slices, pending pods with selectors."""
    nodes, pods = [], []
    for name in NAMES:
        slices = {t: draw(st.integers(0, 2)) for t in (G1, G2, G3)}
        nodes.append(node(name, slices, labels={"pool": draw(st.sampled_from(POOLS))}))
        left = dict(slices)
        for index in range(draw(st.integers(0, 2))):
            larger = [t for t in (G2, G3) if left[t]]
            if not larger:
                break
            granted = draw(st.sampled_from(larger))
            left[granted] -= 1
            pods.append(borrower(f"b-{name}-{index}", {G1: 1}, name, {granted: 1}))
        for t, count in left.items():
            for index in range(draw(st.integers(0, count))):
                pods.append(pod(f"f-{name}-{t[-6:]}-{index}", {t: 1}, name))
    for index in range(draw(st.integers(0, 3))):
        requests = {draw(st.sampled_from((G1, G2, G3))): 1}
        selector = draw(st.sampled_from(({}, {"pool": "a"}, {"pool": "b"}, {HOSTNAME: "n0"})))
        pods.append(pod(f"p{index}", requests, nodeSelector=selector))
    return nodes, pods


def selected(pod_object: dict[str, Any], node_object: dict[str, Any]) -> bool:
    """The test's own reading of a nodeSelector: every pair among the node's labels."""
    labels = node_object["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in (pod_object["spec"].get("nodeSelector") or {}).items())


@given(cluster=clusters(), rules=st.sampled_from((RULES, EAGER_RULES)))
def test_a_pending_pod_is_never_the_reason_for_a_return_to_a_node_it_may_not_run_on(cluster, rules):
    nodes, pods = cluster
    by_name = {n["metadata"]["name"]: n for n in nodes}
    by_key = {f"ml/{p['metadata']['name']}": p for p in pods}
    for restore in plan(*nodes, *pods, rules=rules):
        if restore.unblocks:
            assert selected(by_key[restore.unblocks], by_name[restore.borrower.record.node])


PHANTOM_SPECS = st.sampled_from(
    [
        {"schedulingGates": [{"name": "example.com/gate"}]},
        {"schedulerName": "someone-else"},
        {"nodeSelector": {"pool": "c"}},
        {"nodeSelector": {HOSTNAME: "n9"}},
        {"affinity": affinity({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n9"]}]})},
        {"affinity": affinity({"matchExpressions": [{"key": "pool", "operator": "NotIn", "values": list(POOLS)}]})},
        {"affinity": affinity()},  # no term: matches no node
    ]
)


@given(cluster=clusters(), rules=st.sampled_from((RULES, EAGER_RULES)), phantoms=st.lists(PHANTOM_SPECS, max_size=3))
def test_pods_that_can_never_run_change_no_plan(cluster, rules, phantoms):
    nodes, pods = cluster
    extra = [pod(f"phantom-{i}", {t: 1}, **spec) for i, spec in enumerate(phantoms) for t in (G1, G3)]
    assert summary(plan(*nodes, *pods, *extra, rules=rules)) == summary(plan(*nodes, *pods, rules=rules))


SPREAD: dict[str, Any] = {
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}]
}


def test_a_pod_whose_place_depends_on_other_pods_costs_no_restart_but_takes_free_slices():
    # It might be kept off home by where its siblings run: no return is spent on a maybe.
    assert plan(*CLUSTER, pod("spread", {G3: 1}, **SPREAD)) == ()
    anti: dict[str, Any] = {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{}]}}}
    assert plan(*CLUSTER, pod("apart", {G3: 1}, **anti)) == ()
    # Where it fits now, it will take the slice: an eager return must not count on it.
    home = node("home", {G1: 1, G2: 1})
    b = borrower("b", {G1: 1}, "home", {G2: 1})
    assert plan(home, ELSEWHERE, TAKEN, b, pod("spread", {G1: 1}, **SPREAD), rules=EAGER_RULES) == ()


def explained_notes(*objects: dict[str, Any], name: str) -> tuple[str, ...]:
    ledger = Ledger.of_objects(objects)
    records = list(ledger.pods())
    [record] = [r for r in records if r.request.name == name]
    snapshot = ledger.snapshot()
    return explain(record, snapshot, RULES, candidate_nodes(record.request, snapshot), records).notes


@pytest.mark.parametrize(
    ("spec", "note"),
    [
        ({}, "the returner counts it as waiting on the nodes it may run on (node taints only"),
        ({"nodeSelector": {"pool": "a"}}, "counts it as waiting on the nodes it may run on (its nodeSelector against"),
        (PHANTOMS["gated"], "no return is made for it while it has scheduling gates (example.com/not-yet)"),
        (PHANTOMS["foreign scheduler"], "its schedulerName 'nobody-runs-this-scheduler' is not migchain's"),
        (PHANTOMS["unreadable affinity"], "no return is made for it: placement rules unreadable"),
        (SPREAD, "where it may run depends on other pods"),
    ],
)
def test_explain_says_whether_the_returner_counts_a_pending_pod(spec, note):
    notes = explained_notes(*CLUSTER, pod("p", {G3: 1}, **spec), name="p")
    assert any(note in line for line in notes), notes


def test_explain_candidates_and_return_facts_follow_the_same_rules():
    ledger = Ledger.of_objects((*CLUSTER, pinned("needs-3g", {G3: 1}, "elsewhere")))
    records = list(ledger.pods())
    snapshot = ledger.snapshot()
    [b] = [r for r in records if r.request.name == "b"]
    [waiting] = [r for r in records if r.request.name == "needs-3g"]
    assert candidate_nodes(waiting.request, snapshot) == ["elsewhere"]
    outlook = explain(b, snapshot, RULES, ["home"], records).outlook
    assert outlook is not None and outlook.restore is None
    assert "pending pods that fit nowhere now: ml/needs-3g" in outlook.facts
    assert "of them, allowed on home and fitting the 3g.20gb it would give back there: none" in outlook.facts
    assert outlook.why_not == "no pending pod waits for the 3g.20gb it holds"


def test_the_simulators_trace_pods_may_run_on_tainted_nodes():
    tainted = node_state(node("gpu", {G1: 2}, taints=[{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]))
    metrics = simulate(
        [tainted], RULES, [Job("j0", 0.0, ((G1, 1),), 60.0), Job("j1", 0.0, ((G1, 1),), 60.0)], SimPolicy.ON_DEMAND
    )
    assert (metrics.never_placed, metrics.finished) == (0, 2)
