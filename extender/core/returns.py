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

The returner plans a round on every change of the cluster, so a round must
cost little at fleet scale: a pod is tried only where a type it could be
granted is free, and nodes and pods alike are decided once (`_Free`). The
answers are exactly those of trying every pod on every node, which
tests/unit/planner_reference.py keeps to compare with.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from extender.core import untrusted
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
from extender.core.decide import MAX_BORROW_DEMANDS, Placement, place
from extender.core.loan import Loan, record_loan
from extender.core.rules import ChainRules, OwnerKind, Policy, ReturnMode, ReturnOrder
from extender.core.status import loan_pairs

RETURN_ANNOTATION = ANNOTATION_PREFIX + "return"  # "false": never return this pod
MAX_RESTARTS_ANNOTATION = ANNOTATION_PREFIX + "max-restarts"  # cap on returns of this pod


# A creationTimestamp (RFC 3339, fixed width) with its digits inverted: sorts the newest first.
_NEWEST_FIRST = str.maketrans("0123456789", "9876543210")


@dataclass(frozen=True)
class Borrower:
    record: PodRecord
    loan: Loan
    mode: ReturnMode
    restarts: int
    held_back: str  # why it may not be returned; empty when it may
    reclaim_after: int = 0  # its chain's policy.reclaimAfterSeconds

    @property
    def key(self) -> str:
        return self.record.request.key

    def order(self, by: ReturnOrder = ReturnOrder.LEAST_WORK_LOST) -> tuple[str | int, ...]:
        """Which goes first when several could. Least work lost: the youngest loan (the copy's creation is when
        its work started, so a restart throws away the least), then most steps, fewest restarts, the name.
        Most steps: most steps, fewest restarts, the oldest loan, the name."""
        if by is ReturnOrder.MOST_STEPS:
            return (-self.loan.steps, self.restarts, self.record.created, self.key)
        return (self.record.created.translate(_NEWEST_FIRST), -self.loan.steps, self.restarts, self.key)


@dataclass(frozen=True)
class Restore:
    borrower: Borrower
    target: str  # a node where its original request fits exactly now
    unblocks: str  # the pending pod this return makes room for (on-demand); "" for eager
    reason: str


def borrowers_of(records: Iterable[PodRecord], rules: ChainRules) -> list[Borrower]:
    """The running borrowers among the cache's pods, under the policy of the chain they borrowed on.

    A pod whose loan record cannot be read or does not match it (`record_loan`)
    is no borrower: the cache's loan guard has counted and reported it. A
    loan's steps decide who goes first (eager): they count for at most what
    the chains allow for the types it names (`steps_allowed`), whatever the
    record says.
    """
    found = []
    for record in records:
        if not record.node or record.terminal or record.terminating:
            continue
        borrower = _borrower(record, rules)
        if borrower is not None:
            found.append(borrower)
    return found


@dataclass(frozen=True)
class TurnedAway:
    """A borrowing copy its node's kubelet refused at admission: it never ran, and it holds nothing.

    Its slices were not free after all (a pod bound behind migchain's back,
    a device plugin that lost a device). A bare pod has no one else to bring
    it back: migchain recreates it, pending under its name, asking for its
    original request, borrowing again only while it has been restarted fewer
    than MAX_RESTARTS_TO_BORROW_AGAIN times, so a node that keeps refusing
    cannot keep it cycling. An owned pod is its controller's to replace.
    """

    borrower: Borrower
    owned: bool
    borrow_again: bool


# A bare borrower turned away by its node after this many restarts comes back not to borrow again: it waits
# for a slice of its own type (a node that keeps refusing must not keep it cycling through borrows).
MAX_RESTARTS_TO_BORROW_AGAIN = 3


def turned_away_borrowers(records: Iterable[PodRecord], rules: ChainRules) -> list[TurnedAway]:
    """The borrowers their node refused at admission (`PodRecord.turned_away`), oldest first, each once while
    its Failed pod is there (a bare one goes when it is brought back)."""
    found = []
    for record in sorted(records, key=lambda r: (r.created, r.request.key)):
        if not record.turned_away or not record.node or record.terminating:
            continue
        borrower = _borrower(record, rules)
        if borrower is not None:
            again = borrower.restarts < MAX_RESTARTS_TO_BORROW_AGAIN
            found.append(TurnedAway(borrower, owned=bool(record.owner), borrow_again=again))
    return found


