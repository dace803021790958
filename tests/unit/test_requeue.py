"""A pod refused while migchain's view lagged is retried once it catches up: the filter memory and the requeuer."""

from __future__ import annotations

import threading
import time
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extender.core.cluster import PodRequest, Snapshot, pod_request
from extender.filter_memory import FilterMemory
from extender.kube.api import ApiError, KubeApi
from extender.kube.cache import ClusterCache
from extender.kube.requeue import GRACE_SECONDS, MAX_ATTEMPTS, MIN_PASS_SECONDS, REQUEUED_ANNOTATION, Requeuer
from extender.loan_guard import LoanGuard
from extender.metrics import Metrics
from extender.reload import RulesInForce
from extender.store import SnapshotStore
from tests.unit.objects import G1, G2, LOAN_KEY, RULES, node, pod


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(name: str, uid: str = "", mig: tuple[tuple[str, int], ...] = ((G1, 1),)) -> PodRequest:
    return PodRequest("ml", name, uid or f"uid-{name}", mig)


# -- the filter memory ------------------------------------------------------------


def test_the_memory_keeps_each_pods_last_filter_call_and_forgets_only_the_entry_it_was_told():
    store = SnapshotStore()
    memory = FilterMemory(store)
    memory.filtered(request("p"), ["gpu-a", "gpu-b"], False, store.snapshot())
    memory.filtered(request("q"), ["gpu-a"], True, store.snapshot())
    assert memory.candidates("uid-p") == ("gpu-a", "gpu-b")
    assert [entry.pod.name for entry in memory.refused()] == ["q"]
    [old] = memory.refused()
    memory.filtered(request("q"), ["gpu-b"], True, store.snapshot())  # kube-scheduler asked again
    memory.forget("uid-q", old)  # the requeuer's stale entry: not the one there now
    assert memory.candidates("uid-q") == ("gpu-b",)
    memory.forget("uid-q")
    assert memory.candidates("uid-q") == ()
    assert memory.candidates("uid-unknown") == ()


def test_pods_without_a_uid_or_a_mig_request_are_not_remembered():
    store = SnapshotStore()
    memory = FilterMemory(store)
    memory.filtered(PodRequest("ml", "p", "", ((G1, 1),)), ["gpu-a"], True, store.snapshot())
    memory.filtered(request("q", mig=()), ["gpu-a"], True, store.snapshot())
    assert len(memory) == 0


def test_node_names_are_kept_as_the_request_gave_them_without_a_copy():
    store = SnapshotStore()
    memory = FilterMemory(store)
    names = ("gpu-a", "gpu-b")
    memory.filtered(request("p"), names, False, store.snapshot())
    assert memory.candidates("uid-p") is names


def test_the_least_recently_filtered_pods_go_first_beyond_the_bounds_and_old_entries_expire():
    clock = Clock()
    store = SnapshotStore()
    memory = FilterMemory(store, clock=clock, max_pods=3, max_node_names=5, max_age=60)
    for name in ("a", "b", "c", "d"):
        memory.filtered(request(name), ["n1"], False, store.snapshot())
    assert [memory.candidates(f"uid-{name}") for name in "abcd"] == [(), ("n1",), ("n1",), ("n1",)]
    memory.filtered(request("e"), ["n1", "n2", "n3", "n4"], False, store.snapshot())  # 7 names, then 6: b, c go
    assert [bool(memory.candidates(f"uid-{name}")) for name in "bcde"] == [False, False, True, True]
    memory.filtered(request("huge"), [f"n{i}" for i in range(9)], True, store.snapshot())
    assert memory.candidates("uid-huge") == ()  # more names than the bound: kept without them
    assert [entry.pod.name for entry in memory.refused()] == ["huge"]  # still retried once it fits
    clock.now += 61
    assert memory.refused() == [] and len(memory) == 0


@given(calls=st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 6), st.booleans()), max_size=40))
def test_the_bounds_always_hold_and_the_count_of_names_is_exact(calls):
    store = SnapshotStore()
    memory = FilterMemory(store, max_pods=4, max_node_names=10)
    for name, names, refused in calls:
        memory.filtered(request(name), [f"n{i}" for i in range(names)], refused, store.snapshot())
        assert len(memory) <= 4
        assert memory.node_names <= 10
        assert memory.node_names == sum(len(memory.candidates(f"uid-{n}")) for n in "abcdefgh")


def test_a_refusal_decided_on_a_snapshot_already_replaced_wakes_the_requeuer():
    store = SnapshotStore()
    wake = threading.Event()
    memory = FilterMemory(store, wake)
    decided_on = store.snapshot()
    memory.filtered(request("p"), ["gpu-a"], True, decided_on)
    memory.filtered(request("q"), ["gpu-a"], False, decided_on)
    assert not wake.is_set()  # nothing newer to look at yet
    store.publish(Snapshot())
    memory.filtered(request("q"), ["gpu-a"], False, decided_on)
    assert not wake.is_set()  # it passed: nothing to retry
    memory.filtered(request("r"), ["gpu-a"], True, decided_on)
    assert wake.is_set()


