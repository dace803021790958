"""Priority preemption of MIG slices: which lower-priority pods make room for a pending pod, and where; pure.

kube-scheduler's own preemption cannot free a MIG slice: the MIG resources are
`ignoredByScheduler` (migchain is their one judge), so its dry run finds the
pod fitting every node with no victim and gives up ("expected at least one
victim pod on node") before an extender's preempt verb would be asked. The
returner preempts instead, and decides here the way kube-scheduler does
(pkg/scheduler/framework/preemption and plugins/defaultpreemption):

- a pod its scheduler found unschedulable may preempt, unless its
  preemptionPolicy is Never or the victims of its last preemption are still
  leaving its nominated node (PodEligibleToPreemptOthers);
- never for a pod that fits somewhere now, exactly or by a borrow: a borrow
  costs no one anything;
- victims are pods of strictly lower priority holding slices on one node: all
  of them are taken out, then put back one by one, the most important first,
  while the pod still fits (SelectVictimsOnNode), so no victim is needless;
- among nodes, one rule of migchain's own comes first: a borrower (returned to
  its own type if a slice of it is free, else back to Pending) is a cheaper
  victim than a pod that fits exactly (evicted). Then pickOneNodeForPreemption's
  order: the lowest highest victim priority, the lowest sum of priorities, the
  fewest victims, the latest created of the highest-priority victims; then the
  cheapest placement, then the node name.

Pending pods are taken highest priority first, as kube-scheduler's queue takes
them, and a pod that fits takes its slices, so a lower-priority pod never
counts a slice a higher one will take; a victim and a freed slice count once.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from extender.core.cluster import MigCounts, NodeState, PodRecord, PodRequest, Snapshot
from extender.core.decide import Placement, place
from extender.core.loan import Loan, record_loan
from extender.core.rules import ChainRules, OwnerKind

PREEMPT_NEVER = "Never"  # spec.preemptionPolicy of a pod that waits rather than preempts

# kube-scheduler's DefaultPreemption defaults: it stops looking once it has
# candidates on 10 % of the nodes, at least 100 (minCandidateNodesPercentage,
# minCandidateNodesAbsolute).
MIN_CANDIDATE_NODES_PERCENT = 10
MIN_CANDIDATE_NODES = 100
# kube-scheduler preempts for one pod per scheduling cycle; a round plans at
# most this many, so a burst of preemptors on a large full cluster does not
# stall the returner. The rest follow in the next rounds, which the evictions
# themselves bring on.
MAX_PREEMPTIONS_PER_ROUND = 16

# A victim's fate, cheapest first: the order migchain prefers them in.
RETURNED = "returned"  # a borrower, restored to its own type on a slice free now
PENDING = "pending"  # a borrower, restored to its own type and Pending until one frees
EVICTED = "evicted"  # a pod that fits exactly: evicted, as kube-scheduler's preemption does
_FATES = (RETURNED, PENDING, EVICTED)

Eligibility = Callable[[PodRequest, NodeState], bool]
FreeKey = tuple[tuple[str, int], ...]  # a node's free slices, sorted: a dictionary key


def placement_rules(pod: PodRequest, node: NodeState) -> bool:
    """The default eligibility: the pod's own placement rules (nodeSelector, required affinity, tolerations)."""
    return pod.may_run_on(node)


@dataclass(frozen=True)
class Victim:
    record: PodRecord
    loan: Loan | None  # a borrower's loan: it is restored to its original request, not evicted for good
    home: str = ""  # for a borrower: a node with its own type free now; "" when it goes back to Pending

    @property
    def fate(self) -> str:
        if self.loan is None:
            return EVICTED
        return RETURNED if self.home else PENDING

    def describe(self) -> str:
        request = self.record.request
        fate = {
            EVICTED: "evicted",
            RETURNED: f"returned to its own type (free on {self.home})",
            PENDING: "returned to its own type, Pending until one frees",
        }[self.fate]
        return f"{request.key} (priority {request.priority}, {fate})"


@dataclass(frozen=True)
class Preemption:
    """Evict `victims` on `node` so that `preemptor` fits there as `placement`."""

    preemptor: PodRecord
    node: str
    victims: tuple[Victim, ...]
    placement: Placement

    def describe(self) -> str:
        return (
            f"preempting {len(self.victims)} pod(s) of lower priority on {self.node} for "
            f"{self.preemptor.request.key} (priority {self.preemptor.request.priority}), which then "
            f"{self.placement.describe()}: " + ", ".join(victim.describe() for victim in self.victims)
        )