def _borrower(record: PodRecord, rules: ChainRules) -> Borrower | None:
    loan = record_loan(record)
    if not isinstance(loan, Loan):
        return None
    loan = dataclasses.replace(loan, steps=min(loan.steps, steps_allowed(loan, rules)))
    # A cap that is no count (a typo) caps nothing.
    cap = untrusted.count(record.migchain.get(MAX_RESTARTS_ANNOTATION), untrusted.MAX_RESTARTS)
    # The opt-outs are the pod owner's words: they hold a borrower back only where the admin's policy says.
    policy = loan_policy(loan, rules)
    opt_outs, namespace = policy.pod_opt_outs, record.request.namespace
    held_back = ""
    if record.migchain.get(RETURN_ANNOTATION, "true") != "true" and opt_outs.honours_return(namespace):
        held_back = f"pod annotation {RETURN_ANNOTATION}={untrusted.excerpt(record.migchain[RETURN_ANNOTATION])}"
    elif cap is not None and loan.restarts >= cap and opt_outs.honours_max_restarts(namespace):
        held_back = f"restarted {loan.restarts} time(s), {MAX_RESTARTS_ANNOTATION}={cap}"
    return Borrower(record, loan, policy.return_mode, loan.restarts, held_back, policy.reclaim_after_seconds)


def steps_allowed(loan: Loan, rules: ChainRules) -> int:
    """The most steps a loan can have borrowed: each slice it holds for a smaller type counts as far up as
    the two types lie apart on a chain the loan names (on any loaded chain when none of those is loaded,
    one step when no chain has both)."""
    named = [chain for chain in rules.chains if chain.name in loan.chains] or list(rules.chains)
    total = 0
    for requested, granted, slices in loan_pairs(loan):
        distances = [
            chain.types.index(granted) - chain.types.index(requested)
            for chain in named
            if requested in chain.types and granted in chain.types
        ]
        total += slices * max([1, *distances])
    return total


def pending_requests(
    records: Iterable[PodRecord], schedulers: Collection[str] = (MIGCHAIN_SCHEDULER,)
) -> list[PodRequest]:
    """The pods waiting for MIG slices that one of `schedulers` will place once they are free (PodRecord.waits_for).

    `schedulers` are the scheduler names migchain's profile serves; pods for
    any other scheduler, or held by a scheduling gate, are no demand.
    """
    return [r.request for r in records if r.waits_for(schedulers)]


def waiting_times(records: Iterable[PodRecord], now: float) -> dict[str, float]:
    """How long each pending pod has waited, in seconds, by key: from its creationTimestamp to `now` (the
    epoch). A timestamp that cannot be read counts as just now: such a pod waits, and never costs a reclaim
    early."""
    waited = {}
    for record in records:
        if record.node or record.terminal:
            continue
        try:
            created = datetime.datetime.fromisoformat(record.created).timestamp()
        except ValueError:
            continue
        waited[record.request.key] = max(0.0, now - created)
    return waited


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
    return _after_pending(_Free(snapshot, rules, claims), pending)


