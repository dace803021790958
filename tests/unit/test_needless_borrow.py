"""Never borrow needlessly, at bind time too: the pure rule, the binder, and the path through filter and bind."""

from __future__ import annotations

import json
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st

from extender.core.cluster import BindRequest, NodeState, PodRequest, Snapshot, pod_request
from extender.core.decide import (
    Placement,
    Rejection,
    cheapest_cost,
    filter_nodes,
    place,
    refuse_needless_borrow,
)
from extender.filter_memory import FilterMemory
from extender.kube.api import ApiError, KubeApi
from extender.kube.binder import Binder
from extender.kube.cache import ClusterCache
from extender.kube.events import EventRecorder
from extender.kube.executor import Executor
from extender.loan_guard import LoanGuard
from extender.metrics import Metrics
from extender.reload import RulesInForce
from extender.store import SnapshotStore
from extender.web.app import WebSettings, create_app
from tests.strategies import chain_rules, pods, snapshots
from tests.unit.objects import G1, G2, LOAN_KEY, RULES, node, pod

# -- the pure rule --------------------------------------------------------------


@given(rules=chain_rules(), snapshot=snapshots(), pod=pods(), data=st.data())
def test_the_cheapest_cost_is_the_lowest_cost_of_a_placement_on_the_named_nodes(rules, snapshot, pod, data):
    names = data.draw(st.lists(st.sampled_from([*snapshot.nodes, "unknown"]), max_size=8))
    costs = [
        verdict.cost
        for name in names
        if isinstance(verdict := place(pod, snapshot.nodes.get(name), name, rules), Placement)
    ]
    assert cheapest_cost(pod, names, snapshot, rules) == min(costs, default=None)
    # The same judgement as the filter's: it fits nowhere exactly when the filter passes nothing.
    assert (cheapest_cost(pod, names, snapshot, rules) is None) == (
        not filter_nodes(pod, names, snapshot, rules).passed
    )


@given(rules=chain_rules(), snapshot=snapshots(min_nodes=2), pod=pods(), data=st.data())
def test_a_borrow_is_refused_exactly_when_another_candidate_fits_more_cheaply(rules, snapshot, pod, data):
    chosen = data.draw(st.sampled_from(sorted(snapshot.nodes)))
    placement = place(pod, snapshot.nodes[chosen], chosen, rules)
    if not isinstance(placement, Placement):
        return
    candidates = data.draw(st.lists(st.sampled_from(sorted(snapshot.nodes)), max_size=6))
    verdict = refuse_needless_borrow(pod, placement, candidates, snapshot, rules)
    best = cheapest_cost(pod, candidates, snapshot, rules)
    if placement.borrows and best is not None and best < placement.cost:
        assert isinstance(verdict, Rejection)
        assert verdict.node == chosen
        assert "feasible node(s) offer" in verdict.reason
    else:
        assert verdict is placement  # an exact fit is never refused, nor a borrow with nothing cheaper


def a100(name: str, free: dict[str, int]) -> NodeState:
    return NodeState(name, "NVIDIA-A100-SXM4-40GB", "success", free, {})


REQUEST = PodRequest("ml", "q", "uid-q", ((G1, 1),))


def test_a_borrow_is_refused_while_an_exact_slice_is_free_on_another_feasible_node():
    snapshot = Snapshot.of([a100("gpu-a", {G2: 1}), a100("gpu-b", {G1: 1}), a100("gpu-c", {G1: 1})])
    borrow = place(REQUEST, snapshot.nodes["gpu-a"], "gpu-a", RULES)
    assert isinstance(borrow, Placement) and borrow.borrows
    refused = refuse_needless_borrow(REQUEST, borrow, ["gpu-a", "gpu-b", "gpu-c"], snapshot, RULES)
    assert isinstance(refused, Rejection)
    assert refused.reason == (
        "on this node it now borrows: 1x 2g.10gb for 1g.5gb (2 steps up chain a100-40gb), "
        "while 2 other feasible node(s) offer an exact fit"
    )
    # A node kube-scheduler did not find feasible (a selector, a taint) is no alternative.
    assert refuse_needless_borrow(REQUEST, borrow, ["gpu-a"], snapshot, RULES) is borrow


# -- the binder ------------------------------------------------------------------


