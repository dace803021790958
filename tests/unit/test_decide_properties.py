"""Invariants of the decision core, over generated chains, policies, nodes and pods."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from extender.core.cluster import NodeState, PodRequest, Snapshot
from extender.core.decide import (
    MAX_SCORE,
    Placement,
    Rejection,
    filter_nodes,
    nodes_to_pass,
    place,
    score,
    score_nodes,
)
from extender.core.headroom import lending_rules
from extender.core.rules import ChainRules
from tests.strategies import chain_rules, nodes, pods, snapshots


def granted_counts(placement: Placement) -> dict[str, int]:
    return dict(placement.slices)


def assert_borrow_is_lawful(pod: PodRequest, node: NodeState, rules: ChainRules, placement: Placement) -> None:
    """Every borrowed grant follows some chain that covers the node's GPU and whose policy allows it."""
    for grant in placement.grants:
        if not grant.borrowed:
            assert grant.granted == grant.requested
            continue
        assert pod.may_borrow
        lawful = False
        for chain in rules.chains:
            if chain.name != grant.chain or node.gpu_product not in chain.gpu_products:
                continue
            if grant.requested in chain.types and grant.granted in chain.types:
                steps = chain.types.index(grant.granted) - chain.types.index(grant.requested)
                policy = chain.policy
                lawful = (
                    steps == grant.steps > 0
                    and policy.borrowing
                    and policy.namespaces.admits(pod.namespace)
                    and (policy.max_steps is None or steps <= policy.max_steps)
                    and (policy.allowed_types is None or grant.granted in policy.allowed_types)
                )
        assert lawful, f"{grant} is not allowed by any chain for {node.gpu_product}"


@given(rules=chain_rules(), snapshot=snapshots(), pod=pods())
def test_a_placement_never_takes_more_than_is_free_and_every_borrow_is_lawful(rules, snapshot, pod):
    for node in snapshot.nodes.values():
        verdict = place(pod, node, node.name, rules)
        if isinstance(verdict, Placement):
            assert node.offers_slices
            for granted, count in granted_counts(verdict).items():
                assert count <= node.free.get(granted, 0)
            assert sorted((g.requested, g.count) for g in verdict.grants) == list(pod.mig)
            assert_borrow_is_lawful(pod, node, rules, verdict)


@given(rules=chain_rules(), snapshot=snapshots(), pod=pods(), data=st.data())
def test_filter_splits_the_input_nodes_exactly(rules, snapshot, pod, data):
    names = data.draw(st.permutations([*snapshot.nodes, "not-in-cache"]))
    decision = filter_nodes(pod, names, snapshot, rules)
    passed, failed, unresolvable = set(decision.passed), set(decision.failed), set(decision.unresolvable)
    assert passed | failed | unresolvable <= set(names)
    # A name in no list fits, only more loosely than those that pass.
    for name in set(names) - passed - failed - unresolvable:
        assert isinstance(place(pod, snapshot.nodes[name], name, lending_rules(snapshot, rules)), Placement)
    assert not (passed & failed or passed & unresolvable or failed & unresolvable)
    assert list(decision.passed) == [name for name in names if name in passed]  # input order kept
    assert "not-in-cache" in failed
    assert all(reason for reason in (*decision.failed.values(), *decision.unresolvable.values()))


@given(rules=chain_rules(), snapshot=snapshots(), pod=pods(), keep=st.integers(0, 6), data=st.data())
def test_a_budget_passes_the_best_scored_of_the_nodes_that_would_pass_and_drops_no_reason(
    rules, snapshot, pod, keep, data
):
    names = data.draw(st.permutations(list(snapshot.nodes)))
    everyone = filter_nodes(pod, names, snapshot, rules)
    budgeted = filter_nodes(pod, names, snapshot, rules, keep)
    assert len(budgeted.passed) == min(keep, len(everyone.passed))
    assert set(budgeted.passed) <= set(everyone.passed)
    assert budgeted.failed == everyone.failed and budgeted.unresolvable == everyone.unresolvable
    scores = score_nodes(pod, names, snapshot, rules)
    left_out = set(everyone.passed) - set(budgeted.passed)
    assert all(scores[kept] >= scores[other] for kept in budgeted.passed for other in left_out)


@given(rules=chain_rules(), snapshot=snapshots(), pod=pods(), keep=st.none() | st.integers(1, 6), data=st.data())
def test_without_reasons_the_same_nodes_pass_and_the_reasons_come_exactly_when_none_does(
    rules, snapshot, pod, keep, data
):
    # kube-scheduler reads why nodes failed only when none passed (schedule_one.go: a FitError).
    names = data.draw(st.permutations([*snapshot.nodes, "not-in-cache"]))
    full = filter_nodes(pod, names, snapshot, rules, keep)
    lean = filter_nodes(pod, names, snapshot, rules, keep, reasons=False)
    assert lean.passed == full.passed
    if full.passed:
        assert not lean.failed and not lean.unresolvable
    else:
        assert lean.failed == full.failed and lean.unresolvable == full.unresolvable