def _after_pending(free: _Free, pending: Sequence[PodRequest]) -> list[PodRequest]:
    """Count the spots of the pending pods that fit somewhere, in name order; return those that fit nowhere.

    Taking slices never makes a pod fit where it did not, so once a pod fits
    nowhere every later pod alike (the same request and placement rules, as a
    workload's pods are) fits nowhere either: that is decided once.
    """
    blocked = []
    nowhere: set[tuple[PodShape, NodeConstraints]] = set()
    for waiting in sorted(pending, key=lambda pod: pod.key):
        alike = (_shape(waiting), waiting.constraints)
        spot = None if alike in nowhere else free.best_spot(waiting)
        if spot is None:
            nowhere.add(alike)
            blocked.append(waiting)
            continue
        free.take(spot.node, spot.slices)
        if any(count < 0 for _, count in spot.slices):
            nowhere.clear()  # a count below zero (never read from a pod) gives slices back: all may fit again
    return blocked


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
    """The restores worth doing now: returns, each with a target node that holds the borrower's original
    request, then reclaims (`_reclaim`), whose borrower goes back to Pending (target "").

    Slices that pending pods will take (those that fit somewhere now) and
    `claims` (returns under way whose pods are not back yet) are not free:
    counting them would restart a borrower only for it to borrow again.
    Borrowers are tried in `order`. `waited`: how long each pending pod (by
    key) has waited, in seconds; a pod missing from it has just come.
    """
    free = _Free(snapshot, rules, claims)
    blocked = _after_pending(free, pending)
    plans: list[Restore] = []
    movable = sorted(
        (b for b in borrowers if not b.held_back and b.mode is not ReturnMode.NEVER), key=lambda b: b.order(order)
    )
    for borrower in (b for b in movable if b.mode is ReturnMode.EAGER):
        if not free.enough(borrower.loan.original):
            continue
        target = free.exact_home(borrower)
        if target is not None:
            free.take(target, borrower.loan.original)
            plans.append(Restore(borrower, target, "", f"a free {_names(borrower.loan.original)} on {target} (eager)"))
    planned = {plan.borrower.key for plan in plans}
    on_demand = _OnDemand([b for b in movable if b.mode is ReturnMode.ON_DEMAND])
    # A kind of pending pod no borrower can make room for stays so until a return changes what is free.
    hopeless: dict[tuple[PodShape, NodeConstraints], tuple[int, int]] = {}
    for waiting in blocked:
        alike, now = (_shape(waiting), waiting.constraints), (free.version, len(plans))
        if hopeless.get(alike) == now:
            continue
        for borrower in on_demand.worth_trying(waiting, free):
            if borrower.key in planned:
                continue
            restore = _unblock(borrower, waiting, free)
            if restore is not None:
                plans.append(restore)
                planned.add(borrower.key)
                break
        else:
            hopeless[alike] = now
    served = {plan.unblocks for plan in plans}
    holders = _Holders([b for b in movable if b.key not in planned])
    reclaims: dict[tuple[PodShape, NodeConstraints, float], tuple[int, int]] = {}
    for waiting in blocked:
        waited_for = (waited or {}).get(waiting.key, 0.0)
        like, now = (_shape(waiting), waiting.constraints, waited_for), (free.version, len(plans))
        if waiting.key in served or reclaims.get(like) == now:
            continue
        failed: set[tuple[str, MigCounts]] = set()  # (node, slices given back) that do not make room, now
        for borrower in holders.of(waiting):
            if borrower.key in planned or waited_for < borrower.reclaim_after:
                continue
            tried = (borrower.record.node, borrower.loan.borrowed)
            if tried in failed:
                continue  # a borrower alike on that node was no help: nor is this one (nothing changed since)
            restore = _reclaim(borrower, waiting, free)
            if restore is None:
                failed.add(tried)
            else:
                plans.append(restore)
                planned.add(borrower.key)
                break
        else:
            reclaims[like] = now
    return tuple(plans)


def _reclaim(borrower: Borrower, waiting: PodRequest, free: _Free) -> Restore | None:
    """Plan taking back the slices `borrower` holds if `waiting` then fits exactly on its node.

    The pending pod asks for the very type the borrower was lent, and no
    return could make room for it (its own type is not free anywhere). Under
    the plain mixed strategy it would have had that slice: a loan must not keep
    it from it. The borrower goes back to Pending with its own request, and
    runs again once a slice of its own type frees. No restart is spent unless
    the waiting pod fits without borrowing.
    """
    home = borrower.record.node
    if home not in free.nodes or not worth_a_return(waiting, free.snapshot.nodes[home]):
        return None
    if free.fits(waiting, home, free.nodes[home]) is not None:
        return None  # it fits there as things stand (a return this round made room): no restart for nothing
    placement = free.fits(waiting, home, _plus(free.nodes[home], borrower.loan.borrowed))
    if placement is None or placement.borrows:
        return None
    free.give(home, borrower.loan.borrowed)
    free.take(home, placement.slices)  # the waiting pod will take them: no one else may
    return Restore(
        borrower,
        "",
        waiting.key,
        f"{waiting.key} is waiting for its own {_names(waiting.mig)}, which this pod borrowed on {home}; "
        "it goes back to Pending with its own request (reclaimed)",
    )


