"""Invariants of the return planner over generated fleets, borrowers and pending pods."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extender.core.cluster import NodeState, PodRecord, PodRequest, Snapshot
from extender.core.decide import Placement, place
from extender.core.loan import counts_text
from extender.core.returns import Borrower, borrowers_of, plan_returns
from extender.core.rules import Chain, ChainRules, NamespaceSelector, PodOptOuts, Policy, ReturnMode, ReturnOrder
from tests.strategies import A100


def at_once(mode: ReturnMode) -> Policy:
    """A policy that takes slices back at once and keeps none free: the planner's rules, alone."""
    return Policy(return_mode=mode, reclaim_after_seconds=0, headroom_seconds=0)


TYPES = ("nvidia.com/mig-1g.5gb", "nvidia.com/mig-2g.10gb", "nvidia.com/mig-3g.20gb")
RULES = ChainRules(
    [
        Chain("eager", frozenset({A100}), TYPES, at_once(ReturnMode.EAGER)),
        Chain("lazy", frozenset({A100}), TYPES, at_once(ReturnMode.ON_DEMAND)),
        Chain("stay", frozenset({A100}), TYPES, at_once(ReturnMode.NEVER)),
    ]
)
NODES = ("n0", "n1", "n2")


@st.composite
def fleets(draw: st.DrawFn) -> tuple[Snapshot, list[Borrower], list[PodRequest]]:
    """Nodes with some free slices, borrowers running on them, and pending pods."""
    allocatable = {name: {t: draw(st.integers(0, 3)) for t in TYPES} for name in NODES}
    used = {name: Counter[str]() for name in NODES}
    records = []
    for index in range(draw(st.integers(0, 6))):
        low = draw(st.integers(0, len(TYPES) - 2))
        high = draw(st.integers(low + 1, len(TYPES) - 1))
        node = draw(st.sampled_from(NODES))
        if used[node][TYPES[high]] >= allocatable[node][TYPES[high]]:
            continue  # no room on that node for this borrower
        used[node][TYPES[high]] += 1
        annotations = {
            "migchain.io/original-requests": counts_text(((TYPES[low], 1),)),
            "migchain.io/borrowed-requests": counts_text(((TYPES[high], 1),)),
            "migchain.io/chain": draw(st.sampled_from(("eager", "lazy", "stay"))),
            "migchain.io/steps": str(high - low),
            "migchain.io/replaced-uid": f"old-{index}",
            "migchain.io/restarts": str(draw(st.integers(0, 2))),
        }
        if draw(st.integers(0, 5)) == 0:
            annotations["migchain.io/return"] = "false"
        if draw(st.integers(0, 5)) == 0:
            annotations["migchain.io/max-restarts"] = "1"
        request = PodRequest("ns", f"b{index}", f"uid-b{index}", ((TYPES[high], 1),))
        created = f"2026-11-25T00:00:{draw(st.integers(10, 59))}Z"
        records.append(PodRecord(request, node, False, f"old-{index}", created=created, migchain=annotations))
    # other pods use what is left, often all of it (a full fleet is where returns matter)
    for name in NODES:
        for t in TYPES:
            left = allocatable[name][t] - used[name][t]
            used[name][t] += draw(st.sampled_from((left, left, *range(left + 1))))
    snapshot = Snapshot.of(NodeState(name, A100, "success", allocatable[name], dict(used[name])) for name in NODES)
    pending = [
        PodRequest("ns", f"p{index}", f"uid-p{index}", ((draw(st.sampled_from((*TYPES, *TYPES[1:]))), 1),))
        for index in range(draw(st.integers(0, 3)))
    ]
    return snapshot, borrowers_of(records, RULES), pending


def fits_anywhere(pod: PodRequest, snapshot: Snapshot) -> bool:
    return any(isinstance(place(pod, node, name, RULES), Placement) for name, node in snapshot.nodes.items())


@given(fleet=fleets())
def test_a_plan_never_restores_more_than_the_free_slices_hold(fleet):
    snapshot, borrowers, pending = fleet
    taken: dict[str, Counter[str]] = {name: Counter() for name in NODES}
    for restore in plan_returns(snapshot, borrowers, pending, RULES):
        if not restore.target:
            continue  # a reclaim: the borrower goes back to Pending, it takes no slice
        for resource, count in restore.borrower.loan.original:
            taken[restore.target][resource] += count
    for name, counts in taken.items():
        for resource, count in counts.items():
            assert count <= snapshot.nodes[name].free.get(resource, 0)


