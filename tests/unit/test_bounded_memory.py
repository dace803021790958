"""Memory that stays bounded whatever pods are made up, and however long a dry run lasts; rounds coalesced.

Pods name their MIG types and their namespaces, and a dry run announces
every decision once: what is remembered for that must shrink again when the
pods are gone, or a tenant (or time) grows the extender and the returner
until they are killed.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import tracemalloc
from typing import Any, cast

from extender.core.cluster import NodeState, pod_record
from extender.core.decide import Placement, place
from extender.core.rules import ChainRules, ReturnMode
from extender.kube.api import KubeApi
from extender.kube.cache import ClusterCache
from extender.kube.events import EventRecorder
from extender.kube.executor import EvictionBlocked, Executor
from extender.kube.lease import LeaderElection
from extender.kube.returner import Returner
from extender.loan_guard import LoanGuard
from extender.reload import RulesInForce
from extender.store import SnapshotStore
from tests.unit.objects import A100, G1, G2, LOAN_KEY, RULES, borrower, node, pod
from tests.unit.test_metrics import FakeApi, binder_on

EAGER = ChainRules(
    dataclasses.replace(chain, policy=dataclasses.replace(chain.policy, return_mode=ReturnMode.EAGER))
    for chain in RULES.chains
)
MIB = 1024 * 1024


def retained(work: Any) -> float:
    """MiB still allocated after `work()` is done: what it left behind."""
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        work()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return (after - before) / MIB


# -- chain rules ---------------------------------------------------------------------------------------------


def test_made_up_type_names_leave_nothing_behind_in_the_chain_rules():
    """`place` asks the rules what may stand in for each type a pod names (`borrow_options`)."""
    rules = ChainRules(RULES.chains)

    def ask_for_made_up_types() -> None:
        for index in range(100_000):
            assert rules.borrow_options(f"nvidia.com/mig-1g.5gb.x{index}", A100, "ml") == ()

    assert retained(ask_for_made_up_types) < 0.5  # it was 18 MiB: an entry per made-up name
    # Known types are still answered, and still remembered.
    assert rules.borrow_options(G1, A100, "ml") is rules.borrow_options(G1, A100, "ml")
    assert rules.borrow_options(G1, A100, "ml")[0].granted == "nvidia.com/mig-1g.10gb"


def test_made_up_namespaces_leave_at_most_a_bounded_memo_behind():
    rules = ChainRules(RULES.chains)

    def from_many_namespaces() -> None:
        for index in range(30_000):
            assert rules.borrow_options(G1, A100, f"ns-{index}")

    assert retained(from_many_namespaces) < 4.0  # it was 27 MiB


# -- what was said once --------------------------------------------------------------------------------------


def test_once_says_each_thing_once_and_never_remembers_more_than_its_cap():
    from extender.kube.once import Once

    said = Once[str](cap=1_000)
    assert said.first("a") and not said.first("a")
    for index in range(100_000):
        said.first(f"made-up-{index}")
    assert len(said) == 1_000
    assert "made-up-99999" in said and "a" not in said  # the oldest go first
    said.keep_only({"made-up-99999", "gone"})
    assert len(said) == 1 and not said.first("made-up-99999")


class Leading:
    def leading(self) -> bool:
        return True


class Refusing:
    """An executor whose evictions a PodDisruptionBudget refuses; no journal to finish."""

    def __init__(self, api: FakeApi) -> None:
        self.api = api
        self.loan_key = LOAN_KEY

    def journal(self, kind: str, rejected: Any = None) -> list[Any]:
        return []

    def restore(self, borrower: Any, restored: Any, owned: bool) -> str:
        raise EvictionBlocked("Cannot evict pod as it would violate the pod's disruption budget.")


def returner_on(api: FakeApi, *, dry_run: bool) -> tuple[Returner, ClusterCache]:
    cache = ClusterCache(cast(KubeApi, api), SnapshotStore(), loans=LoanGuard(LOAN_KEY))
    cache._list_nodes([node("gpu-a", {G1: 1, G2: 1})])
    cache._list_pods([])
    for informer in cache._informers:  # what the watch's first lists do
        informer.listed.set()
    returner = Returner(
        cache,
        RulesInForce.fixed(EAGER),
        cast(Executor, Refusing(api)),
        EventRecorder(cast(KubeApi, api)),
        cast(LeaderElection, Leading()),
        dry_run=dry_run,
    )
    return returner, cache


def borrowers_one_after_another(api: FakeApi, cache: ClusterCache, returner: Returner, count: int) -> None:
    """`count` rounds, each with one new borrower on gpu-a (a 1g.5gb pod on the 2g.10gb, the 1g.5gb free),
    the one before gone."""
    for index in range(count):
        loaned = borrower(f"b{index}", {G1: 1}, "gpu-a", free={G2: 1})
        api.objects = {f"/api/v1/namespaces/ml/pods/b{index}": loaned}
        cache._list_pods([loaned])
        returner.round()


def test_a_long_dry_run_remembers_only_the_borrowers_still_running():
    api = FakeApi()
    returner, cache = returner_on(api, dry_run=True)
    borrowers_one_after_another(api, cache, returner, 3_000)
    assert [body["reason"] for _, body in api.created] == ["WouldReturn"] * 3_000  # each told once
    assert len(returner._announced) <= 1


def test_borrowers_whose_return_a_budget_refused_are_forgotten_once_gone():
    api = FakeApi()
    returner, cache = returner_on(api, dry_run=False)
    borrowers_one_after_another(api, cache, returner, 3_000)
    assert [body["reason"] for _, body in api.created].count("ReturnBlocked") == 3_000
    assert len(returner._blocked) <= 1


def test_a_long_dry_run_of_the_binder_remembers_only_pods_still_pending():
    from extender.metrics import Metrics

    api = FakeApi()
    binder = binder_on(api, [], Metrics())
    state = NodeState("gpu-b", A100, "success", {G2: 1}, {})
    for index in range(100_000):
        record = pod_record(pod(f"p{index}", {G1: 1}, phase="Pending"))
        placement = place(record.request, state, "gpu-b", RULES)
        assert isinstance(placement, Placement)
        binder._would_borrow(record, placement)
    assert len(binder._announced) < 5_000  # none of them is pending in the cache any more


# -- rounds ---------------------------------------------------------------------------------------------------


def test_a_storm_of_changes_is_planned_in_a_few_rounds_and_a_change_after_a_lull_at_once():
    api = FakeApi()
    returner, cache = returner_on(api, dry_run=True)
    rounds: list[float] = []
    planned = returner.round

    def counted() -> None:
        rounds.append(time.monotonic())
        planned()

    returner.round = counted  # type: ignore[method-assign]
    stop = threading.Event()
    worker = threading.Thread(target=returner.run, args=(stop,), daemon=True)
    worker.start()
    try:
        storm_until = time.monotonic() + 1.0
        while time.monotonic() < storm_until:  # a busy cluster: a change every millisecond
            cache.changed.set()
            time.sleep(0.001)
        time.sleep(0.5)  # a lull
        during_storm = len([at for at in rounds if at < storm_until])
        quiet = len(rounds)
        changed_at = time.monotonic()
        cache.changed.set()
        deadline = changed_at + 2.0
        while len(rounds) == quiet and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        stop.set()
        worker.join(timeout=5)
    assert 2 <= during_storm <= 8, f"{during_storm} rounds in a one-second storm of 1,000 changes"
    assert len(rounds) > quiet and rounds[quiet] - changed_at < 0.5  # after a lull, at once