class _Holders:
    """Borrowers by the types they were lent, each list in return order: who holds what a waiting pod asks for."""

    def __init__(self, borrowers: Sequence[Borrower]) -> None:
        self.position = {borrower.key: index for index, borrower in enumerate(borrowers)}
        self.holding: dict[str, list[Borrower]] = {}
        for borrower in borrowers:
            for resource in {resource for resource, _ in borrower.loan.borrowed}:
                self.holding.setdefault(resource, []).append(borrower)

    def of(self, waiting: PodRequest) -> list[Borrower]:
        found = {b.key: b for resource, _ in waiting.mig for b in self.holding.get(resource, ())}
        return sorted(found.values(), key=lambda b: self.position[b.key])


def _unblock(borrower: Borrower, waiting: PodRequest, free: _Free) -> Restore | None:
    """Plan `borrower`'s return if, with its slices given back, `waiting` fits on its node."""
    home = borrower.record.node
    if home not in free.nodes or not free.enough(borrower.loan.original):
        return None
    if not worth_a_return(waiting, free.snapshot.nodes[home]):
        return None  # it may not run there: the restart would buy it nothing
    given_back = _plus(free.nodes[home], borrower.loan.borrowed)
    if free.fits(waiting, home, given_back) is None:
        return None  # cheap test first: would the waiting pod fit there at all?
    target = free.exact_home(borrower)
    if target is None:
        return None
    after = dict(free.nodes[home])
    if target == home:
        after = _plus(after, tuple((resource, -count) for resource, count in borrower.loan.original))
    placement = free.fits(waiting, home, _plus(after, borrower.loan.borrowed))
    if placement is None:
        return None
    free.take(target, borrower.loan.original)
    free.give(home, borrower.loan.borrowed)
    free.take(home, placement.slices)  # the unblocked pod will take them: no one else may
    return Restore(
        borrower,
        target,
        waiting.key,
        f"{waiting.key} is waiting and fits the {_names(borrower.loan.borrowed)} it gives back on {home} (on-demand)",
    )


# What `place` reads of a pod: its slices, whether it may borrow, its namespace, its owner's kind.
PodShape = tuple[MigCounts, bool, str, OwnerKind | None]


def _shape(pod: PodRequest) -> PodShape:
    return (pod.mig, pod.may_borrow, pod.namespace, pod.owner)


def _plain(mig: MigCounts) -> bool:
    """A request of at least one slice of each type it names: it fits only where one of its types is free.
    Every request read from a pod is; a loan record edited by hand may not be, and is then searched node by node."""
    return bool(mig) and all(count > 0 for _, count in mig)


