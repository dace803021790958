"""The return planner: which borrowers go back to the type they asked for, and why; pure.

A borrower holds a larger slice than it asked for. When a slice of its own
type is free, it may be restored (evicted, and brought back asking for its
original request), so the larger slice serves a pod that needs it. The mode
comes from the policy of the chain the loan was made on:

- eager (the reference behaviour): as soon as a slice of type T is free,
  restore the borrower of T that borrowed the most steps;
- on-demand: restore only when that unblocks a pending pod, one that fits
  nowhere now but fits the slice the borrower gives back;
- never.

Ties go to fewer restarts so far, then the oldest loan, then the name. A plan
never counts a slice twice and never counts a slice that is only about to be
freed: those show up, free, in the next round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from extender.core.cluster import ANNOTATION_PREFIX, MigCounts, NodeState, PodRecord, PodRequest, Snapshot
from extender.core.decide import Placement, place
from extender.core.loan import RESTARTS_ANNOTATION, Loan, loan_of
from extender.core.rules import ChainRules, ReturnMode

RETURN_ANNOTATION = ANNOTATION_PREFIX + "return"  # "false": never return this pod
MAX_RESTARTS_ANNOTATION = ANNOTATION_PREFIX + "max-restarts"  # cap on returns of this pod


@dataclass(frozen=True)
class Borrower:
    record: PodRecord
    loan: Loan
    mode: ReturnMode
    restarts: int
    held_back: str  # why it may not be returned; empty when it may

    @property
    def key(self) -> str:
        return self.record.request.key

    def order(self) -> tuple[int, int, str, str]:
        """Most steps first; then fewest restarts, the oldest loan, the name."""
        return (-self.loan.steps, self.restarts, self.record.created, self.key)


@dataclass(frozen=True)
class Restore:
    borrower: Borrower
    target: str  # a node where its original request fits exactly now
    unblocks: str  # the pending pod this return makes room for (on-demand); "" for eager
    reason: str


def borrowers_of(records: Iterable[PodRecord], rules: ChainRules) -> list[Borrower]:
    """The running borrowers among the cache's pods, with the return mode of the chain they borrowed on."""
    found = []
    for record in records:
        if not record.node or record.terminal or record.terminating:
            continue
        loan = loan_of(record.migchain)
        if loan is None:
            continue
        restarts = _whole(record.migchain.get(RESTARTS_ANNOTATION)) or 0
        cap = _whole(record.migchain.get(MAX_RESTARTS_ANNOTATION))
        held_back = ""
        if record.migchain.get(RETURN_ANNOTATION, "true") != "true":
            held_back = f"pod annotation {RETURN_ANNOTATION}={record.migchain[RETURN_ANNOTATION]}"
        elif cap is not None and restarts >= cap:
            held_back = f"restarted {restarts} time(s), {MAX_RESTARTS_ANNOTATION}={cap}"
        found.append(Borrower(record, loan, return_mode_of(loan, rules), restarts, held_back))
    return found


def pending_requests(records: Iterable[PodRecord]) -> list[PodRequest]:
    """The pods waiting for MIG slices: unbound, not finished, not on their way out."""
    return [r.request for r in records if not r.node and not r.terminal and not r.terminating and r.request.mig]


def blocked_pending(
    snapshot: Snapshot, pending: Sequence[PodRequest], rules: ChainRules, claims: Iterable[tuple[str, MigCounts]] = ()
) -> list[PodRequest]:
    """The pending pods that fit nowhere once the pods before them have taken their spots: those a return helps."""
    return _after_pending(snapshot, pending, rules, claims)[1]


def _after_pending(
    snapshot: Snapshot, pending: Sequence[PodRequest], rules: ChainRules, claims: Iterable[tuple[str, MigCounts]]
) -> tuple[_Free, list[PodRequest]]:
    """The free slices left once `claims` and the pending pods that fit somewhere are counted, and those that do not."""
    free = _Free({name: dict(node.free) for name, node in snapshot.nodes.items() if node.offers_slices})
    for node, counts in claims:
        if node in free.nodes:
            free.take(node, counts)
    blocked = []
    for waiting in sorted(pending, key=lambda pod: pod.key):
        spot = _best_spot(waiting, snapshot, free.nodes, rules)
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
) -> tuple[Restore, ...]:
    """The restores worth doing now, each with a target node that holds the borrower's original request.

    Slices that pending pods will take (those that fit somewhere now) and
    `claims` (returns under way whose pods are not back yet) are not free:
    counting them would restart a borrower only for it to borrow again.
    """
    free, blocked = _after_pending(snapshot, pending, rules, claims)
    plans: list[Restore] = []
    movable = sorted((b for b in borrowers if not b.held_back and b.mode is not ReturnMode.NEVER), key=Borrower.order)
    for borrower in (b for b in movable if b.mode is ReturnMode.EAGER):
        if not free.enough(borrower.loan.original):
            continue
        target = _exact_home(borrower.loan.original, borrower.record.request, snapshot, free.nodes, rules)
        if target is not None:
            free.take(target, borrower.loan.original)
            plans.append(Restore(borrower, target, "", f"a free {_names(borrower.loan.original)} on {target} (eager)"))
    planned = {plan.borrower.key for plan in plans}
    on_demand = [b for b in movable if b.mode is ReturnMode.ON_DEMAND]
    for waiting in blocked:
        for borrower in on_demand:
            if borrower.key in planned:
                continue
            restore = _unblock(borrower, waiting, snapshot, free, rules)
            if restore is not None:
                plans.append(restore)
                planned.add(borrower.key)
                break
    return tuple(plans)


