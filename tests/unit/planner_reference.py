"""The return planner as first written: every pending pod tried on every node, no memo, no index.

Kept as the reference the fast planner in extender/core/returns.py must agree
with exactly (tests/unit/test_planner_speed.py): same restores, same targets,
same reasons, same order. Only the planning search lives here; what a
borrower is, how its restored request reads and whether a return is worth it
come from the module itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from extender.core.cluster import MigCounts, NodeState, PodRequest, Snapshot
from extender.core.constraints import NodeConstraints
from extender.core.decide import Placement, place
from extender.core.returns import Borrower, Restore, restored_request, worth_a_return
from extender.core.rules import ChainRules, ReturnMode, ReturnOrder


def blocked_pending(
    snapshot: Snapshot, pending: Sequence[PodRequest], rules: ChainRules, claims: Iterable[tuple[str, MigCounts]] = ()
) -> list[PodRequest]:
    return _after_pending(snapshot, pending, rules, claims, _Allowed(snapshot))[1]


def _after_pending(
    snapshot: Snapshot,
    pending: Sequence[PodRequest],
    rules: ChainRules,
    claims: Iterable[tuple[str, MigCounts]],
    allowed: _Allowed,
) -> tuple[_Free, list[PodRequest]]:
    free = _Free({name: dict(snapshot.nodes[name].free) for name in allowed.names})
    for node, counts in claims:
        if node in free.nodes:
            free.take(node, counts)
    blocked = []
    for waiting in sorted(pending, key=lambda pod: pod.key):
        spot = _best_spot(waiting, snapshot, allowed.nodes(waiting), free.nodes, rules)
        if spot is None:
            blocked.append(waiting)
        else:
            free.take(spot.node, spot.slices)
    return free, blocked


def plan_returns(
    snapshot: Snapshot,
    borrowers: Sequence[Borrower],
    pending: Sequence[PodRequest],
    rules: ChainRules,
    claims: Iterable[tuple[str, MigCounts]] = (),
    *,
    order: ReturnOrder = ReturnOrder.LEAST_WORK_LOST,
    waited: Mapping[str, float] | None = None,
) -> tuple[Restore, ...]:
    allowed = _Allowed(snapshot)
    free, blocked = _after_pending(snapshot, pending, rules, claims, allowed)
    plans: list[Restore] = []
    movable = sorted(
        (b for b in borrowers if not b.held_back and b.mode is not ReturnMode.NEVER), key=lambda b: b.order(order)
    )
    for borrower in (b for b in movable if b.mode is ReturnMode.EAGER):
        if not free.enough(borrower.loan.original):
            continue
        target = _exact_home(borrower, snapshot, allowed, free.nodes, rules)
        if target is not None:
            free.take(target, borrower.loan.original)
            plans.append(Restore(borrower, target, "", f"a free {_names(borrower.loan.original)} on {target} (eager)"))
    planned = {plan.borrower.key for plan in plans}
    on_demand = [b for b in movable if b.mode is ReturnMode.ON_DEMAND]
    for waiting in blocked:
        for borrower in on_demand:
            if borrower.key in planned:
                continue
            restore = _unblock(borrower, waiting, snapshot, allowed=allowed, free=free, rules=rules)
            if restore is not None:
                plans.append(restore)
                planned.add(borrower.key)
                break
    served = {plan.unblocks for plan in plans}
    for waiting in blocked:
        if waiting.key in served:
            continue
        for borrower in movable:
            if borrower.key in planned or (waited or {}).get(waiting.key, 0.0) < borrower.reclaim_after:
                continue
            restore = _reclaim(borrower, waiting, snapshot, free=free, rules=rules)
            if restore is not None:
                plans.append(restore)
                planned.add(borrower.key)
                break
    return tuple(plans)


def _reclaim(
    borrower: Borrower, waiting: PodRequest, snapshot: Snapshot, *, free: _Free, rules: ChainRules
) -> Restore | None:
    home = borrower.record.node
    if home not in free.nodes or not worth_a_return(waiting, snapshot.nodes[home]):
        return None
    if isinstance(place(waiting, _with_free(snapshot.nodes[home], free.nodes[home]), home, rules), Placement):
        return None
    given_back = dict(free.nodes[home])
    for resource, count in borrower.loan.borrowed:
        given_back[resource] = given_back.get(resource, 0) + count
    placement = place(waiting, _with_free(snapshot.nodes[home], given_back), home, rules)
    if not isinstance(placement, Placement) or placement.borrows:
        return None
    free.give(home, borrower.loan.borrowed)
    free.take(home, placement.slices)
    return Restore(
        borrower,
        "",
        waiting.key,
        f"{waiting.key} is waiting for its own {_names(waiting.mig)}, which this pod borrowed on {home}; "
        "it goes back to Pending with its own request (reclaimed)",
    )


def _unblock(
    borrower: Borrower, waiting: PodRequest, snapshot: Snapshot, *, allowed: _Allowed, free: _Free, rules: ChainRules
) -> Restore | None:
    home = borrower.record.node
    if home not in free.nodes or not free.enough(borrower.loan.original):
        return None
    if not worth_a_return(waiting, snapshot.nodes[home]):
        return None
    given_back = dict(free.nodes[home])
    for resource, count in borrower.loan.borrowed:
        given_back[resource] = given_back.get(resource, 0) + count
    if not isinstance(place(waiting, _with_free(snapshot.nodes[home], given_back), home, rules), Placement):
        return None
    target = _exact_home(borrower, snapshot, allowed, free.nodes, rules)
    if target is None:
        return None
    trial = free.copy()
    trial.take(target, borrower.loan.original)
    trial.give(home, borrower.loan.borrowed)
    placement = place(waiting, _with_free(snapshot.nodes[home], trial.nodes[home]), home, rules)
    if not isinstance(placement, Placement):
        return None
    trial.take(home, placement.slices)
    free.adopt(trial)
    return Restore(
        borrower,
        target,
        waiting.key,
        f"{waiting.key} is waiting and fits the {_names(borrower.loan.borrowed)} it gives back on {home} (on-demand)",
    )


class _Allowed:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.names = sorted(name for name, node in snapshot.nodes.items() if node.offers_slices)
        self.found: dict[NodeConstraints, list[str]] = {}

    def nodes(self, pod: PodRequest) -> list[str]:
        found = self.found.get(pod.constraints)
        if found is None:
            nodes = self.snapshot.nodes
            found = self.found[pod.constraints] = [name for name in self.names if pod.may_run_on(nodes[name])]
        return found


class _Free:
    def __init__(self, nodes: dict[str, dict[str, int]]) -> None:
        self.nodes = nodes
        self.totals: dict[str, int] = {}
        for slices in nodes.values():
            for resource, count in slices.items():
                self.totals[resource] = self.totals.get(resource, 0) + count

    def copy(self) -> _Free:
        return _Free({name: dict(slices) for name, slices in self.nodes.items()})

    def adopt(self, other: _Free) -> None:
        self.nodes, self.totals = other.nodes, other.totals

    def enough(self, counts: MigCounts) -> bool:
        return all(self.totals.get(resource, 0) >= count for resource, count in counts)

    def take(self, node: str, counts: MigCounts) -> None:
        self.give(node, tuple((resource, -count) for resource, count in counts))

    def give(self, node: str, counts: MigCounts) -> None:
        slices = self.nodes[node]
        for resource, count in counts:
            slices[resource] = slices.get(resource, 0) + count
            self.totals[resource] = self.totals.get(resource, 0) + count


def _exact_home(
    borrower: Borrower,
    snapshot: Snapshot,
    allowed: _Allowed,
    free: Mapping[str, Mapping[str, int]],
    rules: ChainRules,
) -> str | None:
    restored = restored_request(borrower)
    best: tuple[int, str] | None = None
    for name in allowed.nodes(restored):
        verdict = place(restored, _with_free(snapshot.nodes[name], free[name]), name, rules)
        if isinstance(verdict, Placement):
            rank = (verdict.leftover, name)
            if best is None or rank < best:
                best = rank
    return None if best is None else best[1]


def _best_spot(
    pod: PodRequest,
    snapshot: Snapshot,
    allowed: Sequence[str],
    free: Mapping[str, Mapping[str, int]],
    rules: ChainRules,
) -> Placement | None:
    best: Placement | None = None
    for name in allowed:
        verdict = place(pod, _with_free(snapshot.nodes[name], free[name]), name, rules)
        if isinstance(verdict, Placement) and (
            best is None or (verdict.cost, verdict.leftover) < (best.cost, best.leftover)
        ):
            best = verdict
    return best


def _with_free(node: NodeState, free: Mapping[str, int]) -> NodeState:
    used = {resource: count - free.get(resource, 0) for resource, count in node.allocatable.items()}
    return dataclasses.replace(node, used=used)


def _names(counts: MigCounts) -> str:
    return ", ".join(f"{count}x {resource}" for resource, count in counts)