class _Free:
    """The free slices per node during one plan, and the searches over them.

    A pending pod was once tried on every node, CPU-only and full ones
    included: 400 pending pods on 2,000 nodes took seconds a round. Here nodes
    alike in what `place` reads (GPU model, MIG state, allocatable and free
    slices: a "state") are filed together in name order, with an index from
    each type to the states that have it free. A pod is decided once per
    state that has a type it could be granted free, and within a state the
    first node it may run on stands for all. The answers are those of trying
    every node in name order: the cheapest, then the tightest fit, then the
    first name.
    """

    def __init__(self, snapshot: Snapshot, rules: ChainRules, claims: Iterable[tuple[str, MigCounts]]) -> None:
        self.snapshot = snapshot
        self.rules = rules
        # Nodes being repartitioned offer nothing; name order is the order of ties.
        names = sorted(name for name, node in snapshot.nodes.items() if node.offers_slices)
        self.nodes = {name: dict(snapshot.nodes[name].free) for name in names}
        self.totals: dict[str, int] = {}
        for slices in self.nodes.values():
            for resource, count in slices.items():
                self.totals[resource] = self.totals.get(resource, 0) + count
        self.version = 0  # bumped by every change: what was found at one version holds until the next
        self._products = sorted({snapshot.nodes[name].gpu_product for name in names})
        self._states: dict[str, int] = {}  # a node state, as NodeState.signature writes it -> its number
        self._state: dict[str, int] = {}  # node -> its state's number
        self._members: dict[int, list[str]] = {}  # state -> its nodes, in name order
        self._free_types: list[frozenset[str]] = []  # state -> the types it has free
        self._holding: dict[str, set[int]] = {}  # type -> the states that have it free
        self._pods: dict[PodShape, int] = {}  # pod shape -> its number
        self._verdicts: dict[tuple[int, int], Placement | None] = {}  # (pod, state) -> how it fits, if it does
        self._usable: dict[PodShape, tuple[frozenset[str], ...]] = {}
        self._admitted: dict[NodeConstraints, dict[str, bool]] = {}
        self._homes: dict[tuple[PodShape, NodeConstraints], tuple[int, str | None]] = {}
        for name in names:
            state = self._state[name] = self._number(snapshot.nodes[name])
            self._members.setdefault(state, []).append(name)  # in name order: the names come sorted
        for node_name, counts in claims:
            if node_name in self.nodes:
                self.take(node_name, counts)

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
        self.version += 1
        state = self._number(self.snapshot.nodes[node], slices)
        if state != self._state[node]:
            before = self._members[self._state[node]]
            del before[bisect.bisect_left(before, node)]
            bisect.insort(self._members.setdefault(state, []), node)
            self._state[node] = state

    def _number(self, node: NodeState, slices: Mapping[str, int] | None = None) -> int:
        """The number of the state of `node` with `slices` free (by default what the snapshot has free), as
        `place` sees it (`_with_free`: its allocatable types only, none fewer than zero). The key is the
        signature that node would have: the snapshot's nodes bring theirs computed."""
        if slices is None:
            free, key = node.free, node.signature
        else:
            free = {resource: max(0, slices.get(resource, 0)) for resource in node.allocatable}
            key = repr(
                (node.gpu_product, node.mig_config_state, sorted(node.allocatable.items()), sorted(free.items()))
            )
        number = self._states.get(key)
        if number is None:
            number = self._states[key] = len(self._states)
            self._free_types.append(frozenset(resource for resource, count in free.items() if count > 0))
            for resource in self._free_types[number]:
                self._holding.setdefault(resource, set()).add(number)
        return number

    def with_free(self, types: frozenset[str], among: Collection[str]) -> Iterable[str]:
        """The nodes `among` those given that have a slice of one of `types` free now."""
        states = {state for resource in types for state in self._holding.get(resource, ())}
        if sum(len(self._members.get(state, ())) for state in states) < len(among):
            return [name for state in states for name in self._members.get(state, ()) if name in among]
        return [
            name for name in among if name in self._state and not self._free_types[self._state[name]].isdisjoint(types)
        ]

    def fits(self, pod: PodRequest, node: str, slices: Mapping[str, int]) -> Placement | None:
        """How `pod` fits `node` with `slices` free, or None; the placement may name another node alike."""
        return self._fits(pod, self._pod_number(pod), self._number(self.snapshot.nodes[node], slices), node, slices)

    def _fits(
        self, pod: PodRequest, pod_number: int, state: int, node: str, slices: Mapping[str, int]
    ) -> Placement | None:
        key = (pod_number, state)
        if key in self._verdicts:
            return self._verdicts[key]
        verdict = place(pod, _with_free(self.snapshot.nodes[node], slices), node, self.rules)
        placement = verdict if isinstance(verdict, Placement) else None
        self._verdicts[key] = placement
        return placement

    def _pod_number(self, pod: PodRequest) -> int:
        return self._pods.setdefault(_shape(pod), len(self._pods))

    def may_run_on(self, pod: PodRequest, node: str) -> bool:
        admitted = self._admitted.setdefault(pod.constraints, {})
        verdict = admitted.get(node)
        if verdict is None:
            verdict = admitted[node] = pod.may_run_on(self.snapshot.nodes[node])
        return verdict

    def best_spot(self, pod: PodRequest) -> Placement | None:
        """Where the scheduler would put a pending pod now, among the nodes it may run on: the cheapest, then
        the tightest fit, then the first name."""
        pod_number = self._pod_number(pod)
        best: Placement | None = None
        best_rank: tuple[int, int, str] | None = None
        for state in self._candidates(pod):
            members = self._members.get(state)
            if not members:
                continue
            placement = self._fits(pod, pod_number, state, members[0], self.nodes[members[0]])
            if placement is None or (best_rank is not None and (placement.cost, placement.leftover) > best_rank[:2]):
                continue
            for name in members:  # in name order: the first it may run on stands for the state
                if self.may_run_on(pod, name):
                    rank = (placement.cost, placement.leftover, name)
                    if best_rank is None or rank < best_rank:
                        best, best_rank = placement, rank
                    break
        if best is None or best_rank is None or best.node == best_rank[2]:
            return best
        return dataclasses.replace(best, node=best_rank[2])

    def _candidates(self, pod: PodRequest) -> Iterable[int]:
        """The states where `pod` could fit at all: for each type it asks for, one it could be granted is free.
        Every state for a request that is not plain."""
        if not _plain(pod.mig):
            return list(self._members)
        found: set[int] | None = None
        for types in self.usable(pod):
            states: set[int] = set()
            for resource in types:
                states.update(self._holding.get(resource, ()))
            found = states if found is None else found & states
            if not found:
                return ()
        return found or ()

    def usable(self, pod: PodRequest) -> tuple[frozenset[str], ...]:
        """Per type the pod asks for, the types it could be granted for it on some node of the fleet: its own,
        and those its chains let it borrow (as decide._options offers them), whatever the GPU model."""
        shape = _shape(pod)
        usable = self._usable.get(shape)
        if usable is None:
            borrows = pod.may_borrow and len(pod.mig) <= MAX_BORROW_DEMANDS
            usable = self._usable[shape] = tuple(
                frozenset(
                    {requested}
                    | {
                        option.granted
                        for product in (self._products if borrows else ())
                        for option in self.rules.borrow_options(requested, product, pod.namespace, pod.owner)
                        if option.allowed
                    }
                )
                for requested, _ in pod.mig
            )
        return usable

    def exact_home(self, borrower: Borrower) -> str | None:
        """The node the restored pod would land on: an exact fit of its original request where it may run,
        the tightest, then the first name. It comes back with the borrower's placement rules."""
        restored = restored_request(borrower)
        alike = (_shape(restored), restored.constraints)
        found = self._homes.get(alike)
        if found is None or found[0] != self.version:
            spot = self.best_spot(restored)  # an exact fit costs nothing: the tightest wins
            found = self._homes[alike] = (self.version, None if spot is None else spot.node)
        return found[1]


