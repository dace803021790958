"""Waits a pod controls never hold a thread, and a reservation outlasts its bind's writes, however slow."""

from __future__ import annotations

import copy
import time
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extender.core.cluster import BindRequest, NodeState, node_state, pod_record, pod_request
from extender.core.decide import Placement, place
from extender.core.loan import plan_borrow
from extender.kube.api import ApiError, KubeApi
from extender.kube.binder import Binder
from extender.kube.cache import RESERVATION_TTL, ClusterCache
from extender.kube.events import EventRecorder
from extender.kube.executor import RESTORE_JOURNALED, Executor, StillTerminating
from extender.kube.lease import LeaderElection
from extender.kube.returner import Returner
from extender.ledger import Ledger
from extender.loan_guard import LoanGuard
from extender.metrics import Metrics
from extender.reload import RulesInForce
from extender.store import SnapshotStore
from tests.unit.objects import A100, LOAN_KEY, RULES, borrower, node, pod
from tests.unit.test_bounded_memory import EAGER, Leading
from tests.unit.test_metrics import FakeApi

G1 = "nvidia.com/mig-1g.5gb"
G2 = "nvidia.com/mig-2g.10gb"
HOLD = "example.com/hold"
JOURNAL = "/api/v1/namespaces/migchain-system/configmaps"


# -- a bare pod with finalizers never borrows --------------------------------------------------------------------


def test_a_bare_pod_with_finalizers_may_not_borrow_and_says_why():
    held = pod("p", {G1: 1}, phase="Pending")
    held["metadata"]["finalizers"] = [HOLD]
    assert "finalizers" in pod_request(held).no_borrow
    assert pod_request(pod("p", {G1: 1}, phase="Pending")).no_borrow == ""


def test_an_owned_pod_with_finalizers_may_borrow():
    owned = pod("p", {G1: 1}, phase="Pending")
    owned["metadata"]["finalizers"] = [HOLD, "batch.kubernetes.io/job-tracking"]
    owned["metadata"]["ownerReferences"] = [{"kind": "Job", "name": "j", "uid": "j-1", "controller": True}]
    assert pod_request(owned).no_borrow == ""


@given(st.one_of(st.none(), st.integers(), st.text(), st.lists(st.text()), st.dictionaries(st.text(), st.text())))
def test_any_finalizers_value_on_a_bare_pod_is_read_without_a_crash(finalizers: Any):
    hostile = pod("p", {G1: 1}, phase="Pending")
    hostile["metadata"]["finalizers"] = finalizers
    assert bool(pod_request(hostile).no_borrow) == bool(finalizers)


# -- a reservation holds while its writes run ------------------------------------------------------------------------


@given(
    ttl=st.floats(0.1, 100),
    writers=st.integers(1, 4),
    times=st.lists(st.floats(0, 1e6), min_size=1, max_size=20),
)
def test_a_held_reservation_never_expires_and_expires_only_ttl_after_its_last_writer(
    ttl: float, writers: int, times: list[float]
):
    ledger = Ledger()
    ledger.replace_nodes([NodeState("n", allocatable={G2: 1})])
    ledger.reserve("p", "n", ((G2, 1),), expires_at=ttl)
    for _ in range(writers):
        ledger.hold("p")
    now = 0.0
    for step in times:
        now += step
        assert ledger.expire(now) == []
        assert ledger.node_state("n").used == {G2: 1}  # type: ignore[union-attr]
    for _ in range(writers - 1):
        ledger.settle("p", now + ttl)
        assert ledger.expire(now + 10 * ttl + 1e6) == []  # a writer is left
    ledger.settle("p", now + ttl)
    assert not ledger.held("p")
    assert ledger.expire(now + ttl * 0.99) == []
    assert ledger.expire(now + ttl) == ["p"]


def test_settling_never_shortens_a_reservation_and_leaves_a_released_one_released():
    ledger = Ledger()
    ledger.replace_nodes([NodeState("n", allocatable={G2: 2})])
    ledger.reserve("p", "n", ((G2, 1),), expires_at=500)
    ledger.hold("p")
    ledger.settle("p", 100)
    assert ledger.reservation("p").expires_at == 500  # type: ignore[union-attr]
    ledger.hold("q")
    ledger.settle("q", 100)  # a writer that never reserved (a recovery whose copy did not fit)
    assert ledger.reservation("q") is None and not ledger.held("q")


class SlowBorrowExecutor:
    """A borrow whose writes take longer than a reservation may wait: time passes and the janitor runs meanwhile."""

    loan_key = LOAN_KEY

    def __init__(self, during: Any) -> None:
        self.during = during

    def borrow(self, plan: Any) -> dict[str, Any]:
        self.during()
        return dict(plan.replacement)


