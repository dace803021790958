"""Every metric against a fresh registry: where it is counted, what a scrape shows, and both /metrics endpoints."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from extender.core.cluster import BindRequest, PodRecord, Snapshot, node_state, pod_record
from extender.core.decide import Grant, Placement
from extender.core.returns import Restore, borrowers_of
from extender.kube.api import ApiError, KubeApi
from extender.kube.binder import Binder
from extender.kube.cache import ClusterCache
from extender.kube.events import EventRecorder
from extender.kube.executor import EvictionBlocked, Executor
from extender.kube.lease import LeaderElection
from extender.kube.returner import Returner
from extender.ledger import Ledger
from extender.loan_guard import LoanGuard
from extender.metrics import Errors, Metrics, ReturnerMetrics
from extender.probes import health_routes, listen, serve_health
from extender.reload import RulesInForce
from extender.store import SnapshotStore
from extender.web.app import WebSettings, create_app
from tests.unit.objects import G1, G2, G3, LOAN_KEY, RULES, borrower, node, pod


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- borrows ------------------------------------------------------------------


def test_a_borrow_counts_its_borrowed_slices_by_requested_and_granted_type():
    metrics = Metrics()
    metrics.count_borrow(
        Placement("gpu-a", (Grant(G1, G2, 2, steps=2, chain="a100-40gb"), Grant(G3, G3, 1)), leftover=0)
    )
    assert sample(metrics.registry, "migchain_borrows_total", requested="1g.5gb", granted="2g.10gb") == 2
    assert sample(metrics.registry, "migchain_borrows_total", requested="3g.20gb", granted="3g.20gb") is None


class FakeApi:
    """The few API calls a test drives: reads from `objects`, writes recorded (or refused with `fail`)."""

    def __init__(self, objects: dict[str, dict[str, Any]] | None = None, fail: Exception | None = None) -> None:
        self.objects = objects or {}
        self.fail = fail
        self.created: list[tuple[str, dict[str, Any]]] = []

    def get(self, resource: str, **_: Any) -> dict[str, Any]:
        if self.fail is not None:
            raise self.fail
        if resource not in self.objects:
            raise ApiError(404, "NotFound", resource)
        return self.objects[resource]

    def create(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.fail is not None:
            raise self.fail
        self.created.append((resource, body))
        return body


class FakeExecutor:
    loan_key = LOAN_KEY

    def __init__(self, api: FakeApi, restore_error: Exception | None = None) -> None:
        self.api = api
        self.restore_error = restore_error

    def borrow(self, plan: Any) -> dict[str, Any]:
        return dict(plan.replacement)

    def restore(self, borrower: Any, restored: Any, owned: bool) -> str:
        if self.restore_error is not None:
            raise self.restore_error
        return "evicted and recreated"


def binder_on(api: FakeApi, pods: list[dict[str, Any]], metrics: Metrics) -> Binder:
    cache = ClusterCache(cast(KubeApi, api), SnapshotStore(), errors=metrics.errors, loans=LoanGuard(LOAN_KEY))
    cache.ledger.replace_nodes([node_state(node("gpu-a", {G1: 1, G2: 1})), node_state(node("gpu-b", {G2: 1}))])
    cache.ledger.replace_pods(pod_record(p) for p in pods)
    events = EventRecorder(cast(KubeApi, api), "test", metrics.errors)
    return Binder(
        cast(KubeApi, api), cache, RulesInForce.fixed(RULES), cast(Executor, FakeExecutor(api)), events, metrics=metrics
    )


def test_the_binder_counts_borrows_and_refused_and_failed_binds():
    metrics = Metrics()
    waiting = pod("p", {G1: 1}, phase="Pending")
    api = FakeApi({"/api/v1/namespaces/ml/pods/p": waiting})
    binder = binder_on(api, [pod("f", {G1: 1}, "gpu-a"), waiting, pod("q", {G1: 1}, phase="Pending")], metrics)

    assert binder.bind(BindRequest("ml", "p", "uid-p", "gpu-a")).error == ""
    assert sample(metrics.registry, "migchain_borrows_total", requested="1g.5gb", granted="2g.10gb") == 1
    assert [body["reason"] for _, body in api.created] == ["Borrowed", "Borrowed"]  # on the original and the borrower

    # The 2g.10gb is now reserved: q no longer fits gpu-a.
    assert "no longer fits" in binder.bind(BindRequest("ml", "q", "uid-q", "gpu-a")).error
    assert sample(metrics.registry, "migchain_errors_total", component="binder", kind="refused") == 1

    api.fail = ApiError(500, "InternalError", "etcd timeout")
    assert binder.bind(BindRequest("ml", "q", "uid-q", "gpu-b")).error
    assert sample(metrics.registry, "migchain_errors_total", component="binder", kind="api") == 1
    assert sample(metrics.registry, "migchain_borrows_total", requested="1g.5gb", granted="2g.10gb") == 1


# -- returns ------------------------------------------------------------------


def restore_of(loaned: dict[str, Any]) -> Restore:
    [held] = borrowers_of([pod_record(loaned)], RULES)
    return Restore(held, target="gpu-b", unblocks="ml/big", reason="ml/big needs the 2g.10gb")


@pytest.mark.parametrize(
    ("found", "restore_error", "outcome"),
    [
        (True, None, "returned"),
        (True, EvictionBlocked("would violate the PodDisruptionBudget"), "blocked"),
        (True, ApiError(500, "InternalError", "etcd timeout"), "failed"),
        (False, None, "gone"),
    ],
)
def test_a_return_counts_its_slices_by_type_and_outcome(found, restore_error, outcome):
    metrics = ReturnerMetrics()
    loaned = borrower("b1", {G1: 1}, "gpu-a", free={G2: 1})
    api = FakeApi({"/api/v1/namespaces/ml/pods/b1": loaned} if found else {})
    returner = Returner(
        cast(ClusterCache, None),
        RulesInForce.fixed(RULES),
        cast(Executor, FakeExecutor(api, restore_error)),
        EventRecorder(cast(KubeApi, api)),
        cast(LeaderElection, None),
        metrics=metrics,
    )
    returner.execute(restore_of(loaned))
    counted = {
        (s.labels["requested"], s.labels["granted"], s.labels["outcome"]): s.value
        for family in metrics.registry.collect()
        if family.name == "migchain_returns"
        for s in family.samples
        if s.name == "migchain_returns_total"
    }
    assert counted == {("1g.5gb", "2g.10gb", outcome): 1}
    failed = sample(metrics.registry, "migchain_errors_total", component="returner", kind="api")
    assert failed == (1 if outcome == "failed" else None)


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_borrower_that_has_ended_meanwhile_is_not_returned(phase):
    # The cache lags: the plan saw it running, the API server has it ended (its slices are free anyway).
    metrics = ReturnerMetrics()
    loaned = borrower("b1", {G1: 1}, "gpu-a", free={G2: 1})
    planned = restore_of(loaned)
    loaned["status"]["phase"] = phase
    api = FakeApi({"/api/v1/namespaces/ml/pods/b1": loaned})
    executor = FakeExecutor(api, AssertionError("an ended pod is never evicted: a Job would lose its success"))
    returner = Returner(
        cast(ClusterCache, None),
        RulesInForce.fixed(RULES),
        cast(Executor, executor),
        EventRecorder(cast(KubeApi, api)),
        cast(LeaderElection, None),
        metrics=metrics,
    )
    returner.execute(planned)
    assert sample(metrics.registry, "migchain_returns_total", requested="1g.5gb", granted="2g.10gb", outcome="gone")


def test_a_bare_borrower_whose_loan_record_is_forged_is_not_returned_and_the_round_goes_on():
    metrics = ReturnerMetrics()
    loaned = borrower("b1", {G1: 1}, "gpu-a", free={G2: 1})
    planned = restore_of(loaned)  # the cache read a good record; the pod's owner edits it before the return
    loaned["metadata"]["annotations"]["migchain.io/original-resources"] = '{"containers/main": "<script>"}'
    api = FakeApi({"/api/v1/namespaces/ml/pods/b1": loaned})
    executor = FakeExecutor(api, AssertionError("a pod whose record is unreadable is never evicted"))
    returner = Returner(
        cast(ClusterCache, None),
        RulesInForce.fixed(RULES),
        cast(Executor, executor),
        EventRecorder(cast(KubeApi, api)),
        cast(LeaderElection, None),
        metrics=metrics,
    )
    returner.execute(planned)
    assert sample(metrics.registry, "migchain_returns_total", requested="1g.5gb", granted="2g.10gb", outcome="failed")
    [(_, event)] = api.created
    assert event["reason"] == "ReturnFailed" and "<script>" not in event["message"]


def test_the_returner_serves_its_metrics_on_the_health_port():
    metrics = ReturnerMetrics()
    metrics.watch_leadership(lambda: True)
    metrics.count_return(restore_of(borrower("b1", {G1: 1}, "gpu-a", free={G2: 1})).borrower.loan, "returned")
    with listen("127.0.0.1:0") as listener:
        port = serve_health(listener, SnapshotStore(), RulesInForce.fixed(RULES), metrics.registry).port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=")
            samples = scrape(response.read().decode())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert response.status == 200
    returned = frozenset({("requested", "1g.5gb"), ("granted", "2g.10gb"), ("outcome", "returned")})
    assert samples[("migchain_returns_total", returned)] == 1
    assert samples[("migchain_returner_leader", frozenset())] == 1


# -- the cluster, read at scrape time -----------------------------------------


def ledger_of(nodes: list[dict[str, Any]], pods: list[dict[str, Any]]) -> Ledger:
    ledger = Ledger()
    ledger.replace_nodes(node_state(n) for n in nodes)
    ledger.replace_pods(pod_record(p) for p in pods)
    return ledger


def test_loans_and_free_slices_are_read_from_the_cache_at_every_scrape():
    nodes = [node("gpu-a", {G1: 2, G2: 2}), node("gpu-b", {G1: 1}, state="pending")]
    loaned = borrower("b1", {G1: 1}, "gpu-a", free={G2: 2})
    ledger = ledger_of(nodes, [pod("f1", {G1: 1}, "gpu-a"), pod("f2", {G1: 1}, "gpu-a"), loaned])
    metrics = Metrics()
    metrics.watch_cluster(lambda: (ledger.snapshot(), list(ledger.pods())))

    def value(name: str, **labels: str) -> float | None:
        return sample(metrics.registry, name, **labels)

    assert value("migchain_loans", requested="1g.5gb", granted="2g.10gb") == 1
    assert value("migchain_free_slices", type="1g.5gb") == 0  # gpu-b's is being repartitioned
    assert value("migchain_allocatable_slices", type="1g.5gb") == 3
    assert value("migchain_free_slices", type="2g.10gb") == 1
    # Nothing is pushed to the metrics: the next scrape simply reads the changed cache.
    ledger.remove_pod(loaned["metadata"]["uid"])
    assert value("migchain_loans", requested="1g.5gb", granted="2g.10gb") is None
    assert value("migchain_free_slices", type="2g.10gb") == 2


def test_before_the_first_lists_the_cluster_gauges_have_no_samples():
    metrics = Metrics()
    metrics.watch_cluster(lambda: None)
    families = {family.name: family for family in metrics.registry.collect()}
    assert families["migchain_free_slices"].samples == []
    assert families["migchain_loans"].samples == []


def test_the_extenders_metrics_endpoint_shows_verbs_cluster_gauges_and_unexpected_errors():
    ledger = ledger_of([node("gpu-a", {G1: 1, G2: 1})], [borrower("b1", {G1: 1}, "gpu-a", free={G2: 1})])
    metrics = Metrics()
    metrics.watch_cluster(lambda: (ledger.snapshot(), list(ledger.pods())))

    class Broken:
        def bind(self, args: BindRequest) -> Any:
            raise RuntimeError("a bug")

    client = create_app(
        WebSettings(), RulesInForce.fixed(RULES), SnapshotStore(ledger.snapshot()), Broken(), metrics
    ).test_client()
    body = {"PodName": "p", "PodNamespace": "ml", "PodUID": "u", "Node": "gpu-a"}
    assert client.post("/bind", json=body).status_code == 500
    answer = health_routes(SnapshotStore(), RulesInForce.fixed(RULES), metrics.registry)["/metrics"]()
    assert answer.status == 200
    samples = scrape(answer.body.decode())
    assert samples[("migchain_loans", frozenset({("requested", "1g.5gb"), ("granted", "2g.10gb")}))] == 1
    assert samples[("migchain_free_slices", frozenset({("type", "1g.5gb")}))] == 1
    assert samples[("migchain_extender_requests_total", frozenset({("verb", "bind"), ("code", "500")}))] == 1
    assert samples[("migchain_errors_total", frozenset({("component", "http"), ("kind", "unexpected")}))] == 1


# -- errors of the watch, the events and the lease ----------------------------


class ScriptedWatchApi:
    """Lists nothing much; each watch of pods plays the next step of `script`, nodes' watches just wait."""

    def __init__(self, script: list[Exception | list[dict[str, Any]]]) -> None:
        self.script = script
        self.done = threading.Event()

    def list_all(self, resource: str, **_: Any) -> tuple[list[dict[str, Any]], str]:
        if resource.endswith("/pods"):
            unreadable = pod("broken", {G1: 1}, "gpu-a")
            unreadable["spec"]["containers"][0]["resources"]["limits"][G1] = "half"
            return [unreadable], "1"
        return [], "1"

    def watch(self, resource: str, version: str, **_: Any) -> Iterator[dict[str, Any]]:
        if resource.endswith("/nodes") or not self.script:
            if not self.script:
                self.done.set()
            self.done.wait(10)
            return iter([])
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return iter(step)