def test_the_budget_is_kube_schedulers_default_number_of_nodes_to_score():
    # numFeasibleNodesToFind with percentageOfNodesToScore unset, worked by hand.
    assert [nodes_to_pass(size) for size in (0, 7, 99, 100, 250, 1000, 5000, 6000, 10000)] == [
        0, 7, 99, 100, 120, 420, 500, 300, 500,
    ]  # fmt: skip


@given(rules=chain_rules(), snapshot=snapshots(), pod=pods(), data=st.data())
def test_scores_cover_exactly_the_input_nodes_in_range_whatever_their_order(rules, snapshot, pod, data):
    names = list(snapshot.nodes)
    shuffled = data.draw(st.permutations(names))
    scores = score_nodes(pod, names, snapshot, rules)
    assert set(scores) == set(names)
    assert all(0 <= value <= MAX_SCORE for value in scores.values())
    assert score_nodes(pod, shuffled, snapshot, rules) == scores


@given(rules=chain_rules(), snapshot=snapshots(min_nodes=2), pod=pods())
def test_an_exact_fit_anywhere_means_only_exact_fits_pass_and_score_best(rules, snapshot, pod):
    verdicts = {name: place(pod, node, name, rules) for name, node in snapshot.nodes.items()}
    exact = {name for name, v in verdicts.items() if isinstance(v, Placement) and not v.borrows}
    decision = filter_nodes(pod, list(snapshot.nodes), snapshot, rules)
    scores = score_nodes(pod, list(snapshot.nodes), snapshot, rules)
    if exact:
        best = max(scores.values())
        assert set(decision.passed) == {name for name in exact if scores[name] == best}  # the tightest exact fits
        assert {name for name, value in scores.items() if value == best} <= exact
    elif decision.passed:
        cheapest = min(v.cost for v in verdicts.values() if isinstance(v, Placement))
        assert all(verdicts[name].cost == cheapest for name in decision.passed)  # type: ignore[union-attr]


@given(rules=chain_rules(), snapshot=snapshots(), pod=pods())
def test_the_same_input_always_gives_the_same_answer(rules, snapshot, pod):
    names = list(snapshot.nodes)
    first = filter_nodes(pod, names, snapshot, rules)
    again = filter_nodes(pod, names, snapshot, ChainRules(rules.chains))  # a fresh, unmemoised copy
    assert first == again
    assert score_nodes(pod, names, snapshot, rules) == score_nodes(pod, names, snapshot, ChainRules(rules.chains))


@given(rules=chain_rules(), node=nodes("node"), pod=pods(), extra=st.integers(1, 3), data=st.data())
def test_more_free_capacity_never_turns_a_fit_into_a_misfit_nor_raises_its_cost(rules, node, pod, extra, data):
    before = place(pod, node, node.name, rules)
    grown_type = data.draw(st.sampled_from(sorted(node.allocatable) or ["nvidia.com/mig-1g.5gb"]))
    allocatable = dict(node.allocatable)
    allocatable[grown_type] = allocatable.get(grown_type, 0) + extra
    after = place(pod, dataclasses.replace(node, allocatable=allocatable), node.name, rules)
    if isinstance(before, Placement):
        assert isinstance(after, Placement)
        assert after.cost <= before.cost


@given(rules=chain_rules(), node=nodes("node"), pod=pods())
def test_unresolvable_means_not_even_an_idle_node_would_fit(rules, node, pod):
    verdict = place(pod, node, node.name, rules)
    idle = place(pod, dataclasses.replace(node, used={}), node.name, rules)
    if isinstance(verdict, Rejection) and not verdict.resolvable:
        assert isinstance(idle, Rejection)
    if isinstance(verdict, Rejection) and node.offers_slices and isinstance(idle, Placement):
        assert verdict.resolvable


@given(rules=chain_rules(), first=nodes("first"), second=nodes("second"), pod=pods())
def test_fewer_steps_score_higher_and_among_equals_a_tighter_fit_never_scores_lower(rules, first, second, pod):
    a, b = place(pod, first, first.name, rules), place(pod, second, second.name, rules)
    if not (isinstance(a, Placement) and isinstance(b, Placement)):
        return
    if a.cost > b.cost:
        a, b = b, a
    if a.cost < b.cost and a.cost < 6:  # costs of 6 and more share the lowest band
        assert score(a) > score(b)
    if a.cost == b.cost and a.leftover <= b.leftover:
        assert score(a) >= score(b)
    if a.cost == 0 < b.cost:
        assert score(a) >= 8
        assert score(b) <= 7


