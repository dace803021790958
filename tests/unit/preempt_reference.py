"""The preemption planner's search as it was before it was made fast at fleet scale; kept as the reference.

extender/core/preempt.py must plan exactly what this plans (tests/unit/test_planner_speed.py):
the same preemptors, nodes, victims, fates and placements, in the same order. The rules that are
not the search (who may preempt, what a victim is, how nodes rank) are the module's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping

from extender.core.cluster import MigCounts, NodeState, PodRecord, PodRequest, Snapshot
from extender.core.decide import Placement, place
from extender.core.loan import Loan, loan_of
from extender.core.preempt import (
    MAX_PREEMPTIONS_PER_ROUND,
    Eligibility,
    FreeKey,
    Preemption,
    Victim,
    _importance,
    _may_preempt,
    _rank,
    candidates_to_find,
    placement_rules,
)
from extender.core.rules import ChainRules


def plan_preemptions(
    snapshot: Snapshot,
    records: Iterable[PodRecord],
    rules: ChainRules,
    *,
    schedulers: Collection[str] | None = None,
    may_run_on: Eligibility = placement_rules,
    claims: Iterable[tuple[str, MigCounts]] = (),
    waiting: Collection[str] = (),
    spared: Collection[str] = (),
) -> tuple[Preemption, ...]:
    """The preemptions to carry out now, highest-priority preemptor first.

    `schedulers`: only pods of these schedulers, and not gated, preempt (None: any). `claims`:
    slices promised already (returns under way), not free. `waiting`: keys of
    pending pods room is being made for already (a return, a preemption under
    way): they do not preempt. `spared`: UIDs of pods that may not be victims
    now (a PodDisruptionBudget refused their eviction; they are being returned).
    """
    records = list(records)
    state = _Round(snapshot, rules, may_run_on)
    for node, counts in claims:
        if node in state.free:
            state.take(node, counts)
    leaving: dict[str, list[PodRecord]] = {}
    for record in records:
        if record.holds_slices and record.node in state.free:
            if record.terminating:
                leaving.setdefault(record.node, []).append(record)
            elif record.request.uid not in spared:
                state.holders.setdefault(record.node, []).append(record)
    for holders in state.holders.values():
        holders.sort(key=lambda holder: holder.request.priority)  # the lowest first: a quick test per node
    pending = sorted(
        (r for r in records if not r.node and not r.terminal and not r.terminating and r.request.mig),
        key=lambda r: (-r.request.priority, r.created, r.request.key),
    )
    plans: list[Preemption] = []
    for record in pending:
        spot = state.spot(record)
        if spot is not None:
            state.take(spot.node, spot.slices)  # it will be scheduled there: no one else may count it
            continue
        if len(plans) >= MAX_PREEMPTIONS_PER_ROUND or not _may_preempt(record, schedulers, waiting, leaving):
            continue
        plan = state.best_preemption(record)
        if plan is not None:
            plans.append(state.commit(plan))
    return tuple(plans)


class _Round:
    """The free slices and the available victims during one planning round."""

    def __init__(self, snapshot: Snapshot, rules: ChainRules, may_run_on: Eligibility) -> None:
        self.snapshot = snapshot
        self.rules = rules
        self.may_run_on = may_run_on
        self.free = {name: dict(node.free) for name, node in sorted(snapshot.nodes.items()) if node.offers_slices}
        self.holders: dict[str, list[PodRecord]] = {}  # node -> pods holding slices there that may be victims
        self.enough = candidates_to_find(len(self.free))
        # Nodes alike in all but their name and free slices (most of a fleet) are decided alike: a verdict is
        # remembered by pod, node shape and free slices, and nodes are grouped by shape and free slices, so a
        # search over thousands of nodes costs a few decisions.
        self._shapes = {
            name: repr((node.gpu_product, node.mig_config_state, sorted(node.allocatable.items())))
            for name, node in snapshot.nodes.items()
        }
        self._verdicts: dict[tuple[PodRequest, str, FreeKey], Placement | None] = {}
        self._group_of: dict[str, tuple[str, FreeKey]] = {}
        self._groups: dict[tuple[str, FreeKey], set[str]] = {}
        for name in self.free:
            self._regroup(name)

    def _regroup(self, node: str) -> None:
        before = self._group_of.get(node)
        if before is not None:
            self._groups[before].discard(node)
            if not self._groups[before]:
                del self._groups[before]
        group = (self._shapes[node], _key(self.free[node]))
        self._group_of[node] = group
        self._groups.setdefault(group, set()).add(node)

    def take(self, node: str, counts: MigCounts) -> None:
        _take(self.free[node], counts)
        self._regroup(node)

    def give(self, node: str, counts: MigCounts) -> None:
        _give(self.free[node], counts)
        self._regroup(node)

    def fits(
        self, pod: PodRequest, node: str, free: Mapping[str, int], free_key: FreeKey | None = None
    ) -> Placement | None:
        """How the pod fits `free` on `node`, or None; the placement may name another node of the same shape."""
        key = (pod, self._shapes[node], _key(free) if free_key is None else free_key)
        if key in self._verdicts:
            return self._verdicts[key]
        verdict = place(pod, _with_free(self.snapshot.nodes[node], free), node, self.rules)
        placement = verdict if isinstance(verdict, Placement) else None
        self._verdicts[key] = placement
        return placement

    def best_node(self, pod: PodRequest) -> str:
        """Where the pod fits best now: the cheapest, then tightest fit, then the name; "" for nowhere."""
        best: tuple[int, int, str] | None = None
        for (_, free_key), members in self._groups.items():
            placement = self.fits(pod, next(iter(members)), self.free[next(iter(members))], free_key)
            if placement is None or (best is not None and (placement.cost, placement.leftover) > best[:2]):
                continue
            for name in sorted(members):
                if self.may_run_on(pod, self.snapshot.nodes[name]):
                    if best is None or (placement.cost, placement.leftover, name) < best:
                        best = (placement.cost, placement.leftover, name)
                    break
        return "" if best is None else best[2]

    def placement(self, pod: PodRequest, node: str, free: Mapping[str, int]) -> Placement | None:
        """`fits`, naming `node`."""
        placement = self.fits(pod, node, free)
        if placement is None or placement.node == node:
            return placement
        return dataclasses.replace(placement, node=node)

    def grantable(self, pod: PodRequest, node: NodeState) -> frozenset[str]:
        """The types the pod could be granted on the node (a superset will do): only holders of these can make
        room for it; the others would be put back anyway."""
        types = {resource for resource, _ in pod.mig}
        if pod.may_borrow:
            for resource, _ in pod.mig:
                options = self.rules.borrow_options(resource, node.gpu_product, pod.namespace)
                types.update(option.granted for option in options if option.allowed)
        return frozenset(types)

    def spot(self, record: PodRecord) -> Placement | None:
        """Where the pending pod fits now: its nominated node first (kube-scheduler tries it first), else the
        cheapest, then tightest fit, then the name."""
        pod = record.request
        nominated = record.nominated
        if nominated in self.free and self.may_run_on(pod, self.snapshot.nodes[nominated]):
            placement = self.placement(pod, nominated, self.free[nominated])
            if placement is not None:
                return placement
        best = self.best_node(pod)
        return self.placement(pod, best, self.free[best]) if best else None

    def home(self, record: PodRecord, loan: Loan) -> str:
        """A node where a borrower's original request fits exactly now, the tightest; "" when none."""
        return self.best_node(dataclasses.replace(record.request, mig=loan.original, no_borrow="restoring a borrower"))

    def best_preemption(self, record: PodRecord) -> Preemption | None:
        pod = record.request
        fates: dict[str, Victim] = {}  # victims as they would fare, by uid: computed once per preemptor
        grantable: dict[str, frozenset[str]] = {}  # by GPU model
        found: list[tuple[tuple[object, ...], Preemption]] = []
        for name, holders in sorted(self.holders.items()):
            if len(found) >= self.enough:
                break
            node = self.snapshot.nodes[name]
            if not holders or holders[0].request.priority >= pod.priority or not self.may_run_on(pod, node):
                continue
            if self.fits(pod, name, node.allocatable) is None:
                continue  # not even on the node emptied
            types = grantable.get(node.gpu_product)
            if types is None:
                types = grantable[node.gpu_product] = self.grantable(pod, node)
            lower = [
                holder
                for holder in holders
                if holder.request.priority < pod.priority and any(t in types for t, _ in holder.request.mig)
            ]
            if not lower:
                continue
            victims = [self._victim(holder, fates) for holder in lower]
            plan = self._victims_on(record, name, victims)
            if plan is not None:
                found.append((_rank(plan), plan))
        return min(found, key=lambda item: item[0])[1] if found else None

    def _victim(self, record: PodRecord, fates: dict[str, Victim]) -> Victim:
        victim = fates.get(record.request.uid)
        if victim is None:
            loan = loan_of(record.migchain)
            victim = Victim(record, loan, self.home(record, loan) if loan is not None else "")
            fates[record.request.uid] = victim
        return victim

    def _victims_on(self, record: PodRecord, node: str, lower: list[Victim]) -> Preemption | None:
        """SelectVictimsOnNode: every lower-priority pod out; then each back, most important first, if the pod
        still fits; those that cannot come back are the victims."""
        trial = dict(self.free[node])
        for victim in lower:
            _give(trial, victim.record.request.mig)
        if self.fits(record.request, node, trial) is None:
            return None
        victims = []
        for victim in sorted(lower, key=_importance):
            _take(trial, victim.record.request.mig)
            if self.fits(record.request, node, trial) is None:
                _give(trial, victim.record.request.mig)
                victims.append(victim)
        placement = self.placement(record.request, node, trial)  # it fits: it did after each victim put back
        return None if placement is None else Preemption(record, node, tuple(victims), placement)

    def commit(self, plan: Preemption) -> Preemption:
        """Count what the plan does: victims gone, the preemptor's slices taken, returned borrowers' homes taken."""
        taken = {victim.record.request.uid for victim in plan.victims}
        self.holders[plan.node] = [r for r in self.holders[plan.node] if r.request.uid not in taken]
        for victim in plan.victims:
            self.give(plan.node, victim.record.request.mig)
        self.take(plan.node, plan.placement.slices)
        return dataclasses.replace(plan, victims=tuple(map(self._send_home, plan.victims)))

    def _send_home(self, victim: Victim) -> Victim:
        """A borrower victim with its home looked for again (the preemptor may just have taken the slice it
        was to return to), and that home's slices taken."""
        if victim.loan is None:
            return victim
        home = self.home(victim.record, victim.loan)
        if home:
            self.take(home, victim.loan.original)
        return dataclasses.replace(victim, home=home)


def _with_free(node: NodeState, free: Mapping[str, int]) -> NodeState:
    """The node as if `free` were what it has free (used = allocatable - free)."""
    used = {resource: count - free.get(resource, 0) for resource, count in node.allocatable.items()}
    return dataclasses.replace(node, used=used)


def _key(free: Mapping[str, int]) -> FreeKey:
    return tuple(sorted(free.items()))


def _take(free: dict[str, int], counts: MigCounts) -> None:
    for resource, count in counts:
        free[resource] = free.get(resource, 0) - count


def _give(free: dict[str, int], counts: MigCounts) -> None:
    for resource, count in counts:
        free[resource] = free.get(resource, 0) + count
