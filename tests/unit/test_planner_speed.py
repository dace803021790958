"""The return planner's cost at fleet scale, and that its fast search decides exactly as the plain one.

The plain planner (tests/unit/planner_reference.py) tried every pending pod on
every node, CPU-only and full nodes included: 400 pending pods on 2,000 nodes
took seconds a round, and the returner runs a round on every change of the
cluster. The planner in extender/core/returns.py looks only at nodes with a
type the pod could use free, and decides alike pods and alike nodes once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extender.core import returns
from extender.core.cluster import MIGCHAIN_SCHEDULER, MigCounts, NodeState, PodRecord, PodRequest, Snapshot
from extender.core.constraints import ANYWHERE, NO_RULES, NodeConstraints, Taint, Toleration
from extender.core.decide import place
from extender.core.preempt import plan_preemptions
from extender.core.returns import blocked_pending, borrowers_of, pending_requests, plan_returns
from extender.core.rules import Chain, ChainRules, NamespaceSelector, Policy, ReturnMode
from tests.strategies import A100, H100, OFF_CHAIN, TYPES, chain_rules
from tests.unit import planner_reference as reference
from tests.unit import preempt_reference

G1, G2, G3 = "nvidia.com/mig-1g.5gb", "nvidia.com/mig-2g.10gb", "nvidia.com/mig-3g.20gb"
ZONE = "topology.kubernetes.io/zone"
GPU_TAINT = Taint("nvidia.com/gpu", "present", "NoSchedule")

# Placement rules pending pods and borrowers are drawn with: every node, untainted nodes, a zone, a tainted
# node's toleration, one that depends on other pods (never worth a return), and rules that could not be read.
CONSTRAINTS = (
    ANYWHERE,
    NO_RULES,
    NodeConstraints(selector=((ZONE, "a"),)),
    NodeConstraints(selector=((ZONE, "b"),), tolerations=(Toleration("nvidia.com/gpu", "Exists"),)),
    NodeConstraints(depends_on_pods="required pod anti-affinity"),
    NodeConstraints(unreadable="spec.affinity: expected an object"),
)


def loan(original: MigCounts, borrowed: MigCounts, chain: str, steps: int, **extra: str) -> dict[str, str]:
    return {
        "migchain.io/original-requests": ",".join(f"{r}={n}" for r, n in original),
        "migchain.io/borrowed-requests": ",".join(f"{r}={n}" for r, n in borrowed),
        "migchain.io/chain": chain,
        "migchain.io/steps": str(steps),
        "migchain.io/replaced-uid": "old",
        **extra,
    }


# -- the fast planner decides exactly as the plain one ------------------------------------------------------


MODES = st.sampled_from((ReturnMode.EAGER, ReturnMode.ON_DEMAND, ReturnMode.ON_DEMAND, ReturnMode.NEVER))


@st.composite
def any_rules(draw: st.DrawFn) -> tuple[ChainRules, tuple[str, ...]]:
    """Chains and the types the fleet is made of: mostly one realistic chain (1g, 2g, 3g on both GPU models,
    a shortcut chain beside it), sometimes chains drawn at random, each with a drawn return mode."""
    if draw(st.integers(0, 2)):
        policy = Policy(return_mode=draw(MODES), max_steps=draw(st.sampled_from((None, None, 1))))
        shortcut = Policy(return_mode=draw(MODES), namespaces=NamespaceSelector(exclude=frozenset({"team-a"})))
        rules = ChainRules(
            [
                Chain("small", frozenset({A100, H100}), (G1, G2, G3), policy),
                Chain("shortcut", frozenset({A100}), (G1, G3), shortcut),
            ]
        )
        return rules, (G1, G2, G3)
    drawn = draw(chain_rules())
    rules = ChainRules(
        dataclasses.replace(chain, policy=dataclasses.replace(chain.policy, return_mode=draw(MODES)))
        for chain in drawn.chains
    )
    return rules, TYPES


def counts_of(types: tuple[str, ...]) -> st.SearchStrategy[MigCounts]:
    """One or two types of `types` (or the type no chain names), one or two slices each; mostly one slice."""
    one = st.tuples(st.sampled_from((*types, *types, OFF_CHAIN)), st.sampled_from((1, 1, 1, 2)))
    return st.lists(one, min_size=1, max_size=2).map(lambda pairs: tuple(sorted(dict(pairs).items())))


# A loan that records no slices (its owner emptied the annotation), a claim on a type its node lost:
# decided as the plain planner decides them.
odd_counts = st.sampled_from(((), ((G1, 1),), ((OFF_CHAIN, 1),)))


@st.composite
def rounds(
    draw: st.DrawFn,
) -> tuple[Snapshot, list[PodRecord], list[PodRequest], ChainRules, list[tuple[str, MigCounts]]]:
    """A fleet (GPU nodes in a few layouts, mostly full; CPU-only, reconfiguring and tainted nodes),
    borrowers on it, pending pods in look-alike groups, claims (some on nodes or types gone)."""
    rules, types = draw(any_rules())
    chains = [chain.name for chain in rules.chains] + ["gone-chain"]
    counts = counts_of(types)
    layouts = [draw(st.dictionaries(st.sampled_from(types), st.integers(1, 3), min_size=1)) for _ in range(2)]
    nodes = []
    for index in range(draw(st.integers(1, 9))):
        cpu_only = draw(st.integers(0, 3)) == 0
        allocatable = {} if cpu_only else draw(st.sampled_from(layouts))
        # Mostly full; the smallest type frees most often, as short jobs on small slices end most often.
        used = {
            t: n - draw(st.sampled_from((0, 1, n) if t == types[0] else (0, 0, 0, 1, -1)))
            for t, n in allocatable.items()
        }
        nodes.append(
            NodeState(
                name=f"node-{draw(st.integers(0, 99)):02d}-{index}",
                gpu_product="" if cpu_only else draw(st.sampled_from((A100, A100, H100, ""))),
                mig_config_state=draw(st.sampled_from((None, "success", "success", "success", "pending"))),
                allocatable=allocatable,
                used=used,
                labels={ZONE: draw(st.sampled_from(("a", "b")))},
                taints=(GPU_TAINT,) if draw(st.integers(0, 4)) == 0 else (),
            )
        )
    snapshot = Snapshot.of(nodes)
    names = [node.name for node in nodes]
    records = []
    for index in range(draw(st.integers(0, 10))):
        low = draw(st.sampled_from((0, 0, *range(len(types) - 1))))
        original: MigCounts = ((types[low], 1),)
        borrowed: MigCounts = ((draw(st.sampled_from(types[low + 1 :])), 1),)
        if draw(st.integers(0, 7)) == 0:
            original, borrowed = draw(st.one_of(odd_counts, counts)), draw(counts)
        extra = {}
        if draw(st.integers(0, 6)) == 0:
            extra["migchain.io/return"] = "false"
        if draw(st.integers(0, 3)) == 0:
            extra["migchain.io/restarts"] = str(draw(st.integers(0, 3)))
        constraints = draw(st.sampled_from((NO_RULES, NO_RULES, *CONSTRAINTS)))
        request = PodRequest("ns", f"b{index}", f"uid-b{index}", borrowed, constraints=constraints)
        # Mostly on a node that has the type it holds (its slice counted among the node's used ones).
        homes = [node.name for node in nodes if all(t in node.allocatable for t, _ in borrowed)]
        if not homes or draw(st.integers(0, 4)) == 0:
            homes = [*names, "node-gone"]
        records.append(
            PodRecord(
                request,
                draw(st.sampled_from(homes)),
                False,
                created=f"2026-11-25T00:00:{draw(st.integers(10, 13))}Z",
                migchain=loan(original, borrowed, draw(st.sampled_from(chains)), draw(st.integers(0, 4)), **extra),
            )
        )
    # Pending pods come in workloads of alike pods (one template), as a ReplicaSet's do.
    templates = [
        (
            draw(st.one_of(st.just(((types[-1], 1),)), st.just(((types[-2], 1),)), counts)),
            draw(st.sampled_from(("", "", "pod annotation migchain.io/borrow=false"))),
            draw(st.sampled_from(("default", "default", "team-a", "kube-system"))),
            draw(st.sampled_from((NO_RULES, ANYWHERE, *CONSTRAINTS))),
        )
        for _ in range(draw(st.integers(1, 4)))
    ]
    pending = []
    for index in range(draw(st.integers(0, 12))):
        mig, no_borrow, namespace, constraints = draw(st.sampled_from(templates))
        name = f"p{draw(st.integers(0, 30)):02d}-{index}"
        pending.append(PodRequest(namespace, name, f"uid-{name}", mig, no_borrow, constraints))
    claims = [
        (draw(st.sampled_from([*names, "node-gone"])), draw(st.one_of(counts, odd_counts)))
        for _ in range(draw(st.integers(0, 3)))
    ]
    return snapshot, records, pending, rules, claims


@given(case=rounds())
@settings(max_examples=600)
def test_the_fast_planner_plans_exactly_what_the_plain_one_does(case):
    snapshot, records, pending, rules, claims = case
    borrowers = borrowers_of(records, rules)
    expected = reference.plan_returns(snapshot, borrowers, pending, rules, claims)
    assert plan_returns(snapshot, borrowers, pending, rules, claims) == expected
    assert blocked_pending(snapshot, pending, rules, claims) == reference.blocked_pending(
        snapshot, pending, rules, claims
    )


@st.composite
def preemption_rounds(draw: st.DrawFn) -> tuple[Snapshot, list[PodRecord], ChainRules, dict[str, Any]]:
    """Nodes in a few look-alike layouts, mostly full of running pods of mixed priorities (exact fits,
    borrowers, some leaving), pending pods in look-alike groups that may preempt, and a round's options."""
    rules, types = draw(any_rules())
    counts = counts_of(types)
    layouts = [draw(st.dictionaries(st.sampled_from(types), st.integers(1, 3), min_size=1)) for _ in range(2)]
    layouts.append({})  # CPU-only
    nodes, records = [], []
    for index in range(draw(st.integers(1, 8))):
        allocatable = draw(st.sampled_from(layouts))
        name = f"node-{index}"
        used: dict[str, int] = {}
        for resource, count in allocatable.items():
            for slot in range(draw(st.sampled_from((count, count, count, max(0, count - 1))))):
                pod = f"r-{index}-{resource[-6:]}-{slot}"
                smaller = types[: types.index(resource)] if resource in types else ()
                asked = draw(st.sampled_from(("", "", *smaller)))
                chain = draw(st.sampled_from([chain.name for chain in rules.chains]))
                annotations = loan(((asked, 1),), ((resource, 1),), chain, 1) if asked else {}
                priority = draw(st.sampled_from((0, 10, 100)))
                records.append(
                    PodRecord(
                        PodRequest("ns", pod, f"uid-{pod}", ((resource, 1),), priority=priority),
                        name,
                        False,
                        "old" if asked else "",
                        terminating=draw(st.integers(0, 7)) == 0,
                        created=f"2026-11-30T10:00:{draw(st.integers(0, 40)):02d}Z",
                        migchain=annotations,
                    )
                )
                used[resource] = used.get(resource, 0) + 1
        nodes.append(
            NodeState(
                name,
                draw(st.sampled_from((A100, A100, H100))) if allocatable else "",
                "success",
                allocatable,
                used,
                labels={ZONE: draw(st.sampled_from(("a", "b")))},
                taints=(GPU_TAINT,) if draw(st.integers(0, 5)) == 0 else (),
            )
        )
    names = [node.name for node in nodes]
    templates = [
        (
            draw(st.one_of(st.just(((types[-1], 1),)), counts)),
            draw(st.sampled_from((1000, 1000, 100, 0))),
            draw(st.sampled_from((NO_RULES, ANYWHERE, *CONSTRAINTS))),
        )
        for _ in range(draw(st.integers(1, 3)))
    ]
    for index in range(draw(st.integers(1, 8))):
        mig, priority, constraints = draw(st.sampled_from(templates))
        request = PodRequest("ns", f"p{index}", f"uid-p{index}", mig, constraints=constraints, priority=priority)
        records.append(
            PodRecord(
                request,
                "",
                False,
                created=f"2026-11-30T10:00:{draw(st.integers(41, 59)):02d}Z",
                scheduler_name=draw(st.sampled_from((MIGCHAIN_SCHEDULER, MIGCHAIN_SCHEDULER, "default-scheduler"))),
                preemption_policy=draw(st.sampled_from(("", "", "Never"))),
                nominated=draw(st.sampled_from(("", "", *names))),
                unschedulable=draw(st.sampled_from((True, True, False))),
            )
        )
    options: dict[str, Any] = {
        "schedulers": (MIGCHAIN_SCHEDULER,),
        "claims": [(draw(st.sampled_from(names)), draw(counts)) for _ in range(draw(st.integers(0, 2)))],
        "waiting": draw(st.frozensets(st.sampled_from([f"ns/p{i}" for i in range(8)]), max_size=2)),
        "spared": draw(st.frozensets(st.sampled_from([r.request.uid for r in records]), max_size=3)),
    }
    return Snapshot.of(nodes), records, rules, options