def test_watch_restarts_and_unreadable_objects_are_counted():
    errors = Errors(CollectorRegistry())
    api = ScriptedWatchApi(
        [
            ApiError(410, "Expired", "too old resource version"),
            [{"type": "ERROR", "object": {"code": 410, "message": "too old"}}],
            ApiError(500, "InternalError", "etcd"),
            [],  # the server ends a watch: normal, and the backoff starts over
            ConnectionResetError("reset by peer"),
        ]
    )
    cache = ClusterCache(cast(KubeApi, api), SnapshotStore(ready=False), errors=errors, loans=LoanGuard(LOAN_KEY))
    cache.start()
    try:
        assert api.done.wait(20)
    finally:
        cache.stop()
    counts = {
        (s.labels["component"], s.labels["kind"]): s.value
        for family in errors.counter.collect()
        for s in family.samples
        if s.name == "migchain_errors_total"
    }
    assert counts == {
        ("watch", "expired"): 2,
        ("watch", "api"): 1,
        ("watch", "connection"): 1,
        ("watch", "unreadable"): 3,  # one per list of pods: the first and the two relists
    }


def test_an_event_that_cannot_be_written_is_counted_not_raised():
    registry = CollectorRegistry()
    api = FakeApi(fail=ApiError(403, "Forbidden", "events is forbidden"))
    EventRecorder(cast(KubeApi, api), "test", Errors(registry)).record(pod("p", {G1: 1}), "Borrowed", "borrowed")
    assert sample(registry, "migchain_errors_total", component="events", kind="api") == 1