def _unblock(
    borrower: Borrower, waiting: PodRequest, snapshot: Snapshot, free: _Free, rules: ChainRules
) -> Restore | None:
    """Plan `borrower`'s return if, with its slices given back, `waiting` fits on its node."""
    home = borrower.record.node
    if home not in free.nodes or not free.enough(borrower.loan.original):
        return None
    given_back = dict(free.nodes[home])
    for resource, count in borrower.loan.borrowed:
        given_back[resource] = given_back.get(resource, 0) + count
    if not isinstance(place(waiting, _with_free(snapshot.nodes[home], given_back), home, rules), Placement):
        return None  # cheap test first: would the waiting pod fit there at all?
    target = _exact_home(borrower.loan.original, borrower.record.request, snapshot, free.nodes, rules)
    if target is None:
        return None
    trial = free.copy()
    trial.take(target, borrower.loan.original)
    trial.give(home, borrower.loan.borrowed)
    placement = place(waiting, _with_free(snapshot.nodes[home], trial.nodes[home]), home, rules)
    if not isinstance(placement, Placement):
        return None
    trial.take(home, placement.slices)  # the unblocked pod will take them: no one else may
    free.adopt(trial)
    return Restore(
        borrower,
        target,
        waiting.key,
        f"{waiting.key} is waiting and fits the {_names(borrower.loan.borrowed)} it gives back on {home} (on-demand)",
    )


class _Free:
    """Free slices per node during planning, with fleet-wide totals for quick tests."""

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
        """A quick necessary test before a search: the fleet has that many free slices of each type at all."""
        return all(self.totals.get(resource, 0) >= count for resource, count in counts)

    def take(self, node: str, counts: MigCounts) -> None:
        self.give(node, tuple((resource, -count) for resource, count in counts))

    def give(self, node: str, counts: MigCounts) -> None:
        slices = self.nodes[node]
        for resource, count in counts:
            slices[resource] = slices.get(resource, 0) + count
            self.totals[resource] = self.totals.get(resource, 0) + count


def _exact_home(
    original: MigCounts,
    request: PodRequest,
    snapshot: Snapshot,
    free: Mapping[str, Mapping[str, int]],
    rules: ChainRules,
) -> str | None:
    """The node the restored pod would land on: an exact fit of its original request, best score, then name."""
    restored = dataclasses.replace(request, mig=original, no_borrow="restoring a borrower")
    best: tuple[int, str] | None = None
    for name in sorted(free):
        verdict = place(restored, _with_free(snapshot.nodes[name], free[name]), name, rules)
        if isinstance(verdict, Placement):
            rank = (verdict.leftover, name)  # the tightest fit, as the scheduler's score prefers
            if best is None or rank < best:
                best = rank
    return None if best is None else best[1]


def _best_spot(
    pod: PodRequest, snapshot: Snapshot, free: Mapping[str, Mapping[str, int]], rules: ChainRules
) -> Placement | None:
    """Where the scheduler would put a pending pod now: the cheapest, then tightest fit, then the name."""
    best: Placement | None = None
    for name in sorted(free):
        verdict = place(pod, _with_free(snapshot.nodes[name], free[name]), name, rules)
        if isinstance(verdict, Placement) and (
            best is None or (verdict.cost, verdict.leftover) < (best.cost, best.leftover)
        ):
            best = verdict
    return best


def _with_free(node: NodeState, free: Mapping[str, int]) -> NodeState:
    """The node as if `free` were what it has free (used = allocatable - free)."""
    used = {resource: count - free.get(resource, 0) for resource, count in node.allocatable.items()}
    return dataclasses.replace(node, used=used)


def _names(counts: MigCounts) -> str:
    return ", ".join(f"{count}x {resource}" for resource, count in counts)


def return_mode_of(loan: Loan, rules: ChainRules) -> ReturnMode:
    # Loans outlive rule edits: the chain's current policy decides, and a loan
    # whose chain is gone returns on demand, the default.
    for chain in rules.chains:
        if chain.name in loan.chains:
            return chain.policy.return_mode
    return ReturnMode.ON_DEMAND


def _whole(text: str | None) -> int | None:
    """A whole number from an annotation; None when absent or not a number (a typo caps nothing)."""
    return int(text) if text is not None and text.strip().isdigit() else None