@given(fleet=fleets())
def test_on_demand_restores_each_unblock_a_distinct_pending_pod_that_fits_only_then(fleet):
    snapshot, borrowers, pending = fleet
    by_key = {pod.key: pod for pod in pending}
    unblocked = []
    for restore in plan_returns(snapshot, borrowers, pending, RULES):
        if restore.borrower.mode is not ReturnMode.ON_DEMAND or not restore.target:
            continue
        waiting = by_key[restore.unblocks]
        unblocked.append(restore.unblocks)
        if len(pending) == 1:  # with no rival for the free slices, "blocked" means it fits nowhere
            assert not fits_anywhere(waiting, snapshot)
        home = snapshot.nodes[restore.borrower.record.node]
        given_back = dict(home.used)
        for resource, count in restore.borrower.loan.borrowed:
            given_back[resource] -= count
        node = NodeState(home.name, home.gpu_product, home.mig_config_state, home.allocatable, given_back)
        assert isinstance(place(waiting, node, home.name, RULES), Placement)
    assert len(unblocked) == len(set(unblocked))  # one return per waiting pod


@given(fleet=fleets(), order=st.sampled_from(ReturnOrder))
def test_eager_restores_in_return_order_and_held_back_or_never_borrowers_stay(fleet, order):
    snapshot, borrowers, pending = fleet
    plans = plan_returns(snapshot, borrowers, pending, RULES, order=order)
    planned = {restore.borrower.key for restore in plans}
    for restore in plans:
        assert not restore.borrower.held_back
        assert restore.borrower.mode is not ReturnMode.NEVER
        if restore.borrower.mode is ReturnMode.EAGER and restore.target:
            for other in borrowers:
                if (
                    other.key not in planned
                    and other.mode is ReturnMode.EAGER
                    and not other.held_back
                    and other.loan.original == restore.borrower.loan.original
                ):
                    assert other.order(order) > restore.borrower.order(order)
                    if order is ReturnOrder.MOST_STEPS:
                        assert other.loan.steps <= restore.borrower.loan.steps
                    else:  # the youngest loan first: the least work thrown away
                        assert other.record.created <= restore.borrower.record.created


@given(fleet=fleets(), data=st.data())
def test_the_plan_does_not_depend_on_the_order_of_its_inputs(fleet, data):
    snapshot, borrowers, pending = fleet
    first = plan_returns(snapshot, borrowers, pending, RULES)
    again = plan_returns(snapshot, data.draw(st.permutations(borrowers)), data.draw(st.permutations(pending)), RULES)
    assert [(r.borrower.key, r.target, r.unblocks) for r in first] == [
        (r.borrower.key, r.target, r.unblocks) for r in again
    ]


def record(name: str, node: str, original: str, borrowed: str, *, steps: int, created: str, **extra: str) -> PodRecord:
    annotations = {
        "migchain.io/original-requests": f"{original}=1",
        "migchain.io/borrowed-requests": f"{borrowed}=1",
        "migchain.io/chain": "eager",
        "migchain.io/steps": str(steps),
        "migchain.io/replaced-uid": f"old-{name}",
        **extra,
    }
    return PodRecord(
        PodRequest("ns", name, f"uid-{name}", ((borrowed, 1),)), node, False, created=created, migchain=annotations
    )


def test_the_issue_scenario_eager_returns_the_3g_borrower_to_the_freed_1g():
    g1, g2, g3 = TYPES
    node = NodeState("n0", A100, "success", {g1: 1, g2: 1, g3: 1}, {g2: 1, g3: 1})  # the 1g.5gb just freed
    borrowers = borrowers_of(
        [
            record("on-2g", "n0", g1, g2, steps=1, created="2026-11-25T00:00:01Z"),
            record("on-3g", "n0", g1, g3, steps=2, created="2026-11-25T00:00:02Z"),
        ],
        RULES,
    )
    [restore] = plan_returns(Snapshot.of([node]), borrowers, [], RULES)
    assert (restore.borrower.key, restore.target) == ("ns/on-3g", "n0")