class _OnDemand:
    """The on-demand borrowers in the order they are tried, indexed by the types they hold and by node."""

    def __init__(self, borrowers: Sequence[Borrower]) -> None:
        self.borrowers = borrowers
        self.holding: dict[str, list[int]] = {}  # borrowed type -> positions
        self.on: dict[str, list[int]] = {}  # node -> positions
        self.asked: dict[MigCounts, set[int]] = {}  # original request -> positions
        for position, borrower in enumerate(borrowers):
            for resource, _ in borrower.loan.borrowed:
                self.holding.setdefault(resource, []).append(position)
            self.on.setdefault(borrower.record.node, []).append(position)
            self.asked.setdefault(borrower.loan.original, set()).add(position)

    def worth_trying(self, waiting: PodRequest, free: _Free) -> Iterable[Borrower]:
        """The borrowers whose return might make room for `waiting`, in order: the fleet has their original
        request free (`_Free.enough`), and a slice `waiting` could be granted is free on the borrower's node
        once the borrower gives its own back, so the borrower holds such a type, or the node has one free."""
        if waiting.constraints.depends_on_pods:
            return ()  # worth_a_return says no to every one
        returnable: set[int] = set()
        for original, asking in self.asked.items():
            if free.enough(original):
                returnable |= asking
        if not _plain(waiting.mig):
            return [self.borrowers[position] for position in sorted(returnable)]
        types = frozenset().union(*free.usable(waiting))
        positions: set[int] = set()
        for resource in types:
            positions.update(self.holding.get(resource, ()))
        for node in free.with_free(types, among=self.on):
            positions.update(self.on[node])
        return [self.borrowers[position] for position in sorted(positions & returnable)]


def restored_request(borrower: Borrower) -> PodRequest:
    """What the borrower's pod asks for once returned: its original slices, no borrowing, the same placement rules."""
    return dataclasses.replace(borrower.record.request, mig=borrower.loan.original, no_borrow="restoring a borrower")


def _plus(slices: Mapping[str, int], counts: MigCounts) -> dict[str, int]:
    added = dict(slices)
    for resource, count in counts:
        added[resource] = added.get(resource, 0) + count
    return added


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