@given(case=preemption_rounds())
@settings(max_examples=600)
def test_the_fast_preemption_planner_plans_exactly_what_the_plain_one_does(case):
    snapshot, records, rules, options = case
    assert plan_preemptions(snapshot, records, rules, **options) == preempt_reference.plan_preemptions(
        snapshot, records, rules, **options
    )


# -- the cost of a round at fleet scale ----------------------------------------------------------------------


def fleet(
    gpu_nodes: int,
    cpu_nodes: int,
    *,
    free_every: int = 20,
    borrower_every: int = 7,
    pending: int = 400,
    full_nodes: int = 0,
) -> tuple[Snapshot, list[PodRecord]]:
    """8-GPU A100 nodes in the all-balanced layout (16x 1g.5gb, 8x 2g.10gb, 8x 3g.20gb), nearly full: every
    `free_every`-th has four 1g.5gb and a 2g.10gb free, every `borrower_every`-th holds a borrower of a 1g.5gb
    on a 3g.20gb; then `full_nodes` GPU nodes all taken and `cpu_nodes` CPU-only nodes; half of each in zone a.
    `pending` pods wait in workloads of ten: 1g.5gb, 2g.10gb or 3g.20gb, some bound to a zone, all found
    unschedulable, some of higher priority than the running pods (preemptors)."""
    allocatable = {G1: 16, G2: 8, G3: 8}
    nodes, records = [], []
    for index in range(gpu_nodes + full_nodes):
        name = f"gpu-{index:05d}"
        free = {G1: 4, G2: 1} if index < gpu_nodes and index % free_every == 0 else {}
        used = {resource: count - free.get(resource, 0) for resource, count in allocatable.items()}
        nodes.append(NodeState(name, A100, "success", allocatable, used, labels={ZONE: "ab"[index % 2]}))
        for slot, (resource, count) in enumerate(used.items()):
            request = PodRequest("ml", f"run-{index}-{slot}", f"uid-run-{index}-{slot}", ((resource, count),))
            records.append(PodRecord(request, name, False))
        if index < gpu_nodes and index % borrower_every == 0:
            request = PodRequest("ml", f"borrower-{index}", f"uid-borrower-{index}", ((G3, 1),))
            annotations = loan(((G1, 1),), ((G3, 1),), "a100-40gb", 3)
            records.append(PodRecord(request, name, False, created=f"t{index:05d}", migchain=annotations))
    nodes += [NodeState(f"cpu-{index:05d}", labels={ZONE: "ab"[index % 2]}) for index in range(cpu_nodes)]
    for index in range(pending):
        workload = index // 10
        resource = (G3, G1, G3, G2)[workload % 4]
        constraints = NodeConstraints(selector=((ZONE, "a"),)) if workload % 3 == 1 else NO_RULES
        request = PodRequest(
            "ml",
            f"wait-{index:04d}",
            f"uid-wait-{index}",
            ((resource, 1),),
            constraints=constraints,
            priority=workload % 5,
        )
        records.append(PodRecord(request, "", False, scheduler_name=MIGCHAIN_SCHEDULER, unschedulable=True))
    return Snapshot.of(nodes), records