class Cluster(RuleBasedStateMachine):
    """Pods arrive, bind where the core says, and complete; slices in use never exceed what nodes have."""

    @initialize(rules=chain_rules(), snapshot=snapshots(min_nodes=1, max_nodes=4))
    def start(self, rules: ChainRules, snapshot: Snapshot) -> None:
        self.chain_rules = rules
        # Start from idle nodes: the machine itself must produce every use.
        self.nodes = {name: dataclasses.replace(node, used={}) for name, node in snapshot.nodes.items()}
        self.bound: dict[str, tuple[str, Placement]] = {}
        self.arrivals = 0

    def snapshot(self) -> Snapshot:
        return Snapshot.of(self.nodes.values())

    @rule(pod=pods())
    def arrive_and_bind(self, pod: PodRequest) -> None:
        self.arrivals += 1
        pod = dataclasses.replace(pod, name=f"pod-{self.arrivals}")
        snapshot = self.snapshot()
        decision = filter_nodes(pod, list(snapshot.nodes), snapshot, self.chain_rules)
        if not decision.passed:
            return
        scores = score_nodes(pod, decision.passed, snapshot, self.chain_rules)
        chosen = max(decision.passed, key=lambda name: (scores[name], name))
        plan = place(pod, snapshot.nodes[chosen], chosen, self.chain_rules)  # what /bind recomputes
        assert isinstance(plan, Placement)
        node = self.nodes[chosen]
        used = dict(node.used)
        for granted, count in granted_counts(plan).items():
            used[granted] = used.get(granted, 0) + count
        self.nodes[chosen] = dataclasses.replace(node, used=used)
        self.bound[pod.name] = (chosen, plan)

    @precondition(lambda self: bool(self.bound))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.bound)))
        node_name, plan = self.bound.pop(name)
        node = self.nodes[node_name]
        used = dict(node.used)
        for granted, count in granted_counts(plan).items():
            used[granted] -= count
        self.nodes[node_name] = dataclasses.replace(node, used=used)

    @invariant()
    def never_more_slices_used_than_a_node_has(self) -> None:
        for node in getattr(self, "nodes", {}).values():
            for resource, count in node.used.items():
                assert 0 <= count <= node.allocatable.get(resource, 0), (node.name, resource)

    @invariant()
    def every_use_belongs_to_a_bound_pod(self) -> None:
        for node in getattr(self, "nodes", {}).values():
            expected: dict[str, int] = {}
            for node_name, plan in self.bound.values():
                if node_name == node.name:
                    for granted, count in granted_counts(plan).items():
                        expected[granted] = expected.get(granted, 0) + count
            assert {t: n for t, n in node.used.items() if n} == expected


TestCluster = Cluster.TestCase


@given(
    rules=chain_rules(),
    first=snapshots(),
    then=snapshots(),
    earlier=st.lists(pods(), max_size=3),
    pod=pods(),
    keep=st.none() | st.integers(0, 6),
)
def test_decisions_remembered_under_the_rules_are_those_fresh_rules_make_on_another_view(
    *, rules, first, then, earlier, pod, keep
):
    """Outcomes are remembered with the rules across requests, pods and views of the cluster, by what the
    decision reads of the pod and of the node: a pod decided after others, on another view, gets what rules
    that never decided anything give."""
    names = [*then.nodes, "not-in-cache"]
    for other in [*earlier, pod]:  # fill the memo
        filter_nodes(other, [*first.nodes, *names], first, rules, keep)
        score_nodes(other, list(first.nodes), first, rules)
    fresh = ChainRules(rules.chains)
    assert filter_nodes(pod, names, then, rules, keep) == filter_nodes(pod, names, then, fresh, keep)
    assert score_nodes(pod, names, then, rules) == score_nodes(pod, names, then, ChainRules(rules.chains))


@given(rules=chain_rules(), snapshot=snapshots(), pod=pods())
def test_each_named_node_is_decided_as_place_decides_it_alone(rules, snapshot, pod):
    """Filing names by signature changes no node's answer: each passes, fails or is unresolvable as place() says
    of it alone, and scores as score() says."""
    names = [*snapshot.nodes, "not-in-cache"]
    decision = filter_nodes(pod, names, snapshot, rules)
    scores = score_nodes(pod, names, snapshot, rules)
    view = lending_rules(snapshot, rules) if pod.may_borrow else rules
    verdicts = {name: place(pod, node, name, view) for name, node in snapshot.nodes.items()}
    cheapest = min((v.cost for v in verdicts.values() if isinstance(v, Placement)), default=0)
    best = max((score(v) for v in verdicts.values() if isinstance(v, Placement) and v.cost == cheapest), default=0)
    for name, verdict in verdicts.items():
        assert scores[name] == score(verdict)
        if isinstance(verdict, Rejection):
            assert name in (decision.unresolvable if not verdict.resolvable else decision.failed)
        elif verdict.cost > cheapest:
            assert name in decision.failed
        else:  # the tightest of the cheapest pass; looser ones are in neither list
            assert (name in decision.passed) == (score(verdict) == best)
            assert name not in decision.failed and name not in decision.unresolvable
    assert len(decision.passed) == len(set(decision.passed))
    assert scores["not-in-cache"] == 0