class FakeApi:
    """Reads from `objects`; writes recorded."""

    def __init__(self, objects: dict[str, dict[str, Any]]) -> None:
        self.objects = objects
        self.created: list[tuple[str, dict[str, Any]]] = []

    def get(self, resource: str, **_: Any) -> dict[str, Any]:
        if resource not in self.objects:
            raise ApiError(404, "NotFound", resource)
        return self.objects[resource]

    def create(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        self.created.append((resource, body))
        return body


class FakeExecutor:
    loan_key = LOAN_KEY

    def borrow(self, plan: Any) -> dict[str, Any]:
        return dict(plan.replacement)


def cluster() -> tuple[ClusterCache, FakeApi, list[dict[str, Any]]]:
    """gpu-a: one 1g.5gb and one 2g.10gb; gpu-b: one 1g.5gb. Pods p and q, both pending for a 1g.5gb."""
    pending = [pod("p", {G1: 1}, phase="Pending"), pod("q", {G1: 1}, phase="Pending")]
    api = FakeApi({f"/api/v1/namespaces/ml/pods/{p['metadata']['name']}": p for p in pending})
    cache = ClusterCache(cast(KubeApi, api), SnapshotStore(), loans=LoanGuard(LOAN_KEY))
    # What the watch's first lists do (the cache is not started: no thread, no API).
    cache._list_nodes([node("gpu-a", {G1: 1, G2: 1}), node("gpu-b", {G1: 1})])
    cache._list_pods(pending)
    return cache, api, pending


def binder(cache: ClusterCache, api: FakeApi, memory: FilterMemory | None, metrics: Metrics) -> Binder:
    return Binder(
        cast(KubeApi, api),
        cache,
        RulesInForce.fixed(RULES),
        cast(Executor, FakeExecutor()),
        EventRecorder(cast(KubeApi, api)),
        metrics=metrics,
        memory=memory,
    )


def test_a_bind_that_would_borrow_while_another_candidate_fits_exactly_is_refused_and_the_retry_fits():
    cache, api, pending = cluster()
    memory = FilterMemory(cache.store)
    for waiting in pending:  # both were filtered before either bind came: both were sent to gpu-a
        memory.filtered(pod_request(waiting), ["gpu-a", "gpu-b"], False, cache.store.snapshot())
    binds = binder(cache, api, memory, Metrics())

    assert binds.bind(BindRequest("ml", "p", "uid-p", "gpu-a")).error == ""
    refused = binds.bind(BindRequest("ml", "q", "uid-q", "gpu-a"))
    assert refused.error == (
        "not binding ml/q to gpu-a: on this node it now borrows: 1x 2g.10gb for 1g.5gb (2 steps up chain "
        "a100-40gb), while 1 other feasible node(s) offer an exact fit; migchain never borrows needlessly: "
        "kube-scheduler retries the pod"
    )
    assert refused.placement is not None and refused.placement.borrows  # counted as a refused borrow
    assert cache.ledger.reservation("uid-q") is None  # nothing reserved, nothing written for q
    assert [resource for resource, _ in api.created] == ["/api/v1/namespaces/ml/pods/p/binding"]
    # kube-scheduler's retry finds gpu-b.
    retried = binds.bind(BindRequest("ml", "q", "uid-q", "gpu-b"))
    assert retried.error == "" and retried.placement is not None and not retried.placement.borrows


def test_without_a_remembered_filter_call_or_an_exact_fit_among_its_nodes_the_bind_borrows_as_before():
    for memory_has in ("nothing", "gpu-a only"):
        cache, api, pending = cluster()
        memory = FilterMemory(cache.store)
        if memory_has == "gpu-a only":  # gpu-b failed kube-scheduler's own filters
            memory.filtered(pod_request(pending[1]), ["gpu-a"], False, cache.store.snapshot())
        binds = binder(cache, api, memory, Metrics())
        assert binds.bind(BindRequest("ml", "p", "uid-p", "gpu-a")).error == ""
        borrowed = binds.bind(BindRequest("ml", "q", "uid-q", "gpu-a"))
        assert borrowed.error == "", memory_has
        assert borrowed.placement is not None and borrowed.placement.borrows


def test_a_placed_pod_is_forgotten():
    cache, api, pending = cluster()
    memory = FilterMemory(cache.store)
    memory.filtered(pod_request(pending[0]), ["gpu-a", "gpu-b"], False, cache.store.snapshot())
    assert binder(cache, api, memory, Metrics()).bind(BindRequest("ml", "p", "uid-p", "gpu-a")).error == ""
    assert memory.candidates("uid-p") == ()


# -- through the HTTP API: filter remembers, bind refuses -----------------------------


def test_filter_remembers_the_nodes_it_was_asked_about_and_bind_refuses_the_needless_borrow():
    cache, api, pending = cluster()
    memory = FilterMemory(cache.store)
    metrics = Metrics()
    client = create_app(
        WebSettings(),
        RulesInForce.fixed(RULES),
        cache.store,
        binder(cache, api, memory, metrics),
        metrics,
        filter_log=memory,
    ).test_client()
    for waiting in pending:
        answer = client.post("/filter", json={"Pod": waiting, "NodeNames": ["gpu-a", "gpu-b"], "Nodes": None})
        assert sorted(answer.get_json()["NodeNames"]) == ["gpu-a", "gpu-b"]
    bind = {"PodName": "p", "PodNamespace": "ml", "PodUID": "uid-p", "Node": "gpu-a"}
    assert client.post("/bind", json=bind).get_json() == {"Error": ""}
    refused = client.post("/bind", json=bind | {"PodName": "q", "PodUID": "uid-q"}).get_json()
    assert "migchain never borrows needlessly" in refused["Error"]
    assert metrics.registry.get_sample_value("migchain_binds_total", {"outcome": "refused", "kind": "borrow"}) == 1
    assert metrics.registry.get_sample_value("migchain_binds_total", {"outcome": "bound", "kind": "exact"}) == 1


def test_in_nodes_mode_filter_remembers_the_node_names_too():
    cache, _, pending = cluster()
    memory = FilterMemory(cache.store)
    client = create_app(WebSettings(), RulesInForce.fixed(RULES), cache.store, filter_log=memory).test_client()
    nodes = {"items": [node("gpu-a", {G1: 1, G2: 1}), node("gpu-b", {G1: 1})]}
    answer = client.post("/filter", data=json.dumps({"Pod": pending[1], "Nodes": nodes}), mimetype="application/json")
    assert answer.status_code == 200
    assert memory.candidates("uid-q") == ("gpu-a", "gpu-b")