class ReadOnlyApi:
    def __init__(self, objects: dict[str, dict[str, Any]]) -> None:
        self.objects = objects

    def get(self, resource: str, **_: Any) -> dict[str, Any]:
        if resource not in self.objects:
            raise ApiError(404, "NotFound", resource)
        return copy.deepcopy(self.objects[resource])

    def create(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        return body


def test_no_slice_is_given_twice_while_a_borrow_outlasts_the_reservation_ttl():
    clock = [0.0]
    waiting, other = pod("p", {G1: 1}, phase="Pending"), pod("q", {G2: 1}, phase="Pending")
    api = ReadOnlyApi({"/api/v1/namespaces/ml/pods/p": waiting, "/api/v1/namespaces/ml/pods/q": other})
    metrics = Metrics()
    cache = ClusterCache(
        cast(KubeApi, api), SnapshotStore(), clock=lambda: clock[0], errors=metrics.errors, loans=LoanGuard(LOAN_KEY)
    )
    cache.ledger.replace_nodes([node_state(node("gpu-a", {G2: 1}))])
    cache.ledger.replace_pods(pod_record(p) for p in (waiting, other))
    seen: list[str] = []

    def slow_writes() -> None:
        clock[0] += 10 * RESERVATION_TTL  # four API calls of 30 s each, and more
        assert cache.ledger.expire(clock[0]) == []
        seen.append(binder.bind(BindRequest("ml", "q", "uid-q", "gpu-a")).error)

    events = EventRecorder(cast(KubeApi, api), "test", metrics.errors)
    binder = Binder(
        cast(KubeApi, api),
        cache,
        RulesInForce.fixed(RULES),
        cast(Executor, SlowBorrowExecutor(slow_writes)),
        events,
        metrics=metrics,
    )
    assert binder.bind(BindRequest("ml", "p", "uid-p", "gpu-a")).error == ""
    assert "no longer fits" in seen[0]  # the 2g.10gb stayed p's while its borrow ran
    # Done: the watch gets a whole TTL from now to confirm it, then it goes.
    assert cache.ledger.expire(clock[0] + RESERVATION_TTL - 1) == []
    assert cache.ledger.expire(clock[0] + RESERVATION_TTL) == ["uid-p"]


# -- the executor never waits on a pod -------------------------------------------------------------------------------


class PodsApi:
    """Pods and journal ConfigMaps: a delete or an eviction takes a pod at once, unless it has finalizers."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}

    def get(self, resource: str, **_: Any) -> dict[str, Any]:
        if resource not in self.objects:
            raise ApiError(404, "NotFound", resource)
        return copy.deepcopy(self.objects[resource])

    def create(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        if resource.endswith("/eviction"):
            evicted = self.objects.get(resource.removesuffix("/eviction"))
            if evicted is not None:  # the mark the Eviction API puts on a pod before deleting it
                condition = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
                evicted.setdefault("status", {})["conditions"] = [condition]
            return self.delete(resource.removesuffix("/eviction"))
        where = f"{resource}/{body['metadata']['name']}"
        if where in self.objects:
            raise ApiError(409, "AlreadyExists", where)
        self.objects[where] = copy.deepcopy(dict(body))
        self.objects[where]["metadata"].setdefault("uid", f"uid-{len(self.objects)}")
        return self.get(where)

    def delete(self, resource: str, options: Any = None) -> dict[str, Any]:
        current = self.objects.get(resource)
        if current is None:
            raise ApiError(404, "NotFound", resource)
        if current["metadata"].get("finalizers"):
            current["metadata"]["deletionTimestamp"] = "2026-11-30T10:00:00Z"
        else:
            del self.objects[resource]
        return {}

    def request(self, method: str, resource: str, body: Any = None, **_: Any) -> dict[str, Any]:
        """A dry-run create (dryRun=All): admitted, nothing stored."""
        return cast(dict[str, Any], copy.deepcopy(body))

    def let_go(self, resource: str) -> None:
        del self.objects[resource]

    def journal(self) -> list[str]:
        return [name for name in self.objects if name.startswith(JOURNAL)]

    def list_all(self, resource: str, **_: Any) -> tuple[list[dict[str, Any]], str]:
        return [copy.deepcopy(o) for name, o in self.objects.items() if name.startswith(resource + "/")], "1"


@pytest.fixture
def no_sleeping(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(seconds: float) -> None:
        raise AssertionError(f"the executor slept {seconds} s on a pod")

    monkeypatch.setattr(time, "sleep", refuse)


def bare_plan(api: PodsApi) -> Any:
    original = pod("p", {G1: 1}, phase="Pending")
    api.objects["/api/v1/namespaces/ml/pods/p"] = copy.deepcopy(original)
    verdict = place(pod_request(original), NodeState("gpu-a", A100, "success", {G2: 1}, {}), "gpu-a", RULES)
    assert isinstance(verdict, Placement)
    return plan_borrow(original, verdict, LOAN_KEY)


def test_a_bare_borrow_whose_original_gained_a_finalizer_fails_at_once_and_stays_journaled(no_sleeping: None):
    api = PodsApi()
    plan = bare_plan(api)
    api.objects["/api/v1/namespaces/ml/pods/p"]["metadata"]["finalizers"] = [HOLD]  # added after it was read
    executor = Executor(cast(KubeApi, api), "migchain-system", LOAN_KEY)
    with pytest.raises(StillTerminating, match="held by finalizers"):
        executor.borrow(plan)
    assert len(api.journal()) == 1
    with pytest.raises(StillTerminating):  # recovery does not wait either
        executor.finish(plan.original, plan.replacement, lambda: True)
    api.let_go("/api/v1/namespaces/ml/pods/p")
    assert executor.finish(plan.original, plan.replacement, lambda: True).startswith("recreated")
    assert api.journal() == []
    assert api.objects["/api/v1/namespaces/ml/pods/p"]["spec"]["nodeName"] == "gpu-a"


def test_a_bare_return_whose_borrower_is_slow_to_go_returns_at_once_and_is_finished_later(no_sleeping: None):
    api = PodsApi()
    resource = "/api/v1/namespaces/ml/pods/b"
    borrower = pod("b", {G2: 1}, "gpu-a")
    borrower["metadata"]["finalizers"] = [HOLD]
    api.objects[resource] = copy.deepcopy(borrower)
    restored = pod("b", {G1: 1})
    del restored["metadata"]["uid"]
    executor = Executor(cast(KubeApi, api), "migchain-system", LOAN_KEY)
    assert executor.restore(borrower, restored, owned=False) == RESTORE_JOURNALED
    assert len(api.journal()) == 1
    with pytest.raises(StillTerminating):
        executor.finish_return(borrower, restored)
    api.let_go(resource)
    assert "recreated" in executor.finish_return(borrower, restored)
    assert api.journal() == []
    assert api.objects[resource]["spec"]["containers"][0]["resources"]["limits"] == {G1: "1"}


# -- a return left to the journal is finished as soon as its pod is gone ---------------------------------------------


class SlowToGo:
    """An executor whose bare borrowers do not go with their eviction; it counts the journal's finishing passes."""

    loan_key = LOAN_KEY

    def __init__(self, api: Any) -> None:
        self.api = api
        self.entries: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.finished: list[str] = []

    def restore(self, borrower: Any, restored: Any, owned: bool) -> str:
        self.entries.append((borrower, restored))
        return RESTORE_JOURNALED

    def journal(self, kind: str, rejected: Any = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        return list(self.entries) if kind == "return" else []

    def finish_return(self, borrower: Any, restored: Any) -> str:
        if self.api.objects:  # still there, terminating
            raise StillTerminating("still terminating")
        self.entries.clear()
        self.finished.append(borrower["metadata"]["name"])
        return "recreated it with its original request"


def test_a_journaled_return_is_finished_in_the_first_round_after_its_borrower_is_gone():
    loaned = borrower("b", {G1: 1}, "gpu-a", free={G2: 1})
    api = FakeApi({"/api/v1/namespaces/ml/pods/b": loaned})
    cache = ClusterCache(cast(KubeApi, api), SnapshotStore(), loans=LoanGuard(LOAN_KEY))
    cache._list_nodes([node("gpu-a", {G1: 1, G2: 1})])
    cache._list_pods([loaned])
    executor = SlowToGo(api)
    returner = Returner(
        cache,
        RulesInForce.fixed(EAGER),
        cast(Executor, executor),
        EventRecorder(cast(KubeApi, api)),
        cast(LeaderElection, Leading()),
    )
    returner.round()  # eager: b goes back to the free 1g.5gb; its eviction leaves it terminating
    assert len(executor.entries) == 1
    returner.round()
    assert executor.finished == []
    api.objects = {}
    cache._list_pods([])  # the watch: b is gone
    started = time.monotonic()
    returner.round()
    assert executor.finished == ["b"] and time.monotonic() - started < 0.5
