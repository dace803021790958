"""Scenario table for the decision core, on the shipped A100-40GB chain file."""

from __future__ import annotations

from pathlib import Path

import pytest

from extender.config import load_rules
from extender.core.cluster import NodeState, PodRequest, Snapshot
from extender.core.decide import Placement, Rejection, filter_nodes, place, score, score_nodes
from extender.core.rules import Chain, ChainRules, Policy

ROOT = Path(__file__).resolve().parents[2]
A100 = "NVIDIA-A100-SXM4-40GB"
H100 = "NVIDIA-H100-80GB-HBM3"
G1 = "nvidia.com/mig-1g.5gb"
G1_10 = "nvidia.com/mig-1g.10gb"
G1_ME = "nvidia.com/mig-1g.5gb.me"  # on no chain
G2 = "nvidia.com/mig-2g.10gb"
G3 = "nvidia.com/mig-3g.20gb"
G4 = "nvidia.com/mig-4g.20gb"


@pytest.fixture(scope="module")
def a100_rules() -> ChainRules:
    # allowedTypes 1g.10gb..4g.20gb, maxSteps 3, kube-system excluded
    return load_rules([ROOT / "chains" / "a100-40gb.yaml"])


def pod(*mig: tuple[str, int], namespace: str = "default", opt_out: bool = False) -> PodRequest:
    return PodRequest(
        namespace, "p", "uid", tuple(sorted(mig)), "pod annotation migchain.io/borrow=false" if opt_out else ""
    )


def node(free: dict[str, int] | None = None, product: str = A100, state: str | None = "success") -> NodeState:
    """An idle node offering `free` slices, keyed by short profile names (`"1g.5gb": 2`)."""
    allocatable = {f"nvidia.com/mig-{profile}": count for profile, count in (free or {}).items()}
    return NodeState("n", product, state, allocatable, {})


def grants(verdict: object) -> list[tuple[str, str, int, int]]:
    assert isinstance(verdict, Placement), verdict
    return [(g.requested, g.granted, g.count, g.steps) for g in verdict.grants]


@pytest.mark.parametrize(
    ("request_", "offer", "expected"),
    [
        pytest.param(pod((G1, 1)), {"1g.5gb": 1, "2g.10gb": 1}, [(G1, G1, 1, 0)], id="exact-fit-preferred"),
        pytest.param(pod((G1, 1)), {"2g.10gb": 1}, [(G1, G2, 1, 2)], id="borrow-two-steps-up"),
        pytest.param(pod((G1, 1)), {"1g.10gb": 1, "3g.20gb": 1}, [(G1, G1_10, 1, 1)], id="fewest-steps-wins"),
        pytest.param(pod((G1, 2)), {"1g.5gb": 1, "2g.10gb": 2}, [(G1, G2, 2, 2)], id="count-all-or-nothing"),
        pytest.param(pod((G2, 1)), {"4g.20gb": 1}, [(G2, G4, 1, 2)], id="borrow-4g"),
        pytest.param(
            pod((G1, 1), (G2, 1)), {"2g.10gb": 1, "3g.20gb": 1}, [(G1, G2, 1, 2), (G2, G3, 1, 1)], id="two-types"
        ),
    ],
)
def test_placement(a100_rules, request_, offer, expected):
    n = node(offer)
    assert grants(place(request_, n, n.name, a100_rules)) == expected


@pytest.mark.parametrize(
    ("request_", "the_node", "reason_part", "resolvable"),
    [
        pytest.param(pod((G3, 1)), node({"7g.40gb": 1}), "7g.40gb is not in allowedTypes", False, id="allowed-types"),
        pytest.param(pod((G1, 1)), node({"4g.20gb": 1}), "4 steps exceed maxSteps 3", False, id="max-steps"),
        pytest.param(pod((G1, 1), opt_out=True), node({"2g.10gb": 1}), "borrowing off", False, id="opt-out"),
        pytest.param(pod((G1, 1), namespace="kube-system"), node({"2g.10gb": 1}), "kube-system", False, id="ns"),
        pytest.param(pod((G1, 1)), node({"2g.10gb": 1}, product=H100), "no chain for it on GPU model", False, id="gpu"),
        pytest.param(pod((G1, 1)), node({"1g.5gb": 1}, state="pending"), "being reconfigured", True, id="reconfig"),
        pytest.param(pod((G1_ME, 1)), node({"2g.10gb": 1}), "no chain for it", False, id="off-chain"),
    ],
)
def test_rejection(a100_rules, request_, the_node, reason_part, resolvable):
    verdict = place(request_, the_node, the_node.name, a100_rules)
    assert isinstance(verdict, Rejection)
    assert reason_part in verdict.reason
    assert verdict.resolvable is resolvable