# -- the requeuer -------------------------------------------------------------------


class FakeApi:
    """Patches recorded, or refused with each of `failures` in turn."""

    def __init__(self, failures: list[ApiError] | None = None) -> None:
        self.failures = failures or []
        self.patches: list[tuple[str, Any]] = []

    def patch(self, resource: str, body: Any, content_type: str = "") -> dict[str, Any]:
        self.patches.append((resource, body))
        if self.failures:
            raise self.failures.pop(0)
        return {}


class World:
    """gpu-a and gpu-b, each with one 1g.5gb, held by `holder` and `other`; `waiter` pending and just refused."""

    def __init__(self, failures: list[ApiError] | None = None, candidates: tuple[str, ...] = ("gpu-a",)) -> None:
        self.clock = Clock()
        self.api = FakeApi(failures)
        self.cache = ClusterCache(cast(KubeApi, self.api), SnapshotStore(), loans=LoanGuard(LOAN_KEY))
        self.holder = pod("holder", {G1: 1}, "gpu-a")
        self.other = pod("other", {G1: 1}, "gpu-b")
        self.waiter = pod("waiter", {G1: 1}, phase="Pending")
        self.cache._list_nodes([node("gpu-a", {G1: 1}), node("gpu-b", {G1: 1})])
        self.cache._list_pods([self.holder, self.other, self.waiter])
        self.memory = FilterMemory(self.cache.store, self.cache.changed, self.clock)
        self.metrics = Metrics()
        self.requeuer = Requeuer(
            cast(KubeApi, self.api), self.cache, self.memory, RulesInForce.fixed(RULES), self.metrics, clock=self.clock
        )
        self.candidates = candidates
        self.refuse_waiter()

    def refuse_waiter(self) -> None:
        """kube-scheduler asked about the waiter, and every node refused it (on the cache's current view)."""
        self.memory.filtered(pod_request(self.waiter), self.candidates, True, self.cache.store.snapshot())

    def free_the_slice(self) -> None:
        self.cache._pod_event("DELETED", self.holder)

    def after(self, seconds: float) -> list[tuple[str, Any]]:
        self.clock.now += seconds
        self.requeuer.run_once()
        return self.api.patches

    def requeues(self, outcome: str) -> float | None:
        return self.metrics.registry.get_sample_value("migchain_requeues_total", {"outcome": outcome})


def test_a_pod_refused_on_a_view_that_then_frees_its_slice_is_requeued_after_the_grace():
    world = World()
    assert world.after(0) == []  # nothing new since the refusal
    world.free_the_slice()
    assert world.after(0) == []  # kube-scheduler may retry it on its own: wait out the grace
    [(resource, body)] = world.after(GRACE_SECONDS)
    assert resource == "/api/v1/namespaces/ml/pods/waiter"
    # The UID makes the API server refuse the patch if another pod took the name.
    assert body["metadata"]["uid"] == "uid-waiter"
    assert set(body["metadata"]["annotations"]) == {REQUEUED_ANNOTATION}
    assert world.requeues("requeued") == 1
    assert world.memory.refused() == []
    assert len(world.after(10)) == 1  # once


def test_no_write_when_kube_scheduler_asks_again_within_the_grace():
    world = World()
    world.free_the_slice()
    world.after(0)
    world.memory.filtered(pod_request(world.waiter), ("gpu-a",), False, world.cache.store.snapshot())  # it passed
    assert world.after(GRACE_SECONDS) == []
    world = World()
    world.free_the_slice()
    world.after(0)
    world.refuse_waiter()  # asked again, and refused on the view that shows the slice free: it does not fit
    assert world.after(GRACE_SECONDS) == []  # that refusal stands until the view changes again


def test_no_write_for_a_pod_that_does_not_fit_the_new_view_or_only_on_a_node_it_may_not_run_on():
    world = World()
    world.cache._list_nodes([node("gpu-a", {G1: 1}), node("gpu-b", {G1: 1}), node("gpu-c", {G2: 0})])  # news
    assert world.after(GRACE_SECONDS) == [] and world.after(GRACE_SECONDS) == []
    world = World(candidates=("gpu-b",))  # kube-scheduler's own filters left only gpu-b
    world.free_the_slice()  # on gpu-a
    assert world.after(GRACE_SECONDS) == [] and world.after(GRACE_SECONDS) == []
    world.cache._pod_event("MODIFIED", world.other | {"status": {"phase": "Succeeded"}})
    assert world.after(GRACE_SECONDS) == [] and len(world.after(GRACE_SECONDS)) == 1


def test_a_pod_taken_again_before_the_grace_ends_is_not_requeued():
    world = World()
    world.free_the_slice()
    world.after(0)
    world.cache._pod_event("ADDED", pod("thief", {G1: 1}, "gpu-a"))
    assert world.after(GRACE_SECONDS) == []
    assert len(world.memory.refused()) == 1  # still remembered: the next free slice may be its


