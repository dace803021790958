"""The preemption planner: properties over generated fleets, the issue's scenarios, and nominated pods."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extender.core.cluster import MigCounts, NodeState, PodRecord, PodRequest, Snapshot
from extender.core.decide import Placement, place
from extender.core.loan import counts_text
from extender.core.preempt import (
    EVICTED,
    MAX_PREEMPTIONS_PER_ROUND,
    PENDING,
    RETURNED,
    Preemption,
    candidates_to_find,
    node_after_nominated,
    plan_preemptions,
    yield_to_nominated,
)
from extender.core.rules import Chain, ChainRules, Policy
from tests.strategies import A100

G1, G2, G3 = TYPES = ("nvidia.com/mig-1g.5gb", "nvidia.com/mig-2g.10gb", "nvidia.com/mig-3g.20gb")
RULES = ChainRules([Chain("a100", frozenset({A100}), TYPES, Policy())])
NODES = ("n0", "n1", "n2")
SCHEDULER = "migchain-scheduler"
PRIORITIES = (0, 10, 100, 1000)


def running(name: str, node: str, holds: str, priority: int, *, asked: str = "", second: int = 10) -> PodRecord:
    """A pod bound to `node` holding one `holds` slice; with `asked`, a borrower that asked for that type."""
    loan = {}
    if asked:
        loan = {
            "migchain.io/original-requests": counts_text(((asked, 1),)),
            "migchain.io/borrowed-requests": counts_text(((holds, 1),)),
            "migchain.io/chain": "a100",
            "migchain.io/steps": str(TYPES.index(holds) - TYPES.index(asked)),
            "migchain.io/replaced-uid": f"old-{name}",
        }
    request = PodRequest("ns", name, f"uid-{name}", ((holds, 1),), priority=priority)
    return PodRecord(request, node, False, loan.get("migchain.io/replaced-uid", ""), created=_at(second), migchain=loan)


def waiting(name: str, asks: MigCounts, priority: int, **fields: object) -> PodRecord:
    """A pending pod its scheduler found unschedulable."""
    request = PodRequest("ns", name, f"uid-{name}", asks, priority=priority)
    record = PodRecord(request, "", False, created=_at(50), scheduler_name=SCHEDULER, unschedulable=True)
    return replace(record, **fields)  # type: ignore[arg-type]


def _at(second: int) -> str:
    return f"2026-11-30T10:00:{second:02d}Z"


def snapshot_of(allocatable: dict[str, dict[str, int]], records: list[PodRecord]) -> Snapshot:
    """Nodes whose used slices are exactly what the bound records hold."""
    used: dict[str, Counter[str]] = {name: Counter() for name in allocatable}
    for record in records:
        if record.holds_slices:
            for resource, count in record.request.mig:
                used[record.node][resource] += count
    return Snapshot.of(
        NodeState(name, A100, "success", slices, dict(used[name])) for name, slices in allocatable.items()
    )


def plan(allocatable: dict[str, dict[str, int]], records: list[PodRecord], **options: object) -> tuple[Preemption, ...]:
    return plan_preemptions(snapshot_of(allocatable, records), records, RULES, schedulers=(SCHEDULER,), **options)  # type: ignore[arg-type]


def fits(pod: PodRequest, node: NodeState, free: dict[str, int]) -> bool:
    used = {resource: count - free.get(resource, 0) for resource, count in node.allocatable.items()}
    return isinstance(place(pod, replace(node, used=used), node.name, RULES), Placement)


# -- generated fleets ----------------------------------------------------------------


@st.composite
def fleets(draw: st.DrawFn, max_pending: int = 3) -> tuple[Snapshot, list[PodRecord]]:
    """Nodes mostly full of running pods (exact fits and borrowers) of mixed priorities, and pending pods."""
    allocatable = {name: {t: draw(st.integers(0, 2)) for t in TYPES} for name in NODES}
    records = []
    for name, slices in allocatable.items():
        for resource, count in slices.items():
            for index in range(draw(st.sampled_from((count, count, *range(count + 1))))):  # mostly full
                held = TYPES.index(resource)
                asked = TYPES[draw(st.integers(0, held))] if held and draw(st.booleans()) else ""
                pod = f"{name}-{resource[-6:]}-{index}"
                priority = draw(st.sampled_from(PRIORITIES[:3]))
                record = running(pod, name, resource, priority, asked=asked, second=draw(st.integers(0, 40)))
                if draw(st.integers(0, 7)) == 0:
                    record = replace(record, terminating=True)
                records.append(record)
    for index in range(draw(st.integers(1, max_pending))):
        asks = tuple(sorted(draw(st.dictionaries(st.sampled_from(TYPES), st.integers(1, 2), min_size=1)).items()))
        record = waiting(f"p{index}", asks, draw(st.sampled_from((1000, 1000, *PRIORITIES))))
        request = record.request
        if draw(st.integers(0, 3)) == 0:
            request = replace(request, no_borrow="pod annotation migchain.io/borrow=false")
        record = replace(
            record,
            request=request,
            created=_at(draw(st.integers(41, 59))),
            preemption_policy=draw(st.sampled_from(("", "", "PreemptLowerPriority", "Never"))),
            scheduler_name=draw(st.sampled_from((SCHEDULER, SCHEDULER, SCHEDULER, "default-scheduler"))),
            unschedulable=draw(st.sampled_from((True, True, True, False))),
        )
        records.append(record)
    return snapshot_of(allocatable, records), records


def planned(fleet: tuple[Snapshot, list[PodRecord]]) -> tuple[Preemption, ...]:
    snapshot, records = fleet
    return plan_preemptions(snapshot, records, RULES, schedulers=(SCHEDULER,))


@given(fleet=fleets())
def test_victims_are_running_pods_of_strictly_lower_priority_on_the_node_each_taken_once(fleet):
    seen = set()
    for preemption in planned(fleet):
        assert preemption.victims
        for victim in preemption.victims:
            record = victim.record
            assert record.request.priority < preemption.preemptor.request.priority
            assert record.node == preemption.node and record.holds_slices and not record.terminating
            assert record.request.uid not in seen
            seen.add(record.request.uid)


@given(fleet=fleets())
def test_only_unschedulable_pods_of_migchains_scheduler_that_may_preempt_do(fleet):
    preemptors = [preemption.preemptor for preemption in planned(fleet)]
    assert len({p.request.uid for p in preemptors}) == len(preemptors)
    for preemptor in preemptors:
        assert preemptor.preemption_policy != "Never"
        assert preemptor.scheduler_name == SCHEDULER and preemptor.unschedulable and not preemptor.node


@given(fleet=fleets(max_pending=1))
def test_a_pod_that_fits_somewhere_exactly_or_by_a_borrow_preempts_nothing(fleet):
    snapshot, records = fleet
    [pending] = [r for r in records if not r.node]
    if any(isinstance(place(pending.request, node, name, RULES), Placement) for name, node in snapshot.nodes.items()):
        assert planned(fleet) == ()


@given(fleet=fleets(max_pending=1))
def test_the_pod_fits_once_its_victims_are_gone_and_every_victim_is_needed(fleet):
    snapshot, _ = fleet
    for preemption in planned(fleet):
        node = snapshot.nodes[preemption.node]
        freed = Counter(dict(node.free))
        for victim in preemption.victims:
            freed.update(dict(victim.record.request.mig))
        assert fits(preemption.preemptor.request, node, dict(freed))
        for victim in preemption.victims:
            spared = freed - Counter(dict(victim.record.request.mig))
            assert not fits(preemption.preemptor.request, node, dict(spared)), f"{victim.record.request.key} needless"


@given(fleet=fleets(max_pending=1))
def test_no_pod_that_fits_exactly_is_evicted_while_returning_borrowers_would_do(fleet):
    snapshot, records = fleet
    for preemption in planned(fleet):
        if not any(victim.fate == EVICTED for victim in preemption.victims):
            continue
        preemptor = preemption.preemptor.request
        for name, node in snapshot.nodes.items():
            freed = Counter(dict(node.free))
            for record in records:
                lower = record.request.priority < preemptor.priority
                if record.node == name and record.holds_slices and not record.terminating and lower and record.replaces:
                    freed.update(dict(record.request.mig))
            assert not fits(preemptor, node, dict(freed)), f"borrowers on {name} alone would make room"


@given(fleet=fleets())
def test_slices_given_to_preemptors_and_returned_borrowers_never_exceed_what_is_free_or_freed(fleet):
    snapshot, _ = fleet
    balance = {name: Counter(dict(node.free)) for name, node in snapshot.nodes.items()}
    for preemption in planned(fleet):
        for victim in preemption.victims:
            balance[preemption.node].update(dict(victim.record.request.mig))
        balance[preemption.node].subtract(dict(preemption.placement.slices))
        for victim in preemption.victims:
            if victim.fate == RETURNED:
                assert victim.loan is not None
                balance[victim.home].subtract(dict(victim.loan.original))
    for name, counts in balance.items():
        assert all(count >= 0 for count in counts.values()), (name, counts)


@given(fleet=fleets(), seed=st.integers(0, 1000))
def test_the_plan_does_not_depend_on_the_order_of_the_pods(fleet, seed):
    snapshot, records = fleet
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    again = plan_preemptions(snapshot, shuffled, RULES, schedulers=(SCHEDULER,))
    assert again == planned(fleet)


@given(fleet=fleets(), data=st.data())
def test_spared_pods_and_waiting_preemptors_are_left_alone(fleet, data):
    snapshot, records = fleet
    running_uids = sorted(r.request.uid for r in records if r.node)
    spared = data.draw(st.sets(st.sampled_from(running_uids), max_size=3)) if running_uids else set()
    keys = {r.request.key for r in records if not r.node}
    plans = plan_preemptions(snapshot, records, RULES, schedulers=(SCHEDULER,), spared=spared, waiting=keys)
    assert plans == ()
    for preemption in plan_preemptions(snapshot, records, RULES, schedulers=(SCHEDULER,), spared=spared):
        assert not {victim.record.request.uid for victim in preemption.victims} & spared


# -- scenarios ---------------------------------------------------------------------------


def test_the_issue_a_priority_1000000_pod_preempts_the_priority_10_holder_of_the_only_slice():
    holder = running("holder", "n0", G1, 10)
    urgent = waiting("urgent", ((G1, 1),), 1_000_000)
    [preemption] = plan({"n0": {G1: 1}}, [holder, urgent])
    assert preemption.node == "n0"
    assert [(v.record.request.name, v.fate) for v in preemption.victims] == [("holder", EVICTED)]
    assert "preempting 1 pod(s)" in preemption.describe()


@pytest.mark.parametrize(
    "change",
    [
        {"preemption_policy": "Never"},
        {"scheduler_name": "default-scheduler"},  # its own scheduler preempts for it
        {"unschedulable": False},  # not tried yet, or not found unschedulable
    ],
)
def test_no_preemption_for_a_pod_that_may_not_or_was_not_found_unschedulable(change):
    records = [running("holder", "n0", G1, 10), waiting("urgent", ((G1, 1),), 1_000_000, **change)]
    assert plan({"n0": {G1: 1}}, records) == ()


def test_no_preemption_of_equal_or_higher_priority():
    records = [running("holder", "n0", G1, 1000), waiting("urgent", ((G1, 1),), 1000)]
    assert plan({"n0": {G1: 1}}, records) == ()


def test_no_preemption_when_a_borrow_gives_a_slice_at_no_ones_expense():
    records = [running("holder", "n0", G1, 10), waiting("urgent", ((G1, 1),), 1_000_000)]
    assert plan({"n0": {G1: 1}, "n1": {G2: 1}}, records) == ()


def test_a_borrower_is_returned_rather_than_a_pod_that_fits_exactly_evicted():
    # Same priority, same node: the exact fit frees the slice asked for, the borrower only a larger one.
    exact = running("exact", "n0", G1, 10, second=30)
    borrower = running("borrower", "n0", G2, 10, asked=G1, second=1)
    [preemption] = plan({"n0": {G1: 1, G2: 1}}, [exact, borrower, waiting("urgent", ((G1, 1),), 1_000_000)])
    assert [(v.record.request.name, v.fate) for v in preemption.victims] == [("borrower", PENDING)]
    assert preemption.placement.borrows


def test_a_borrower_with_its_own_type_free_elsewhere_is_returned_there():
    # n1's free 1g.5gb is too small for the pod asking for a 2g.10gb, and just right for the borrower.
    borrower = running("borrower", "n0", G2, 10, asked=G1)
    [preemption] = plan({"n0": {G2: 1}, "n1": {G1: 1}}, [borrower, waiting("urgent", ((G2, 1),), 1_000_000)])
    [victim] = preemption.victims
    assert (victim.fate, victim.home) == (RETURNED, "n1")


def test_the_node_is_chosen_as_kube_scheduler_chooses_it_lowest_highest_priority_first():
    records = [
        running("mid", "n0", G1, 100),
        running("low-a", "n1", G1, 1),
        running("low-b", "n1", G1, 1),
        waiting("urgent", ((G1, 2),), 1_000_000),
    ]
    # n0 alone cannot hold two; n1 by evicting both low pods; n2 by evicting "mid2" and "low-c".
    records += [running("mid2", "n2", G1, 100), running("low-c", "n2", G1, 1)]
    [preemption] = plan({"n0": {G1: 1}, "n1": {G1: 2}, "n2": {G1: 2}}, records)
    assert preemption.node == "n1"
    assert sorted(v.record.request.name for v in preemption.victims) == ["low-a", "low-b"]


def test_on_a_node_the_lower_priority_pod_is_the_victim():
    records = [running("mid", "n0", G1, 100), running("low", "n0", G1, 1), waiting("urgent", ((G1, 1),), 1_000_000)]
    [preemption] = plan({"n0": {G1: 2}}, records)
    assert [v.record.request.name for v in preemption.victims] == ["low"]


def test_among_equals_the_latest_created_victims_node_is_chosen():
    records = [
        running("old", "n0", G1, 10, second=1),
        running("new", "n1", G1, 10, second=30),
        waiting("urgent", ((G1, 1),), 1_000_000),
    ]
    [preemption] = plan({"n0": {G1: 1}, "n1": {G1: 1}}, records)
    assert preemption.node == "n1"


def test_two_preemptors_never_count_one_victim_twice_and_the_higher_goes_first():
    records = [
        running("holder", "n0", G1, 10),
        waiting("first", ((G1, 1),), 500),
        waiting("second", ((G1, 1),), 1000),
    ]
    [preemption] = plan({"n0": {G1: 1}}, records)
    assert preemption.preemptor.request.name == "second"


def test_a_pdb_spared_victim_sends_the_preemption_to_another_node():
    records = [
        running("kept", "n0", G1, 10, second=30),
        running("free", "n1", G1, 10, second=1),
        waiting("urgent", ((G1, 1),), 1_000_000),
    ]
    [first] = plan({"n0": {G1: 1}, "n1": {G1: 1}}, records)
    assert first.node == "n0"
    [second] = plan({"n0": {G1: 1}, "n1": {G1: 1}}, records, spared={"uid-kept"})
    assert second.node == "n1"


def test_a_pod_waits_while_the_victims_of_its_last_preemption_leave_its_nominated_node():
    leaving = replace(running("holder", "n0", G1, 10), terminating=True)
    other = running("other", "n1", G1, 10)
    urgent = waiting("urgent", ((G1, 1),), 1_000_000, nominated="n0")
    assert plan({"n0": {G1: 1}, "n1": {G1: 1}}, [leaving, other, urgent]) == ()
    # Without the nomination it is a new preemption, and the leaving pod is no victim twice.
    [preemption] = plan({"n0": {G1: 1}, "n1": {G1: 1}}, [leaving, other, replace(urgent, nominated="")])
    assert [v.record.request.name for v in preemption.victims] == ["other"]


def test_a_pod_that_fits_takes_its_slices_before_a_lower_pod_looks_for_victims():
    records = [
        running("holder", "n0", G1, 0),
        waiting("fits", ((G1, 1),), 2000),  # takes n1's free slice
        waiting("urgent", ((G1, 1),), 1000),
    ]
    [preemption] = plan({"n0": {G1: 1}, "n1": {G1: 1}}, records)
    assert preemption.preemptor.request.name == "urgent" and preemption.node == "n0"


def test_kube_schedulers_candidate_budget():
    assert [candidates_to_find(n) for n in (1, 50, 100, 999, 1000, 5000)] == [1, 50, 100, 100, 100, 500]


# -- nominated pods ------------------------------------------------------------------------


def test_a_nominated_pod_keeps_the_slices_it_fits_on_its_node_from_pods_of_lower_or_equal_priority():
    node = NodeState("n0", A100, "success", {G1: 1, G2: 1}, {})
    snapshot = Snapshot.of([node])
    nominee = PodRequest("ns", "urgent", "uid-urgent", ((G1, 1),), priority=1000)
    nominated = {"uid-urgent": ("n0", nominee)}
    low = PodRequest("ns", "low", "uid-low", ((G1, 1),), priority=10)
    seen = yield_to_nominated(snapshot, low, nominated, RULES).nodes["n0"]
    assert seen.free == {G1: 0, G2: 1}
    assert node_after_nominated(node, low, nominated, RULES) == seen
    equal = replace(low, priority=1000)
    assert yield_to_nominated(snapshot, equal, nominated, RULES).nodes["n0"].free[G1] == 0
    higher = replace(low, priority=1001)
    assert yield_to_nominated(snapshot, higher, nominated, RULES) is snapshot
    assert yield_to_nominated(snapshot, nominee, nominated, RULES) is snapshot  # never against itself


def test_a_nomination_holds_only_what_its_pod_fits_now():
    node = NodeState("n0", A100, "success", {G1: 1, G2: 1}, {G1: 1})  # its victim still leaving the 1g.5gb
    nominee = PodRequest("ns", "urgent", "uid-urgent", ((G1, 1),), priority=1000, no_borrow="no")
    low = PodRequest("ns", "low", "uid-low", ((G2, 1),), priority=10)
    seen = node_after_nominated(node, low, {"uid-urgent": ("n0", nominee)}, RULES)
    assert seen is not None and seen.free == {G1: 0, G2: 1}


@given(
    free=st.dictionaries(st.sampled_from(TYPES), st.integers(0, 3)),
    nominees=st.lists(
        st.tuples(st.sampled_from(TYPES), st.sampled_from(PRIORITIES), st.sampled_from(("n0", "n1", "gone"))),
        max_size=4,
    ),
    priority=st.sampled_from(PRIORITIES),
)
def test_nominations_only_ever_take_slices_and_only_for_pods_of_lower_or_equal_priority(free, nominees, priority):
    snapshot = Snapshot.of(NodeState(name, A100, "success", dict(free), {}) for name in ("n0", "n1"))
    nominated = {
        f"uid-{i}": (node, PodRequest("ns", f"n{i}", f"uid-{i}", ((t, 1),), priority=p))
        for i, (t, p, node) in enumerate(nominees)
    }
    pod = PodRequest("ns", "pod", "uid-pod", ((G1, 1),), priority=priority)
    seen = yield_to_nominated(snapshot, pod, nominated, RULES)
    for name, node in snapshot.nodes.items():
        taken = Counter(dict(node.free))
        taken.subtract(dict(seen.nodes[name].free))
        assert all(count >= 0 for count in taken.values())
        if not any(node_name == name and p >= priority for _, p, node_name in nominees):
            assert seen.nodes[name].free == node.free


def test_a_round_plans_at_most_a_bounded_number_of_preemptions_highest_priority_first():
    nodes = {f"n{i:02d}": {G1: 1} for i in range(MAX_PREEMPTIONS_PER_ROUND + 4)}
    records = [running(f"holder-{name}", name, G1, 0) for name in nodes]
    records += [waiting(f"p{i:02d}", ((G1, 1),), 100 + i) for i in range(len(nodes))]
    plans = plan(nodes, records)
    assert len(plans) == MAX_PREEMPTIONS_PER_ROUND
    assert [p.preemptor.request.priority for p in plans] == sorted((100 + i for i in range(len(nodes))), reverse=True)[
        :MAX_PREEMPTIONS_PER_ROUND
    ]
