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

A pending pod is demand only if migchain's scheduler will place it (its
schedulerName, no scheduling gate), and counts only on the nodes it may run on
(`PodRequest.may_run_on`): where it takes free slices, and where a return may
make room for it. A restored borrower goes back only where it may run.

Ties go to fewer restarts so far, then the oldest loan, then the name. A plan
never counts a slice twice and never counts a slice that is only about to be
freed: those show up, free, in the next round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from extender.core.cluster import (
    ANNOTATION_PREFIX,
    MIGCHAIN_SCHEDULER,
    MigCounts,
    NodeState,
    PodRecord,
    PodRequest,
    Snapshot,
)
from extender.core.constraints import NodeConstraints
from extender.core.decide import Placement, place
from extender.core.loan import RESTARTS_ANNOTATION, Loan, loan_of
from extender.core.rules import ChainRules, Policy, ReturnMode

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
        # The opt-outs are the pod owner's words: they hold a borrower back only where the admin's policy says.
        policy = loan_policy(loan, rules)
        opt_outs, namespace = policy.pod_opt_outs, record.request.namespace
        held_back = ""
        if record.migchain.get(RETURN_ANNOTATION, "true") != "true" and opt_outs.honours_return(namespace):
            held_back = f"pod annotation {RETURN_ANNOTATION}={record.migchain[RETURN_ANNOTATION]}"
        elif cap is not None and restarts >= cap and opt_outs.honours_max_restarts(namespace):
            held_back = f"restarted {restarts} time(s), {MAX_RESTARTS_ANNOTATION}={cap}"
        found.append(Borrower(record, loan, policy.return_mode, restarts, held_back))
    return found


def pending_requests(
    records: Iterable[PodRecord], schedulers: Collection[str] = (MIGCHAIN_SCHEDULER,)
) -> list[PodRequest]:
    """The pods waiting for MIG slices that one of `schedulers` will place once they are free (PodRecord.waits_for).

    `schedulers` are the scheduler names migchain's profile serves; pods for
    any other scheduler, or held by a scheduling gate, are no demand.
    """
    return [r.request for r in records if r.waits_for(schedulers)]


def worth_a_return(waiting: PodRequest, home: NodeState) -> bool:
    """Whether a return on `home` may be spent for the pending pod `waiting`, its slices aside.

    It must be allowed on `home`. A pod whose place depends on other pods
    (hard topology spread, required pod affinity or anti-affinity) might still
    be kept off it by where its siblings run, which the planner does not see:
    no restart is spent on a maybe.
    """
    return not waiting.constraints.depends_on_pods and waiting.may_run_on(home)


def blocked_pending(
    snapshot: Snapshot, pending: Sequence[PodRequest], rules: ChainRules, claims: Iterable[tuple[str, MigCounts]] = ()
) -> list[PodRequest]:
    """The pending pods that fit nowhere once the pods before them have taken their spots: those a return helps."""
    return _after_pending(snapshot, pending, rules, claims, _Allowed(snapshot))[1]


def _after_pending(
    snapshot: Snapshot,
    pending: Sequence[PodRequest],
    rules: ChainRules,
    claims: Iterable[tuple[str, MigCounts]],
    allowed: _Allowed,
) -> tuple[_Free, list[PodRequest]]:
    """The free slices left once `claims` and the pending pods that fit somewhere are counted, and those that do not."""
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
) -> tuple[Restore, ...]:
    """The restores worth doing now, each with a target node that holds the borrower's original request.

    Slices that pending pods will take (those that fit somewhere now) and
    `claims` (returns under way whose pods are not back yet) are not free:
    counting them would restart a borrower only for it to borrow again.
    """
    allowed = _Allowed(snapshot)
    free, blocked = _after_pending(snapshot, pending, rules, claims, allowed)
    plans: list[Restore] = []
    movable = sorted((b for b in borrowers if not b.held_back and b.mode is not ReturnMode.NEVER), key=Borrower.order)
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
    return tuple(plans)


def _unblock(
    borrower: Borrower, waiting: PodRequest, snapshot: Snapshot, *, allowed: _Allowed, free: _Free, rules: ChainRules
) -> Restore | None:
    """Plan `borrower`'s return if, with its slices given back, `waiting` fits on its node."""
    home = borrower.record.node
    if home not in free.nodes or not free.enough(borrower.loan.original):
        return None
    if not worth_a_return(waiting, snapshot.nodes[home]):
        return None  # it may not run there: the restart would buy it nothing
    given_back = dict(free.nodes[home])
    for resource, count in borrower.loan.borrowed:
        given_back[resource] = given_back.get(resource, 0) + count
    if not isinstance(place(waiting, _with_free(snapshot.nodes[home], given_back), home, rules), Placement):
        return None  # cheap test first: would the waiting pod fit there at all?
    target = _exact_home(borrower, snapshot, allowed, free.nodes, rules)
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


class _Allowed:
    """The nodes offering slices that each pod may run on, in name order, found once per distinct set of
    placement rules: pods of one workload share theirs, so a round matches rules against the nodes a few
    times, not once per pending pod."""

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
    borrower: Borrower,
    snapshot: Snapshot,
    allowed: _Allowed,
    free: Mapping[str, Mapping[str, int]],
    rules: ChainRules,
) -> str | None:
    """The node the restored pod would land on: an exact fit of its original request where it may run,
    best score, then name. It comes back with the borrower's placement rules."""
    restored = restored_request(borrower)
    best: tuple[int, str] | None = None
    for name in allowed.nodes(restored):
        verdict = place(restored, _with_free(snapshot.nodes[name], free[name]), name, rules)
        if isinstance(verdict, Placement):
            rank = (verdict.leftover, name)  # the tightest fit, as the scheduler's score prefers
            if best is None or rank < best:
                best = rank
    return None if best is None else best[1]


def restored_request(borrower: Borrower) -> PodRequest:
    """What the borrower's pod asks for once returned: its original slices, no borrowing, the same placement rules."""
    return dataclasses.replace(borrower.record.request, mig=borrower.loan.original, no_borrow="restoring a borrower")


def _best_spot(
    pod: PodRequest,
    snapshot: Snapshot,
    allowed: Sequence[str],
    free: Mapping[str, Mapping[str, int]],
    rules: ChainRules,
) -> Placement | None:
    """Where the scheduler would put a pending pod now, among the nodes it may run on (in name order):
    the cheapest, then tightest fit, then the name."""
    best: Placement | None = None
    for name in allowed:
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


def loan_policy(loan: Loan, rules: ChainRules) -> Policy:
    """The policy a loan is returned by: its chain's, from the signed record.

    Loans outlive rule edits: the chain's current policy decides, and a loan
    whose chain is gone is under the default one (on demand, no pod opt-outs).
    """
    for chain in rules.chains:
        if chain.name in loan.chains:
            return chain.policy
    return Policy()


def return_mode_of(loan: Loan, rules: ChainRules) -> ReturnMode:
    return loan_policy(loan, rules).return_mode


def _whole(text: str | None) -> int | None:
    """A whole number from an annotation; None when absent or not a number (a typo caps nothing)."""
    return int(text) if text is not None and text.strip().isdigit() else None