@pytest.fixture()
def placements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The nodes the return planner asks `place` about, one entry a call."""
    asked: list[str] = []
    real: Callable[..., Any] = place

    def counted(pod: PodRequest, node: NodeState | None, name: str, rules: ChainRules) -> Any:
        asked.append(name)
        return real(pod, node, name, rules)

    monkeypatch.setattr(returns, "place", counted)
    return asked


def test_full_and_cpu_only_nodes_cost_the_planner_nothing(placements):
    from tests.unit.objects import RULES

    def round_on(snapshot: Snapshot, records: list[PodRecord]) -> tuple[Any, int]:
        placements.clear()
        plans = plan_returns(snapshot, borrowers_of(records, RULES), pending_requests(records), RULES)
        return [(p.borrower.key, p.target, p.unblocks) for p in plans], len(placements)

    small_plan, small_cost = round_on(*fleet(40, 0, free_every=5, pending=100))
    # The same fleet with 1,500 full GPU nodes (no borrowers) and 1,500 CPU-only nodes beside it.
    large_plan, large_cost = round_on(*fleet(40, 1_500, free_every=5, pending=100, full_nodes=1_500))
    assert large_plan == small_plan and small_plan  # the same returns, made on the 40 nodes that matter
    assert not [name for name in placements if name.startswith("cpu-")]
    assert large_cost == small_cost, f"{large_cost} placements tried on the large fleet, {small_cost} on the small"


def test_a_round_at_400_pending_pods_and_2000_nodes_half_cpu_only_is_fast():
    """The returner's round (bench/planner.py measures it): under 100 ms on a 2-core VM; a wide margin here."""
    from tests.unit.objects import RULES

    snapshot, records = fleet(1_000, 1_000)
    times, plans = [], None
    for _ in range(3):
        start = time.perf_counter()
        borrowers = borrowers_of(records, RULES)
        restores = plan_returns(snapshot, borrowers, pending_requests(records), RULES)
        preemptions = plan_preemptions(snapshot, records, RULES, schedulers=(MIGCHAIN_SCHEDULER,))
        times.append(time.perf_counter() - start)
        plans = (len(restores), len(preemptions))
    assert plans is not None and plans[0] > 0
    assert min(times) < 1.0, f"a round took {min(times):.2f} s at best"


@pytest.mark.parametrize("free_every", [1, 3, 10])
def test_the_fast_planners_agree_with_the_plain_ones_on_a_busy_fleet(free_every):
    """Thousands of alike nodes and pods, where the memos and the index are used hardest."""
    from tests.unit.objects import RULES

    snapshot, records = fleet(120, 60, free_every=free_every, borrower_every=2, pending=150, full_nodes=60)
    borrowers, pending = borrowers_of(records, RULES), pending_requests(records)
    restores = plan_returns(snapshot, borrowers, pending, RULES)
    assert restores == reference.plan_returns(snapshot, borrowers, pending, RULES)
    claims = [(r.target, r.borrower.loan.original) for r in restores]
    options: dict[str, Any] = {"schedulers": (MIGCHAIN_SCHEDULER,), "claims": claims}
    assert plan_preemptions(snapshot, records, RULES, **options) == preempt_reference.plan_preemptions(
        snapshot, records, RULES, **options
    )