def candidates_to_find(cluster_size: int) -> int:
    """How many candidate nodes kube-scheduler's DefaultPreemption evaluates before it picks one."""
    return min(cluster_size, max(cluster_size * MIN_CANDIDATE_NODES_PERCENT // 100, MIN_CANDIDATE_NODES))


def yield_to_nominated(
    snapshot: Snapshot, pod: PodRequest, nominated: Mapping[str, tuple[str, PodRequest]], rules: ChainRules
) -> Snapshot:
    """The cluster as `pod` should see it: what pods nominated to a node, of its priority or higher, will take there.

    A preemption nominates its pod to the node it made room on. Until that pod
    is bound, the slices it fits on that node are its own against every pod of
    lower or equal priority, as kube-scheduler counts nominated pods for its
    in-tree resources (addGENominatedPods); otherwise the first pod to come,
    often the victim itself back as Pending, would take the freed slice.
    """
    ahead: dict[str, list[PodRequest]] = {}
    for uid, (node, nominee) in nominated.items():
        if uid != pod.uid and nominee.priority >= pod.priority and node in snapshot.nodes:
            ahead.setdefault(node, []).append(nominee)
    if not ahead:
        return snapshot
    return snapshot.with_nodes(
        {name: _after(snapshot.nodes[name], nominees, rules) for name, nominees in ahead.items()}
    )


def node_after_nominated(
    node: NodeState | None, pod: PodRequest, nominated: Mapping[str, tuple[str, PodRequest]], rules: ChainRules
) -> NodeState | None:
    """`yield_to_nominated` for one node: the node as a bind of `pod` should see it."""
    if node is None:
        return None
    nominees = [
        nominee
        for uid, (name, nominee) in nominated.items()
        if name == node.name and uid != pod.uid and nominee.priority >= pod.priority
    ]
    return _after(node, nominees, rules) if nominees else node


def _after(node: NodeState, nominees: list[PodRequest], rules: ChainRules) -> NodeState:
    """The node with the slices each nominee fits there counted as used: highest priority first, then by name."""
    for nominee in sorted(nominees, key=lambda request: (-request.priority, request.key)):
        verdict = place(nominee, node, node.name, rules)
        if isinstance(verdict, Placement):
            node = _using(node, verdict.slices)
    return node


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
    pending = []
    for record in records:  # one pass over every pod of the cluster: the holders of slices, and the pending
        if record.terminal or not record.request.mig:
            continue
        if not record.node:
            if not record.terminating:
                pending.append(record)
        elif record.node in state.free:
            if record.terminating:
                leaving.setdefault(record.node, []).append(record)
            elif record.request.uid not in spared:
                state.holders.setdefault(record.node, []).append(record)
    by_priority = operator.attrgetter("request.priority")
    for holders in state.holders.values():
        holders.sort(key=by_priority)  # the lowest first: a quick test per node
    pending.sort(key=lambda r: (-r.request.priority, r.created, r.request.key))
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


def _may_preempt(
    record: PodRecord,
    schedulers: Collection[str] | None,
    waiting: Collection[str],
    leaving: Mapping[str, list[PodRecord]],
) -> bool:
    """PodEligibleToPreemptOthers: found unschedulable by its scheduler, allowed to, not waiting for victims."""
    if schedulers is not None and not record.waits_for(schedulers):
        return False
    if not record.unschedulable or record.preemption_policy == PREEMPT_NEVER or record.request.key in waiting:
        return False
    priority = record.request.priority
    return not any(other.request.priority < priority for other in leaving.get(record.nominated, ()))


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
        # remembered by what `place` reads of the pod (its slices, whether it may borrow, its namespace: the
        # pods of a workload share it), node shape and free slices, and nodes are grouped by shape and free
        # slices, so a search over thousands of nodes for hundreds of pending pods costs a few decisions.
        self._shapes = {name: node.layout for name, node in snapshot.nodes.items()}
        self._verdicts: dict[tuple[tuple[MigCounts, bool, str, OwnerKind | None], str, FreeKey], Placement | None] = {}
        self._group_of: dict[str, tuple[str, FreeKey]] = {}
        self._groups: dict[tuple[str, FreeKey], set[str]] = {}
        for name in self.free:
            self._regroup(name)
        # What a search found holds while what it read stands: `version` counts changes of the free slices,
        # `commits` the plans counted (the only changes that free slices or remove victims).
        self.version = 0
        self.commits = 0
        self._homes: dict[object, tuple[int, str]] = {}  # restored request -> (version, its home)
        self._selections: dict[object, tuple[tuple[int, ...], Placement] | None] = {}  # see _victims_on
        self._below: dict[int, list[str]] = {}  # priority -> nodes holding a pod of lower priority, by name
        self._hopeless: dict[object, int] = {}  # preemptor -> `commits` when it found no plan
        self._nowhere: dict[object, int] = {}  # pod -> `commits` when it fitted no node
        self._lowers: dict[tuple[str, int, frozenset[str]], tuple[list[PodRecord], list[PodRecord]]] = {}
        self._known: dict[str, Victim] = {}  # possible victims by uid, as last found

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
        self.version += 1

    def give(self, node: str, counts: MigCounts) -> None:
        _give(self.free[node], counts)
        self._regroup(node)
        self.version += 1

    def _alike(self, pod: PodRequest, *more: object) -> object:
        """A key for what a search reads of `pod`: its shape and placement rules (the pods of a workload share
        them), or, with an eligibility test of the caller's own, the pod itself."""
        if self.may_run_on is placement_rules:
            return ((pod.mig, pod.may_borrow, pod.namespace, pod.owner), pod.constraints, *more)
        return (pod, *more)

    def fits(
        self, pod: PodRequest, node: str, free: Mapping[str, int], free_key: FreeKey | None = None
    ) -> Placement | None:
        """How the pod fits `free` on `node`, or None; the placement may name another node of the same shape."""
        key = (
            (pod.mig, pod.may_borrow, pod.namespace, pod.owner),
            self._shapes[node],
            _key(free) if free_key is None else free_key,
        )
        if key in self._verdicts:
            return self._verdicts[key]
        verdict = place(pod, _with_free(self.snapshot.nodes[node], free), node, self.rules)
        placement = verdict if isinstance(verdict, Placement) else None
        self._verdicts[key] = placement
        return placement

    def best_node(self, pod: PodRequest) -> str:
        """Where the pod fits best now: the cheapest, then tightest fit, then the name; "" for nowhere.

        Until a plan is counted slices are only taken, so a pod that fits nowhere fits nowhere until then:
        the pods of a workload waiting alike are looked for once."""
        alike = self._alike(pod)
        if self._nowhere.get(alike) == self.commits:
            return ""
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
        if best is None:
            self._nowhere[alike] = self.commits
            return ""
        return best[2]

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
                options = self.rules.borrow_options(resource, node.gpu_product, pod.namespace, pod.owner)
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
        request = record.request
        alike: object = ((loan.original, False, request.namespace), request.constraints)  # `_alike`, restored
        if self.may_run_on is not placement_rules:
            alike = record.request.uid
        found = self._homes.get(alike)
        if found is None or found[0] != self.version:
            restored = dataclasses.replace(request, mig=loan.original, no_borrow="restoring a borrower")
            found = self._homes[alike] = (self.version, self.best_node(restored))
        return found[1]

    def _lower_than(self, priority: int) -> list[str]:
        """The nodes holding a pod of lower priority than `priority` that may be a victim, in name order."""
        below = self._below.get(priority)
        if below is None:
            below = self._below[priority] = [
                name
                for name, holders in sorted(self.holders.items())
                if holders and holders[0].request.priority < priority
            ]
        return below

    def best_preemption(self, record: PodRecord) -> Preemption | None:
        pod = record.request
        # A preemptor with no plan has none until a plan is counted: until then slices are only taken, and
        # with fewer free slices no node that could not make room for it can.
        alike = self._alike(pod, pod.priority)
        if self._hopeless.get(alike) == self.commits:
            return None
        fates: dict[str, Victim] = {}  # victims as they would fare, by uid: computed once per preemptor
        grantable: dict[str, frozenset[str]] = {}  # by GPU model
        found: list[tuple[tuple[object, ...], Preemption]] = []
        for name in self._lower_than(pod.priority):
            if len(found) >= self.enough:
                break
            node, holders = self.snapshot.nodes[name], self.holders[name]
            if not self.may_run_on(pod, node):
                continue
            if self.fits(pod, name, node.allocatable) is None:
                continue  # not even on the node emptied
            types = grantable.get(node.gpu_product)
            if types is None:
                types = grantable[node.gpu_product] = self.grantable(pod, node)
            lower = self._lower(name, holders, pod.priority, types)
            if not lower:
                continue
            victims = [self._victim(holder, fates) for holder in lower]
            plan = self._victims_on(record, name, victims)
            if plan is not None:
                found.append((_rank(plan), plan))
        if not found:
            self._hopeless[alike] = self.commits
            return None
        return min(found, key=lambda item: item[0])[1]

    def _lower(self, node: str, holders: list[PodRecord], priority: int, types: frozenset[str]) -> list[PodRecord]:
        """The pods on `node` of lower priority than `priority` holding one of `types`: those that could make
        room. Remembered until the node's holders change (a plan on it is counted)."""
        key = (node, priority, types)
        found = self._lowers.get(key)
        if found is None or found[0] is not holders:
            lower = [
                holder
                for holder in holders
                if holder.request.priority < priority and any(t in types for t, _ in holder.request.mig)
            ]
            found = self._lowers[key] = (holders, lower)
        return found[1]

    def _victim(self, record: PodRecord, fates: dict[str, Victim]) -> Victim:
        victim = fates.get(record.request.uid)
        if victim is None:
            # The same pod is a possible victim of every preemptor of higher priority: its loan is read once a
            # round, and the victim made anew only when its home changed.
            known = self._known.get(record.request.uid)
            read = record_loan(record) if known is None else known.loan
            loan = read if isinstance(read, Loan) else None  # a record that cannot be read makes no borrower
            home = self.home(record, loan) if loan is not None else ""
            victim = known if known is not None and known.home == home else Victim(record, loan, home)
            fates[record.request.uid] = self._known[record.request.uid] = victim
        return victim

    def _victims_on(self, record: PodRecord, node: str, lower: list[Victim]) -> Preemption | None:
        """SelectVictimsOnNode: every lower-priority pod out; then each back, most important first, if the pod
        still fits; those that cannot come back are the victims.

        Which of them cannot come back depends only on the pod's shape, the node's shape and free slices, and
        the slices of the victims in that order: remembered by those, nodes alike are decided once."""
        ordered = sorted(lower, key=_importance)
        pod = record.request
        key = (
            (pod.mig, pod.may_borrow, pod.namespace, pod.owner),
            self._shapes[node],
            _key(self.free[node]),
            tuple(victim.record.request.mig for victim in ordered),
        )
        if key not in self._selections:
            self._selections[key] = self._select(pod, node, [victim.record.request.mig for victim in ordered])
        selected = self._selections[key]
        if selected is None:
            return None
        chosen, placement = selected
        if placement.node != node:
            placement = dataclasses.replace(placement, node=node)
        return Preemption(record, node, tuple(ordered[index] for index in chosen), placement)

    def _select(self, pod: PodRequest, node: str, ordered: list[MigCounts]) -> tuple[tuple[int, ...], Placement] | None:
        """`_victims_on` for victims holding `ordered`, most important first: the positions of those that
        cannot come back, and the pod's placement then; None when it does not fit even with all of them gone."""
        trial = dict(self.free[node])
        for slices in ordered:
            _give(trial, slices)
        if self.fits(pod, node, trial) is None:
            return None
        chosen = []
        for index, slices in enumerate(ordered):
            _take(trial, slices)
            if self.fits(pod, node, trial) is None:
                _give(trial, slices)
                chosen.append(index)
        placement = self.placement(pod, node, trial)  # it fits: it did after each victim put back
        return None if placement is None else (tuple(chosen), placement)

    def commit(self, plan: Preemption) -> Preemption:
        """Count what the plan does: victims gone, the preemptor's slices taken, returned borrowers' homes taken."""
        taken = {victim.record.request.uid for victim in plan.victims}
        self.holders[plan.node] = [r for r in self.holders[plan.node] if r.request.uid not in taken]
        self.commits += 1
        self._below.clear()
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


def _importance(victim: Victim) -> tuple[object, ...]:
    """Most important first (the last to be a victim): a pod that fits exactly before a borrower, then
    MoreImportantVictim: higher priority, earlier created, then the name."""
    request = victim.record.request
    return (-_FATES.index(victim.fate), -request.priority, victim.record.created, request.key)


def _rank(plan: Preemption) -> tuple[object, ...]:
    """Lower is better: see the module docstring for the order."""
    fates = [victim.fate for victim in plan.victims]
    priorities = [victim.record.request.priority for victim in plan.victims]
    highest = max(priorities)
    # kube-scheduler adds MaxInt32+1 to each priority, so that more victims never sum lower.
    total = sum(priority + 2**31 for priority in priorities)
    earliest = min(v.record.created for v in plan.victims if v.record.request.priority == highest)
    return (
        fates.count(EVICTED),
        fates.count(PENDING),
        highest,
        total,
        len(plan.victims),
        _later_first(earliest),
        plan.placement.cost,
        plan.node,
    )


def _later_first(timestamp: str) -> tuple[int, ...]:
    """A sort key that puts later RFC 3339 timestamps first."""
    return tuple(-int(number) for number in re.findall(r"\d+", timestamp))


def _with_free(node: NodeState, free: Mapping[str, int]) -> NodeState:
    """The node as if `free` were what it has free (used = allocatable - free)."""
    used = {resource: count - free.get(resource, 0) for resource, count in node.allocatable.items()}
    return dataclasses.replace(node, used=used)


def _using(node: NodeState, slices: MigCounts) -> NodeState:
    used = dict(node.used)
    for resource, count in slices:
        used[resource] = used.get(resource, 0) + count
    return dataclasses.replace(node, used=used)


def _key(free: Mapping[str, int]) -> FreeKey:
    return tuple(sorted(free.items()))


def _take(free: dict[str, int], counts: MigCounts) -> None:
    for resource, count in counts:
        free[resource] = free.get(resource, 0) - count


def _give(free: dict[str, int], counts: MigCounts) -> None:
    for resource, count in counts:
        free[resource] = free.get(resource, 0) + count
