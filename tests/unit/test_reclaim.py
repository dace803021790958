"""Reclaims (issue 20): a pod waiting for its own type gets back a slice of it that a borrower holds, even when the
borrower's own type is not free; and the return order that throws away the least work."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extender.config import ConfigError, load_rules
from extender.core.cluster import NodeState, PodRequest, Snapshot
from extender.core.decide import Placement, place
from extender.core.returns import Borrower, borrowers_of, plan_returns
from extender.core.rules import DEFAULT_RECLAIM_AFTER_SECONDS, ReturnMode, ReturnOrder
from tests.strategies import A100
from tests.unit import planner_reference as reference
from tests.unit.test_returns import RULES, TYPES, fleets, record

G1, G2, G3 = TYPES
LAZY = {"migchain.io/chain": "lazy"}  # on-demand returns


def burst_took_every_larger_slice() -> tuple[Snapshot, list[Borrower]]:
    """A node carved all-balanced after a burst of 1g.5gb pods: two fit exactly, two borrowed the 2g.10gb and
    the 3g.20gb (the older one the 2g.10gb), and nothing is free."""
    node = NodeState("n0", A100, "success", {G1: 2, G2: 1, G3: 1}, {G1: 2, G2: 1, G3: 1})
    borrowers = borrowers_of(
        [
            record("on-2g", "n0", G1, G2, steps=1, created="2026-11-25T00:00:01Z", **LAZY),
            record("on-3g", "n0", G1, G3, steps=2, created="2026-11-25T00:00:02Z", **LAZY),
        ],
        RULES,
    )
    return Snapshot.of([node]), borrowers


def test_a_pod_waiting_for_its_own_type_takes_it_back_from_the_borrower_that_holds_it():
    snapshot, borrowers = burst_took_every_larger_slice()
    waiting = PodRequest("ns", "needs-2g", "uid-w", ((G2, 1),))
    [restore] = plan_returns(snapshot, borrowers, [waiting], RULES)
    assert (restore.borrower.key, restore.target, restore.unblocks) == ("ns/on-2g", "", "ns/needs-2g")
    assert "reclaimed" in restore.reason
    # Before reclaims, on-demand could not help it: the borrower's own 1g.5gb is not free anywhere.
    assert not any(plan.target for plan in plan_returns(snapshot, borrowers, [waiting], RULES))


def test_the_youngest_borrower_holding_the_type_goes_first():
    snapshot, borrowers = burst_took_every_larger_slice()
    waiting = PodRequest("ns", "needs-3g", "uid-w", ((G3, 1),))
    [restore] = plan_returns(snapshot, borrowers, [waiting], RULES)
    assert restore.borrower.key == "ns/on-3g"
    both = [PodRequest("ns", "a-needs-2g", "uid-a", ((G2, 1),)), PodRequest("ns", "b-needs-3g", "uid-b", ((G3, 1),))]
    plans = plan_returns(snapshot, borrowers, both, RULES)
    assert sorted((p.borrower.key, p.unblocks) for p in plans) == [
        ("ns/on-2g", "ns/a-needs-2g"),
        ("ns/on-3g", "ns/b-needs-3g"),
    ]


def test_no_reclaim_for_a_pod_that_would_only_borrow_nor_from_a_never_borrower():
    snapshot, borrowers = burst_took_every_larger_slice()
    # A 1g.5gb pod would only borrow the slice back: no restart for that.
    assert plan_returns(snapshot, borrowers, [PodRequest("ns", "small", "uid-s", ((G1, 1),))], RULES) == ()
    never = [dataclasses.replace(b, mode=ReturnMode.NEVER) for b in borrowers]
    assert plan_returns(snapshot, never, [PodRequest("ns", "needs-2g", "uid-w", ((G2, 1),))], RULES) == ()
    held = [dataclasses.replace(b, held_back="pod annotation migchain.io/return=false") for b in borrowers]
    assert plan_returns(snapshot, held, [PodRequest("ns", "needs-2g", "uid-w", ((G2, 1),))], RULES) == ()


def test_a_reclaim_waits_for_the_policys_reclaim_after_seconds():
    snapshot, borrowers = burst_took_every_larger_slice()
    patient = [dataclasses.replace(b, reclaim_after=300) for b in borrowers]
    waiting = PodRequest("ns", "needs-2g", "uid-w", ((G2, 1),))
    assert plan_returns(snapshot, patient, [waiting], RULES, waited={"ns/needs-2g": 299.0}) == ()
    [restore] = plan_returns(snapshot, patient, [waiting], RULES, waited={"ns/needs-2g": 300.0})
    assert restore.unblocks == "ns/needs-2g"


@given(fleet=fleets(), data=st.data())
def test_every_reclaim_lets_its_pod_fit_exactly_where_it_waited_and_only_after_its_limit(fleet, data):
    snapshot, borrowers, pending = fleet
    borrowers = [dataclasses.replace(b, reclaim_after=data.draw(st.sampled_from((0, 60, 600)))) for b in borrowers]
    waited = {pod.key: data.draw(st.sampled_from((0.0, 59.0, 60.0, 600.0))) for pod in pending}
    plans = plan_returns(snapshot, borrowers, pending, RULES, waited=waited)
    by_key = {pod.key: pod for pod in pending}
    assert len({p.borrower.key for p in plans}) == len(plans)  # no borrower twice
    assert len({p.unblocks for p in plans if p.unblocks}) == len([p for p in plans if p.unblocks])  # nor a pod
    for restore in (p for p in plans if not p.target):
        borrower, waiting = restore.borrower, by_key[restore.unblocks]
        assert not borrower.held_back and borrower.mode is not ReturnMode.NEVER
        assert waited[waiting.key] >= borrower.reclaim_after
        home = snapshot.nodes[borrower.record.node]
        given_back = dict(home.used)
        for resource, count in borrower.loan.borrowed:
            given_back[resource] -= count
        verdict = place(waiting, dataclasses.replace(home, used=given_back), home.name, RULES)
        assert isinstance(verdict, Placement) and not verdict.borrows  # its own type, no borrow: not for nothing
        if len(pending) == 1:
            assert not any(isinstance(place(waiting, n, name, RULES), Placement) for name, n in snapshot.nodes.items())


@given(fleet=fleets(), data=st.data())
def test_no_pod_waits_for_its_own_type_past_the_limit_while_a_borrower_holds_it(fleet, data):
    """Starvation: a lone pending pod blocked past the limit, where a movable borrower holds a slice of its type
    that it would fit exactly, is always served, by a return or a reclaim (or that borrower's eager return)."""
    snapshot, borrowers, _ = fleet
    limit = data.draw(st.sampled_from((0, 120)))
    borrowers = [dataclasses.replace(b, reclaim_after=limit) for b in borrowers]
    waiting = PodRequest("ns", "w", "uid-w", ((data.draw(st.sampled_from(TYPES)), 1),))
    if any(isinstance(place(waiting, node, name, RULES), Placement) for name, node in snapshot.nodes.items()):
        return  # it fits somewhere now: not blocked
    plans = plan_returns(snapshot, borrowers, [waiting], RULES, waited={"ns/w": float(limit)})
    could = []
    for b in borrowers:
        if b.held_back or b.mode is ReturnMode.NEVER:
            continue
        home = snapshot.nodes[b.record.node]
        given_back = dict(home.used)
        for resource, count in b.loan.borrowed:
            given_back[resource] -= count
        verdict = place(waiting, dataclasses.replace(home, used=given_back), home.name, RULES)
        if isinstance(verdict, Placement) and not verdict.borrows:
            could.append(b.key)
    if could:  # served: a return or reclaim for it, or an eager return of a borrower whose slice it fits
        assert any(p.unblocks == "ns/w" or p.borrower.key in could for p in plans)


@given(fleet=fleets(), data=st.data(), order=st.sampled_from(ReturnOrder))
def test_the_fast_planner_reclaims_exactly_as_the_plain_one(fleet, data, order):
    snapshot, borrowers, pending = fleet
    borrowers = [dataclasses.replace(b, reclaim_after=data.draw(st.sampled_from((0, 60)))) for b in borrowers]
    waited = {pod.key: data.draw(st.sampled_from((0.0, 60.0))) for pod in pending}
    fast = plan_returns(snapshot, borrowers, pending, RULES, order=order, waited=waited)
    assert fast == reference.plan_returns(snapshot, borrowers, pending, RULES, order=order, waited=waited)


def test_the_policy_reads_reclaim_after_seconds_and_names_a_bad_value(tmp_path):
    chain = (
        "apiVersion: migchain.io/v1alpha1\nkind: ChainRules\nchains:\n  - name: c\n"
        "    gpuProducts: [NVIDIA-A100-SXM4-40GB]\n    types: [nvidia.com/mig-1g.5gb, nvidia.com/mig-2g.10gb]\n"
    )
    good = tmp_path / "good.yaml"
    good.write_text(chain + "policy:\n  reclaimAfterSeconds: 120\n")
    assert load_rules([good]).chains[0].policy.reclaim_after_seconds == 120
    default = tmp_path / "default.yaml"
    default.write_text(chain)
    assert load_rules([default]).chains[0].policy.reclaim_after_seconds == DEFAULT_RECLAIM_AFTER_SECONDS == 120
    bad = tmp_path / "bad.yaml"
    bad.write_text(chain + "policy:\n  reclaimAfterSeconds: -5\n")
    with pytest.raises(ConfigError) as error:
        load_rules([bad])
    assert "bad.yaml" in str(error.value) and "policy.reclaimAfterSeconds" in str(error.value)
    assert "bad.yaml:8:" in str(error.value)  # the line