def test_a_pod_bound_deleted_or_replaced_meanwhile_is_forgotten_without_a_write():
    for change in ("bound", "deleted", "replaced"):
        world = World()
        world.free_the_slice()
        if change == "bound":
            world.cache._pod_event("MODIFIED", pod("waiter", {G1: 1}, "gpu-a"))
        elif change == "deleted":
            world.cache._pod_event("MODIFIED", world.waiter | {"status": {"phase": "Failed"}})
        else:
            replacement = pod("waiter", {G1: 1}, phase="Pending")
            replacement["metadata"]["uid"] = "uid-waiter-2"
            world.cache._pod_event("DELETED", world.waiter)
            world.cache._pod_event("ADDED", replacement)
        assert world.after(GRACE_SECONDS) == [], change
        assert world.memory.refused() == [], change


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (ApiError(404, "NotFound", 'pods "waiter" not found'), "gone"),
        (ApiError(422, "Invalid", "metadata.uid: Invalid value: field is immutable"), "gone"),
        (ApiError(403, "Forbidden", "denied by a ValidatingAdmissionPolicy"), "refused"),
    ],
)
def test_a_patch_refused_for_good_is_counted_and_never_tried_again(error, outcome):
    world = World([error])
    world.free_the_slice()
    world.after(0)
    assert len(world.after(GRACE_SECONDS)) == 1
    assert world.requeues(outcome) == 1
    assert world.memory.refused() == []
    assert len(world.after(10)) == 1


@pytest.mark.parametrize(
    "error",
    [ApiError(503, "ServiceUnavailable", "etcd"), ApiError(429, "TooManyRequests", ""), ApiError(0, "NoAnswer", "")],
)
def test_a_patch_failed_for_now_is_tried_again_a_few_times_then_given_up(error):
    world = World([error] * MAX_ATTEMPTS)
    world.free_the_slice()
    world.after(0)
    assert len(world.after(GRACE_SECONDS)) == 1
    assert len(world.after(0.9)) == 1  # 1 s after the first try
    assert len(world.after(0.1)) == 2
    assert len(world.after(1.9)) == 2  # then 2 s
    assert len(world.after(0.1)) == 3
    assert world.requeues("failed") == 1
    assert (
        world.metrics.registry.get_sample_value("migchain_errors_total", {"component": "requeue", "kind": "api"}) == 3
    )
    assert world.memory.refused() == []  # never forever: the scheduler's own flush is the backstop
    assert len(world.after(60)) == 3


def test_a_retry_that_then_succeeds_counts_once():
    world = World([ApiError(0, "NoAnswer", "connection reset")])  # it may have happened: a second patch is harmless
    world.free_the_slice()
    world.after(0)
    world.after(GRACE_SECONDS)
    assert len(world.after(1.0)) == 2
    assert world.requeues("requeued") == 1 and world.requeues("failed") is None


def test_the_requeuer_thread_acts_on_the_caches_news_within_the_grace():
    world = World()
    world.requeuer.clock = time.monotonic
    world.memory.clock = time.monotonic
    world.refuse_waiter()  # again, on the real clock
    stop = threading.Event()
    thread = threading.Thread(target=world.requeuer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(0.05)
        assert world.api.patches == []
        freed = time.monotonic()
        world.free_the_slice()
        deadline = freed + 5
        while not world.api.patches and time.monotonic() < deadline:
            time.sleep(0.01)
        assert world.api.patches, "the requeuer never patched the waiter"
        assert GRACE_SECONDS <= time.monotonic() - freed < GRACE_SECONDS + 1.0
    finally:
        stop.set()
        world.cache.changed.set()
        thread.join(5)
    assert not thread.is_alive()


def test_a_stream_of_cache_news_wakes_the_requeuer_a_few_times_a_second_not_once_per_change():
    # In a burst the cache publishes hundreds of views a second; a pass for each
    # cost the extender a thread switch per watch event (issue 22's profile).
    world = World()
    passes: list[float] = []
    run_once = world.requeuer.run_once

    def counted() -> None:
        passes.append(time.monotonic())
        run_once()

    world.requeuer.run_once = counted  # type: ignore[method-assign]
    stop = threading.Event()
    thread = threading.Thread(target=world.requeuer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        for _ in range(40):  # 40 changes over at least 0.2 s
            world.cache._publish()
            time.sleep(0.005)
        seconds = time.monotonic() - started
        time.sleep(MIN_PASS_SECONDS * 2)
    finally:
        stop.set()
        world.cache.changed.set()
        thread.join(5)
    assert passes, "the requeuer never looked"
    assert len(passes) <= seconds / MIN_PASS_SECONDS + 3
    assert passes[-1] > started + seconds - MIN_PASS_SECONDS  # the last news was looked at