def test_a_failed_lease_renewal_is_counted():
    registry = CollectorRegistry()
    stop = threading.Event()

    class Unreachable:
        def get(self, resource: str) -> dict[str, Any]:
            stop.set()
            raise ConnectionRefusedError("apiserver down")

    election = LeaderElection(cast(KubeApi, Unreachable()), "ns", "lease", "me", renew=0.01, errors=Errors(registry))
    election.run(stop)
    assert not election.leading()
    assert sample(registry, "migchain_errors_total", component="lease", kind="api") == 1


def test_the_cluster_gauges_and_counters_are_all_named_by_convention():
    metrics = Metrics()
    metrics.watch_cluster(lambda: (Snapshot(), list[PodRecord]()))
    names = {family.name: family.type for family in metrics.registry.collect()}
    assert names == {
        "migchain_extender_requests": "counter",
        "migchain_extender_request_duration_seconds": "histogram",
        "migchain_binds": "counter",
        "migchain_borrows": "counter",
        "migchain_dry_run_borrows": "counter",
        "migchain_requeues": "counter",
        "migchain_extender_leader": "gauge",
        "migchain_errors": "counter",
        "migchain_unreadable_loans": "counter",
        "migchain_journal_overdue_entries": "gauge",
        "migchain_journal_oldest_entry_seconds": "gauge",
        "migchain_loans": "gauge",
        "migchain_free_slices": "gauge",
        "migchain_allocatable_slices": "gauge",
    }