def test_by_default_the_youngest_loan_goes_first_and_by_most_steps_fewer_restarts_then_the_oldest():
    g1, g2, _ = TYPES
    node = NodeState("n0", A100, "success", {g1: 1, g2: 3}, {g2: 3})
    borrowers = borrowers_of(
        [
            record("young", "n0", g1, g2, steps=1, created="2026-11-25T00:00:09Z"),
            record("old", "n0", g1, g2, steps=1, created="2026-11-25T00:00:01Z", **{"migchain.io/restarts": "1"}),
            record("middle", "n0", g1, g2, steps=1, created="2026-11-25T00:00:05Z"),
        ],
        RULES,
    )
    [restore] = plan_returns(Snapshot.of([node]), borrowers, [], RULES)
    assert restore.borrower.key == "ns/young"  # least work lost: it has run the shortest
    [restore] = plan_returns(Snapshot.of([node]), borrowers, [], RULES, order=ReturnOrder.MOST_STEPS)
    assert restore.borrower.key == "ns/middle"


def test_a_free_slice_a_pending_pod_will_take_is_not_free_for_a_return():
    g1, g2, _ = TYPES
    node = NodeState("n0", A100, "success", {g1: 1, g2: 1}, {g2: 1})
    borrowers = borrowers_of([record("b", "n0", g1, g2, steps=1, created="t")], RULES)
    waiting = PodRequest("ns", "restored", "uid-r", ((g1, 1),))  # e.g. a pod a return just brought back
    assert plan_returns(Snapshot.of([node]), borrowers, [waiting], RULES) == ()
    assert plan_returns(Snapshot.of([node]), borrowers, [], RULES, claims=[("n0", ((g1, 1),))]) == ()
    assert len(plan_returns(Snapshot.of([node]), borrowers, [], RULES)) == 1


HONOURING = ChainRules(
    [
        Chain(
            "eager",
            frozenset({A100}),
            TYPES,
            Policy(
                return_mode=ReturnMode.EAGER,
                pod_opt_outs=PodOptOuts(
                    never_return=True, max_restarts=True, namespaces=NamespaceSelector(frozenset({"ns"}))
                ),
            ),
        )
    ]
)


def test_opt_out_and_restart_cap_hold_a_borrower_back_where_the_policy_honours_them():
    g1, g2, _ = TYPES
    capped = {"migchain.io/restarts": "2", "migchain.io/max-restarts": "2"}
    records = [
        record("pinned", "n0", g1, g2, steps=1, created="t", **{"migchain.io/return": "false"}),
        record("capped", "n0", g1, g2, steps=1, created="t", **capped),
    ]
    held = borrowers_of(records, HONOURING)
    assert [b.held_back for b in held] == [
        "pod annotation migchain.io/return=false",
        "restarted 2 time(s), migchain.io/max-restarts=2",
    ]
    node = NodeState("n0", A100, "success", {g1: 2, g2: 2}, {g2: 2})
    assert plan_returns(Snapshot.of([node]), held, [], HONOURING) == ()
    # In a namespace the policy's podOptOuts do not cover, and under a chain that honours none, they are moved.
    elsewhere = [dataclasses.replace(r, request=dataclasses.replace(r.request, namespace="other")) for r in records]
    assert [b.held_back for b in borrowers_of(elsewhere, HONOURING)] == ["", ""]
    assert [b.held_back for b in borrowers_of(records, RULES)] == ["", ""]


def test_tenant_opt_outs_do_not_hold_a_borrower_back_by_default():
    """`migchain.io/return: "false"` and `max-restarts` are written by the pod's owner: by default the chain's
    returnMode decides, not the pod (issue 17, finding 5)."""
    g1, g2, _ = TYPES
    opted_out = {"migchain.io/return": "false", "migchain.io/max-restarts": "0"}
    [borrower] = borrowers_of([record("b", "n0", g1, g2, steps=1, created="t", **opted_out)], RULES)
    assert borrower.held_back == ""
    node = NodeState("n0", A100, "success", {g1: 1, g2: 1}, {g2: 1})
    [restore] = plan_returns(Snapshot.of([node]), [borrower], [], RULES)
    assert restore.borrower.key == "ns/b"


@pytest.mark.parametrize("cap", ["\u00b2", "\u0663", "9" * 40, "-1", ""])
def test_a_restart_cap_that_is_no_ascii_number_caps_nothing_and_never_raises(cap):
    """A tenant writes max-restarts: "²" passes str.isdigit() and then int() refuses it."""
    g1, g2, _ = TYPES
    records = [record("odd", "n0", g1, g2, steps=1, created="t", **{"migchain.io/max-restarts": cap})]
    assert [b.held_back for b in borrowers_of(records, HONOURING)] == [""]