def node_with(name: str, allocatable: dict[str, int], used: dict[str, int]) -> NodeState:
    return NodeState(name, A100, "success", allocatable, used)


def test_a_busy_slice_is_not_free_and_the_reason_counts_it(a100_rules):
    n = node_with("n", {G1: 2}, {G1: 2})
    verdict = place(pod((G1, 1)), n, "n", a100_rules)
    assert isinstance(verdict, Rejection)
    assert verdict.resolvable
    assert verdict.reason.startswith("no free 1g.5gb (larger: 1g.10gb none free")


def test_filter_keeps_only_the_cheapest_fits_and_says_why_the_others_fail(a100_rules):
    snapshot = Snapshot.of(
        [
            node_with("exact", {G1: 1}, {}),
            node_with("borrow", {G2: 1}, {}),
            node_with("full", {G1: 1}, {G1: 1}),
            node_with("none", {}, {}),
        ]
    )
    decision = filter_nodes(pod((G1, 1)), ["borrow", "exact", "full", "none", "ghost"], snapshot, a100_rules)
    assert decision.passed == ("exact",)
    assert "1 other node(s) offer an exact fit" in decision.failed["borrow"]
    assert "no free 1g.5gb" in decision.failed["full"]
    assert "not in migchain's cluster cache" in decision.failed["ghost"]
    assert set(decision.unresolvable) == {"none"}
    assert decision.unresolvable["none"].startswith("no 1g.5gb on this node")


def test_when_nothing_fits_exactly_the_fewest_step_borrowers_pass(a100_rules):
    snapshot = Snapshot.of([node_with("two", {G2: 1}, {}), node_with("one", {G1_10: 1}, {})])
    assert filter_nodes(pod((G1, 1)), ["two", "one"], snapshot, a100_rules).passed == ("one",)


def test_scores_rank_exact_then_steps_then_best_fit(a100_rules):
    snapshot = Snapshot.of(
        [
            node_with("exact-tight", {G1: 1}, {}),
            node_with("exact-loose", {G1: 7}, {}),
            node_with("one-step", {G1_10: 1}, {}),
            node_with("two-steps", {G2: 3}, {}),
        ]
    )
    scores = score_nodes(pod((G1, 1)), list(snapshot.nodes), snapshot, a100_rules)
    assert scores == {"exact-tight": 10, "exact-loose": 8, "one-step": 7, "two-steps": 4}


def test_a_type_on_two_chains_counts_once_at_its_fewest_allowed_steps():
    long_chain = Chain("long", frozenset({A100}), (G1, G1_10, G2, G3))
    short_chain = Chain("short", frozenset({A100}), (G1, G3))
    closed = Chain("closed", frozenset({A100}), (G1, G2), Policy(borrowing=False))
    rules = ChainRules([long_chain, short_chain, closed])
    options = rules.borrow_options(G1, A100, "default")
    # 2g.10gb: 1 step on "closed" is denied, so the allowed 2 steps on "long" stand.
    # Equal steps: the smaller type first, keeping large slices for pods that need them.
    assert [(o.granted, o.steps, o.chain, o.allowed) for o in options] == [
        (G1_10, 1, "long", True),
        (G3, 1, "short", True),
        (G2, 2, "long", True),
    ]


def test_a_pod_without_mig_requests_fits_everywhere(a100_rules):
    verdict = place(pod(), node(), "n", a100_rules)
    assert isinstance(verdict, Placement)
    assert verdict.grants == ()
    assert score(verdict) == 10


def test_a_decision_remembered_for_one_pod_is_not_given_to_a_pod_the_policy_reads_otherwise():
    """The outcome memo is keyed by all a decision reads of a pod: kube-system may not borrow under the shipped
    A100 chain, so its pod must not get the borrow remembered for a pod alike in another namespace."""
    rules = load_rules([ROOT / "chains" / "a100-40gb.yaml"])
    node = NodeState("n", "NVIDIA-A100-SXM4-40GB", "success", {"nvidia.com/mig-2g.10gb": 1})
    snapshot = Snapshot.of([node])
    for namespace, passes in (("team", ("n",)), ("kube-system", ()), ("team", ("n",))):
        pod = PodRequest(namespace, "p", namespace, (("nvidia.com/mig-1g.5gb", 1),))
        assert filter_nodes(pod, ["n"], snapshot, rules).passed == passes
