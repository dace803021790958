"""Headroom (issue 20): a type is lent only while more of its slices are free than its own pods asked for lately."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extender.config import ConfigError, load_rules
from extender.core.cluster import (
    DEMAND_BUCKET_SECONDS,
    Demand,
    NodeState,
    PodRequest,
    Snapshot,
    demand_bucket,
    fleet_slices,
    pod_record,
)
from extender.core.decide import Placement, filter_nodes, place
from extender.core.headroom import kept_free as kept_pairs
from extender.core.headroom import lending_rules
from extender.core.rules import DEFAULT_HEADROOM_SECONDS, ChainRules
from extender.ledger import Ledger
from extender.sim.engine import Job, SimPolicy, simulate
from tests.unit.objects import A100, G1, G2, G3, borrower, pod

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = load_rules([ROOT / "chains" / "a100-40gb.yaml"])  # headroomSeconds and reclaimAfterSeconds as shipped
NOW = 1_800_000_000.0


def rules_with(headroom: int, reclaim_after: int = 0) -> ChainRules:
    return ChainRules(
        dataclasses.replace(
            chain,
            policy=dataclasses.replace(chain.policy, headroom_seconds=headroom, reclaim_after_seconds=reclaim_after),
        )
        for chain in SHIPPED.chains
    )


def kept_free(view: Snapshot, rules: ChainRules) -> frozenset[str]:
    """The types kept free, on the one chain of the shipped file."""
    pairs = kept_pairs(view, rules)
    assert {chain for chain, _ in pairs} <= {"a100-40gb"}
    return frozenset(resource for _, resource in pairs)


def state(name: str, free: dict[str, int], used: dict[str, int] | None = None) -> NodeState:
    used = used or {}
    allocatable = {t: free.get(t, 0) + used.get(t, 0) for t in {*free, *used}}
    return NodeState(name, A100, "success", allocatable, used)


def asked(*seconds_ago_type_count: tuple[float, str, int]) -> Demand:
    slices: dict[tuple[int, str], int] = {}
    for ago, resource, count in seconds_ago_type_count:
        key = (demand_bucket(NOW - ago), resource)
        slices[key] = slices.get(key, 0) + count
    return Demand(NOW, slices)


def test_the_shipped_policy_keeps_headroom_by_default():
    assert all(chain.policy.headroom_seconds == DEFAULT_HEADROOM_SECONDS == 300 for chain in SHIPPED.chains)


def test_a_type_its_own_pods_asked_for_lately_is_not_lent_down_to_its_last_free_slices():
    # n0: 1g full, one 2g and one 3g free. Fleet-wide 2 of 4 2g slices are free, and 2g pods asked for 2 of
    # them within the last 300 s: a 1g pod borrows the 3g, not the 2g, leaving both 2g for those that come next.
    nodes = [state("n0", {G2: 1, G3: 1}, {G1: 2}), state("n1", {G2: 1}, {G2: 2})]
    waiting = PodRequest("ml", "small", "uid-small", ((G1, 1),))
    rules = rules_with(300)
    busy = Snapshot({n.name: n for n in nodes}, demand=asked((30, G2, 1), (250, G2, 1)))
    assert kept_free(busy, rules) == {G2}
    verdict = place(waiting, nodes[0], "n0", lending_rules(busy, rules))
    assert isinstance(verdict, Placement) and verdict.slices == ((G3, 1),)
    refused = filter_nodes(PodRequest("ml", "s2", "uid-s2", ((G1, 1),)), ["n1"], busy, rules)
    reasons = {**refused.failed, **refused.unresolvable}
    assert "2g.10gb is kept free for the pods that ask for it (headroomSeconds 300" in reasons["n1"]
    # Once those arrivals are older than the window, the 2g is lent again (the cheaper borrow).
    later = dataclasses.replace(busy, demand=dataclasses.replace(busy.demand, at=NOW + 300 + DEMAND_BUCKET_SECONDS))
    assert kept_free(later, rules) == frozenset()
    verdict = place(waiting, nodes[0], "n0", lending_rules(later, rules))
    assert isinstance(verdict, Placement) and verdict.slices == ((G2, 1),)
    # headroomSeconds 0 lends every free slice, as before.
    assert kept_free(busy, rules_with(0)) == frozenset()


def test_no_more_than_half_a_type_is_kept_free_whatever_its_pods_asked_for():
    nodes = [state("n0", {G2: 3}, {G2: 1})]  # 3 of 4 free
    flood = Snapshot({"n0": nodes[0]}, demand=asked((10, G2, 1000)))
    assert kept_free(flood, rules_with(300)) == frozenset()  # 3 free > half of 4
    two_free = Snapshot({"n0": state("n0", {G2: 2}, {G2: 2})}, demand=asked((10, G2, 1000)))
    assert kept_free(two_free, rules_with(300)) == {G2}


@st.composite
def views(draw: st.DrawFn) -> Snapshot:
    nodes = {}
    for index in range(draw(st.integers(1, 4))):
        free = {t: draw(st.integers(0, 3)) for t in (G1, G2, G3)}
        used = {t: draw(st.integers(0, 3)) for t in (G1, G2, G3)}
        nodes[f"n{index}"] = state(f"n{index}", free, used)
    arrivals = draw(st.lists(st.tuples(st.floats(0, 900), st.sampled_from((G1, G2, G3)), st.integers(1, 4))))
    return Snapshot(nodes, demand=asked(*arrivals))


@given(view=views(), headroom=st.sampled_from((0, 60, 300, 900)), want=st.sampled_from((G1, G2, G3)))
def test_headroom_never_keeps_more_than_half_a_type_and_never_changes_an_exact_fit(view, headroom, want):
    rules = rules_with(headroom)
    kept = kept_free(view, rules)
    fleet = fleet_slices(view.nodes.values())
    for resource in kept:
        free, allocatable = fleet[resource]
        assert 0 < free <= allocatable // 2
        assert free <= view.demand.since(headroom).get(resource, 0)
    assert kept == kept_free(Snapshot(dict(view.nodes), demand=view.demand), rules)  # decided alike every time
    pod = PodRequest("ml", "p", "uid-p", ((want, 1),))
    for name, each in view.nodes.items():
        plain, lending = place(pod, each, name, rules), place(pod, each, name, lending_rules(view, rules))
        if isinstance(plain, Placement) and not plain.borrows:
            assert lending == plain  # a pod that asks for a type takes any free slice of it
        if isinstance(lending, Placement):
            assert not set(dict(lending.slices)) & (kept - {want})  # nothing kept free is lent
            assert each.free.get(lending.slices[0][0], 0) >= 1  # and never more than the node has


def test_a_steady_stream_of_large_pods_finds_its_slice_free_instead_of_taking_it_back():
    # Two nodes of one 1g, one 2g, one 3g. 3g pods arrive every 100 s and run 150 s; 1g pods keep coming.
    # Without headroom 1g pods borrow the 3g slices between two 3g pods and the next ones take them back
    # (restarts); with it, a 3g stays free for them and the extra 1g pods wait for a 1g or borrow a 2g.
    nodes = [NodeState(f"n{i}", A100, "success", {G1: 1, G2: 1, G3: 1}, {}) for i in range(2)]
    jobs = [Job(f"large-{i}", 100.0 * i, ((G3, 1),), 150) for i in range(10)]
    jobs += [Job(f"small-{i}", 5.0 + 50.0 * i, ((G1, 1),), 300) for i in range(20)]
    plain = simulate(nodes, rules_with(0), jobs, SimPolicy.ON_DEMAND, horizon=1500)
    kept = simulate(nodes, rules_with(300), jobs, SimPolicy.ON_DEMAND, horizon=1500)
    assert plain.restarts > 0
    assert kept.restarts == 0
    assert kept.mean_pending_by_type_s[G3] <= plain.mean_pending_by_type_s[G3]


def test_the_policy_reads_headroom_seconds_and_names_a_bad_value(tmp_path):
    chain = (
        "apiVersion: migchain.io/v1alpha1\nkind: ChainRules\nchains:\n  - name: c\n"
        "    gpuProducts: [NVIDIA-A100-SXM4-40GB]\n    types: [nvidia.com/mig-1g.5gb, nvidia.com/mig-2g.10gb]\n"
    )
    good = tmp_path / "good.yaml"
    good.write_text(chain + "policy:\n  headroomSeconds: 0\n")
    assert load_rules([good]).chains[0].policy.headroom_seconds == 0
    for value in ("-1", "3601", "soon"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(chain + f"policy:\n  headroomSeconds: {value}\n")
        with pytest.raises(ConfigError) as error:
            load_rules([bad])
        assert "bad.yaml:8:" in str(error.value) and "policy.headroomSeconds" in str(error.value)


def rfc3339(second: float) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_the_ledger_counts_a_borrower_as_the_type_it_asked_for_and_forgets_a_pod_once_deleted():
    now = datetime.now(UTC).timestamp()
    ledger = Ledger()
    ledger.replace_nodes([])
    loan = pod_record(borrower("b", {G1: 1}, "n0", {G2: 1}, created=rfc3339(now - 20)))
    exact = pod_record(pod("x", {G3: 1}, "n0", created=rfc3339(now - 40)))
    gated = pod("g", {G3: 4}, created=rfc3339(now - 5))
    gated["spec"]["schedulingGates"] = [{"name": "example.com/later"}]
    old = pod_record(pod("o", {G3: 2}, created=rfc3339(now - 4000)))
    for record in (loan, exact, pod_record(gated), old):
        ledger.put_pod(record)
    assert ledger.snapshot(now).demand.since(300) == {G1: 1, G3: 1}  # the loan's own type, not the 2g lent
    assert ledger.snapshot(now).demand.since(30) == {G1: 1}
    ledger.remove_pod(exact.request.uid)
    assert ledger.snapshot(now).demand.since(300) == {G1: 1}
    assert ledger.snapshot(now + 400).demand.since(300) == {}


def test_a_chain_with_no_headroom_lends_what_another_chain_keeps_free():
    other = "TEST-EAGER-GPU"
    plain = ChainRules(
        [
            *rules_with(300).chains,
            dataclasses.replace(
                rules_with(0).chains[0], name="eager", gpu_products=frozenset({other}), types=(G1, G2, G3)
            ),
        ]
    )
    nodes = {
        "a": state("a", {G2: 1}, {G1: 1, G2: 1}),
        "b": NodeState("b", other, "success", {G1: 1, G2: 3}, {G1: 1, G2: 2}),
    }
    view = Snapshot(nodes, demand=asked((10, G2, 5)))  # 2 of 5 2g.10gb free, fleet-wide: both kept
    assert kept_pairs(view, plain) == {("a100-40gb", G2)}
    small = PodRequest("ml", "s", "uid-s", ((G1, 1),))
    assert not isinstance(place(small, nodes["a"], "a", lending_rules(view, plain)), Placement)
    lent = place(small, nodes["b"], "b", lending_rules(view, plain))
    assert isinstance(lent, Placement) and lent.slices == ((G2, 1),)
