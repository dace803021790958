"""The discrete-event simulator: pods arrive, are placed, run, complete and are returned by the SAME pure core.

Placement is `filter_nodes` + `score_nodes` + `place` over the nodes a pod
may run on (`PodRequest.may_run_on`), as kube-scheduler and the live extender
decide; returns are `plan_returns`, as the returner decides. Trace pods carry
no placement rules: they may run on every node, tainted ones too.
No I/O, no clock: a run is a function of (fleet, rules, jobs, policy).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from extender.core.cluster import (
    DEMAND_BUCKET_SECONDS,
    Demand,
    MigCounts,
    NodeState,
    PodRecord,
    PodRequest,
    Snapshot,
    demand_bucket,
)
from extender.core.constraints import NodeConstraints
from extender.core.decide import Placement, filter_nodes, place, score_nodes
from extender.core.geometry import compute_of, compute_slices
from extender.core.headroom import lending_rules
from extender.core.loan import Loan
from extender.core.mig import parse_mig_resource
from extender.core.recarve import (
    HOUR,
    CarvableNode,
    Recarve,
    RecarvePolicy,
    carvable_node,
    finish_drain,
    plan_drains,
    plan_recarves,
    spare_slices,
    unmet_demand,
)
from extender.core.returns import Borrower, loan_policy, plan_returns
from extender.core.rules import MAX_HEADROOM_SECONDS, ChainRules, ReturnMode


class SimPolicy(enum.Enum):
    STATIC = "static"  # no borrowing: the plain mixed strategy
    EAGER = "eager"  # borrow, and return eagerly (the reference behaviour)
    ON_DEMAND = "on-demand"  # borrow, and return only when it unblocks a pending pod
    NEVER = "never"  # borrow, and never return: what returns buy is measured against it
    RECARVE = "recarve"  # borrow, return on demand, and re-carve whole idle nodes when demand stays unmet


RECARVE_ROUND_SECONDS = 30.0  # how often the re-carver looks at unmet demand, as the returner's loop would
RECONFIGURE_SECONDS = 120.0  # a node offers no MIG slice while the MIG manager applies a layout


@dataclass(frozen=True)
class Job:
    name: str
    arrival: float  # seconds from the start of the trace
    mig: MigCounts  # the MIG slices it asks for, as PodRequest.mig: ((resource, count), ...), sorted and merged
    runtime: float  # seconds of work it needs

    def __post_init__(self) -> None:
        if isinstance(self.mig, str):  # the one-resource Job of old: a string would iterate as characters
            raise TypeError(f"Job.mig takes ((resource, count), ...), e.g. (({self.mig!r}, 1),), not a resource name")
        merged: dict[str, int] = {}
        for resource, count in self.mig:
            merged[resource] = merged.get(resource, 0) + count
        object.__setattr__(self, "mig", tuple(sorted(merged.items())))


def _requested_type(job: Job) -> str:
    """The type a pod is counted under in per-type figures: its largest requested type (most compute, then memory).

    A pod of several types waits for all of them; the largest is the one hardest to find free.
    """
    return max(job.mig, key=lambda item: parse_mig_resource(item[0]))[0]


@dataclass(frozen=True)
class Running:
    """A pod already running when the replay starts (`migchain simulate --from-cluster`).

    Its remaining runtime is unknown, so it holds `slices` on `node` for the
    whole replay: it never finishes, is never returned and never moves.
    """

    name: str
    node: str
    slices: MigCounts  # what it holds (for a borrower, the larger types it was granted)
    asked: MigCounts  # what it asked for: the useful work it does


@dataclass
class _Pod:
    job: Job
    pending_since: float
    waited: float = 0.0
    node: str = ""
    placement: Placement | None = None
    started: float = 0.0
    epoch: int = 0  # bumped on every restart, so a stale finish event is ignored
    restarts: int = 0
    placed_once: bool = False
    finished: float | None = None

    @functools.cached_property  # asked for on every schedule and return round, for every pending pod
    def request(self) -> PodRequest:
        return PodRequest("default", self.job.name, self.job.name, self.job.mig)


@dataclass
class Metrics:
    pods: int = 0
    never_placed: int = 0
    mean_pending_s: float = 0.0  # pods still pending at the end count, censored at the end of the run
    p95_pending_s: float = 0.0
    mean_pending_by_type_s: dict[str, float] = field(default_factory=dict)  # the same waits, per requested type
    p95_pending_by_type_s: dict[str, float] = field(default_factory=dict)
    borrows: int = 0
    restarts: int = 0
    lost_work_slice_hours: float = 0.0  # compute-slice hours of work thrown away by restarts
    useful_utilisation: float = 0.0  # compute slices asked for x time, over capacity x horizon
    held_utilisation: float = 0.0  # compute slices held (borrowed ones count whole) x time, over the same
    utilisation_by_type: dict[str, float] = field(default_factory=dict)  # slice-hours held / offered, per type
    timeline: list[tuple[float, float, int]] = field(default_factory=list)  # (time, useful utilisation, pending)
    # Where every pod ended: finished + running + pending == pods, or a pod was lost (the soak checks it).
    finished: int = 0
    running_at_end: int = 0
    pending_at_end: int = 0
    recarves: int = 0  # nodes re-carved (recarve policy)
    max_recarves_node_hour: int = 0  # the most re-carves of one node within any hour
    reconfiguring_gpu_hours: float = 0.0  # GPU-hours offered nothing while a MIG manager applied a layout


def _mean_and_p95(waits: list[float]) -> tuple[float, float]:
    waits = sorted(waits)
    return sum(waits) / len(waits), waits[min(len(waits) - 1, math.ceil(0.95 * len(waits)) - 1)]


def rules_for(policy: SimPolicy, rules: ChainRules) -> ChainRules:
    """The chains a policy runs with: none for static; the given ones, on-demand, as their policy says; the
    given ones with the plain eager or never policy otherwise (no headroom kept, nothing waited for)."""
    if policy is SimPolicy.STATIC:
        return ChainRules([])
    if policy in (SimPolicy.ON_DEMAND, SimPolicy.RECARVE):
        return ChainRules(
            dataclasses.replace(chain, policy=dataclasses.replace(chain.policy, return_mode=ReturnMode.ON_DEMAND))
            for chain in rules.chains
        )
    # eager and never are the references: every free slice lent, and (eager) taken back at once.
    mode = ReturnMode.EAGER if policy is SimPolicy.EAGER else ReturnMode.NEVER
    return ChainRules(
        dataclasses.replace(
            chain,
            policy=dataclasses.replace(chain.policy, return_mode=mode, headroom_seconds=0, reclaim_after_seconds=0),
        )
        for chain in rules.chains
    )


def simulate(
    nodes: Sequence[NodeState],
    rules: ChainRules,
    jobs: Iterable[Job],
    policy: SimPolicy,
    *,
    horizon: float | None = None,
    sample_every: float = 600.0,
    observe: Callable[[Snapshot, Mapping[str, tuple[str, MigCounts]]], None] | None = None,
    initial: Sequence[Running] = (),
    recarve: RecarvePolicy | None = None,
    reconfigure_seconds: float = RECONFIGURE_SECONDS,
) -> Metrics:
    """Replay `jobs` on `nodes` under `policy`; utilisation is measured over [0, horizon] (default: last arrival).

    `initial` pods run from the start to the end, on the slices they hold: they count in utilisation, not in
    the pod counts, pending times, borrows or restarts, which are the trace's. `observe`, if given, sees the
    nodes and the running pods (name -> node, slices; initial ones too) after every step: tests check
    conservation with it. Under the recarve policy, `recarve` (default: `RecarvePolicy()`) rules the re-carver and
    a node offers no slice for `reconfigure_seconds` while its new layout is applied (the device plugin's drop).
    """
    run = _Run(list(nodes), rules_for(policy, rules), sorted(jobs, key=lambda job: (job.arrival, job.name)), initial)
    run.observe = observe
    if policy is SimPolicy.RECARVE:
        run.recarve = recarve or RecarvePolicy()
        run.reconfigure_seconds = reconfigure_seconds
    return run.go(horizon, sample_every)


class _Run:
    def __init__(self, nodes: list[NodeState], rules: ChainRules, jobs: list[Job], initial: Sequence[Running]) -> None:
        self.rules = rules
        self.state = {node.name: dataclasses.replace(node, used={}) for node in nodes}
        self.jobs = jobs
        self.by_name = {job.name: job for job in jobs}
        self.pods: dict[str, _Pod] = {}
        self.borrowing: dict[str, Borrower] = {}  # running borrowers, as the returner would read them
        self.observe: Callable[[Snapshot, Mapping[str, tuple[str, MigCounts]]], None] | None = None
        self.pending: list[str] = []  # pod names, oldest first
        self.events: list[tuple[float, int, str, str, int]] = []  # (time, seq, kind, pod, epoch)
        self.seq = 0
        self.metrics = Metrics(pods=len(jobs))
        self.now = 0.0
        self.end = 0.0
        # time integrals, and the rates they grow at (kept as pods start and stop)
        self.useful = 0.0
        self.held = 0.0
        self.held_by_type: dict[str, float] = {}
        self.useful_rate = 0
        self.held_rate = 0
        self.held_now: dict[str, int] = {}
        self.capacity_by_type: dict[str, int] = {}
        for node in nodes:
            for resource, count in node.allocatable.items():
                self.capacity_by_type[resource] = self.capacity_by_type.get(resource, 0) + count
        # The fleet as carved at the start: useful utilisation is measured against it whatever re-carves do.
        self.capacity = sum(compute_slices(r) * n for r, n in self.capacity_by_type.items())
        self.offered_now = dict(self.capacity_by_type)  # slices per type offered now (re-carves change it)
        self.offered_by_type: dict[str, float] = {}  # their integral over time
        # the re-carver (recarve policy only)
        self.recarve: RecarvePolicy | None = None
        self.reconfigure_seconds = RECONFIGURE_SECONDS
        self.recarved_at: dict[str, list[float]] = {}
        self.in_flight: dict[str, tuple[Recarve, int]] = {}  # node -> the re-carve under way, its GPUs
        # Nodes cordoned to drain for a re-carve (policy.drain). The live re-carver would taint them NoSchedule;
        # here their MIG config state says so, and filter, returns and headroom leave them alone as they would.
        self.draining: set[str] = set()
        self.drain_waste: dict[str, float] = {}  # per draining node: compute-slice-seconds left unused since cordoned
        self.on_node: dict[str, set[str]] = {}  # the trace's pods running on each node
        # A pending pod may take back a borrowed slice only after the policy's reclaimAfterSeconds: a round then.
        self.reclaim_delays = sorted({chain.policy.reclaim_after_seconds for chain in rules.chains} - {0})
        self.demand: dict[tuple[int, str], int] = {}  # slices asked for as pods arrived, as the ledger counts them
        # Pods running from start to end hold their slices before the first arrival.
        self.initial = {pod.name: (pod.node, pod.slices) for pod in initial}
        for pod in initial:
            self._use(pod.node, pod.slices, +1)
            self._rates(sum(compute_slices(r) * n for r, n in pod.asked), pod.slices, +1)

    def push(self, time: float, kind: str, pod: str, epoch: int = 0) -> None:
        heapq.heappush(self.events, (time, self.seq, kind, pod, epoch))
        self.seq += 1

    def go(self, horizon: float | None, sample_every: float) -> Metrics:
        end = horizon if horizon is not None else max((job.arrival for job in self.jobs), default=0.0)
        self.end = end
        for job in self.jobs:
            self.push(job.arrival, "arrive", job.name)
        if self.recarve is not None:
            self.push(0.0, "recarve", "")
        next_sample = 0.0
        while self.events:
            time = self.events[0][0]
            self.advance(min(time, end), end)
            while next_sample <= min(time, end) and next_sample <= end:
                self.metrics.timeline.append(
                    (next_sample, self._useful_now() / max(1, self.capacity), len(self.pending))
                )
                next_sample += sample_every
            self.now = time
            self.kinds_now: list[str] = []
            while self.events and self.events[0][0] == time:
                _, _, kind, name, epoch = heapq.heappop(self.events)
                self.kinds_now.append(kind)
                if kind == "arrive":
                    self.pods[name] = _Pod(self.by_name[name], pending_since=time)
                    self.pending.append(name)
                    self.arrived(name)
                elif kind == "finish":
                    pod = self.pods[name]
                    if pod.epoch == epoch and pod.node:
                        self.release(pod)
                        pod.finished = time
                elif kind == "reconfigured":
                    self.reconfigured(name)
            self.schedule()
            if self.rules.chains:
                self.returns()
            if "recarve" in self.kinds_now:
                self.recarve_round()
            if self.observe is not None:
                running = dict(self.initial)
                running.update(
                    (n, (p.node, p.placement.slices)) for n, p in self.pods.items() if p.placement is not None
                )
                self.observe(self.snapshot(), running)
        self.advance(end, end)  # pods that never finish (`initial`) work on after the last event
        self.finish_metrics(end)
        return self.metrics

    # -- time integrals -------------------------------------------------------

    def _useful_now(self) -> float:
        return float(self.useful_rate)

    def advance(self, to: float, end: float) -> None:
        span = max(0.0, min(to, end) - min(self.now, end))
        if span <= 0:
            return
        self.useful += self.useful_rate * span
        self.held += self.held_rate * span
        for resource, count in self.held_now.items():
            self.held_by_type[resource] = self.held_by_type.get(resource, 0.0) + count * span
        for resource, count in self.offered_now.items():
            self.offered_by_type[resource] = self.offered_by_type.get(resource, 0.0) + count * span
        self.metrics.reconfiguring_gpu_hours += sum(gpus for _, gpus in self.in_flight.values()) * span / HOUR
        for name in self.draining:
            state = self.state[name]
            unused = sum(compute_slices(r) * (n - state.used.get(r, 0)) for r, n in state.allocatable.items())
            self.drain_waste[name] = self.drain_waste.get(name, 0.0) + unused * span

    # -- placement ------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        oldest = demand_bucket(self.now - MAX_HEADROOM_SECONDS) - DEMAND_BUCKET_SECONDS
        if self.demand and min(self.demand)[0] < oldest:
            self.demand = {key: count for key, count in self.demand.items() if key[0] >= oldest}
        return Snapshot(self.state, demand=Demand(self.now, self.demand))

    def schedule(self) -> None:
        """Place pending pods oldest first, as the scheduler would; a request that fit nowhere is not retried."""
        failed: set[tuple[MigCounts, NodeConstraints]] = set()  # requests that fit nowhere in this call
        still: list[str] = []
        allowed: dict[NodeConstraints, list[str]] = {}  # pods share their rules: match them once per call
        for name in self.pending:
            pod = self.pods[name]
            request = pod.request
            if (pod.job.mig, request.constraints) in failed:
                still.append(name)
                continue
            snapshot = self.snapshot()
            names = allowed.get(request.constraints)
            if names is None:
                names = allowed[request.constraints] = [n for n, node in self.state.items() if request.may_run_on(node)]
            decision = filter_nodes(request, names, snapshot, self.rules)
            if not decision.passed:
                failed.add((pod.job.mig, request.constraints))
                still.append(name)
                continue
            scores = score_nodes(pod.request, decision.passed, snapshot, self.rules)
            chosen = max(decision.passed, key=lambda node: scores[node])  # the first best, as listed
            # what /bind decides: with the types kept free as the filter saw them
            verdict = place(pod.request, snapshot.nodes[chosen], chosen, lending_rules(snapshot, self.rules))
            assert isinstance(verdict, Placement)
            self.start(pod, verdict)
        self.pending = still

    def start(self, pod: _Pod, placement: Placement) -> None:
        pod.waited += self.now - pod.pending_since
        pod.node, pod.placement, pod.started = placement.node, placement, self.now
        pod.placed_once = True
        if placement.borrows:
            self.metrics.borrows += 1
            self.borrowing[pod.job.name] = self._borrower(pod, placement)
        self._use(placement.node, placement.slices, +1)
        self._rates(compute_of(pod.job.mig), placement.slices, +1)
        self.on_node.setdefault(placement.node, set()).add(pod.job.name)
        self.push(self.now + pod.job.runtime, "finish", pod.job.name, pod.epoch)

    def release(self, pod: _Pod) -> None:
        assert pod.placement is not None
        self._use(pod.node, pod.placement.slices, -1)
        self._rates(compute_of(pod.job.mig), pod.placement.slices, -1)
        self.on_node[pod.node].discard(pod.job.name)
        self.borrowing.pop(pod.job.name, None)
        pod.node, pod.placement = "", None

    def _rates(self, useful: int, slices: MigCounts, sign: int) -> None:
        """Start (+1) or stop (-1) counting `useful` compute slices of work done on `slices` held."""
        self.useful_rate += sign * useful
        for resource, count in slices:
            self.held_rate += sign * compute_slices(resource) * count
            self.held_now[resource] = self.held_now.get(resource, 0) + sign * count

    def _use(self, node: str, slices: MigCounts, sign: int) -> None:
        state = self.state[node]
        used = dict(state.used)
        for resource, count in slices:
            used[resource] = used.get(resource, 0) + sign * count
            assert 0 <= used[resource] <= state.allocatable.get(resource, 0), (node, resource, used[resource])
        self.state[node] = dataclasses.replace(state, used=used)

    # -- returns --------------------------------------------------------------

    def _borrower(self, pod: _Pod, placement: Placement) -> Borrower:
        loan = Loan(
            original=pod.job.mig,
            borrowed=placement.slices,
            chains=tuple(sorted({g.chain for g in placement.grants if g.chain})),
            steps=placement.cost,
            replaced_uid=pod.job.name,
        )
        record = PodRecord(
            PodRequest("default", pod.job.name, pod.job.name, placement.slices),
            placement.node,
            False,
            created=f"{self.now:016.3f}",
        )
        policy = loan_policy(loan, self.rules)
        return Borrower(record, loan, policy.return_mode, pod.restarts, "", policy.reclaim_after_seconds)

    def returns(self) -> None:
        borrowers = list(self.borrowing.values())
        if not borrowers:
            return
        # Pending pods of one type and placement rules are interchangeable here:
        # one of each, the one waiting longest, is enough to find a return worth doing, and keeps a round cheap.
        oldest: dict[tuple[MigCounts, NodeConstraints], PodRequest] = {}
        for name in self.pending:
            pod = self.pods[name]
            oldest.setdefault((pod.job.mig, pod.request.constraints), pod.request)
        waited = {request.key: self.now - self.pods[request.name].pending_since for request in oldest.values()}
        plans = plan_returns(self.snapshot(), borrowers, list(oldest.values()), self.rules, waited=waited)
        for plan in plans:
            self.restart(self.pods[plan.borrower.record.request.name])
        if plans:
            # A pod a reclaim was for goes first, as its nomination makes it (core/preempt.py yield_to_nominated):
            # the slice taken back is its own, not the reclaimed borrower's to borrow again.
            first = {plan.unblocks.removeprefix("default/") for plan in plans if not plan.target}
            self.pending.sort(key=lambda name: (name not in first, self.pods[name].job.arrival, name))
            self.schedule()

    def restart(self, pod: _Pod) -> None:
        """Evict `pod` (a return, or a drain): it starts over, pending again, and what it did no longer counts."""
        slices = compute_of(pod.job.mig)
        self.metrics.lost_work_slice_hours += slices * (self.now - pod.started) / 3600
        self.useful -= slices * max(0.0, min(self.now, self.end) - min(pod.started, self.end))
        self.metrics.restarts += 1
        pod.restarts += 1
        pod.epoch += 1
        self.release(pod)
        pod.pending_since = self.now
        self.pending.append(pod.job.name)
        self.arrived(pod.job.name)  # as its restored copy is a new pod, created now

    def arrived(self, name: str) -> None:
        """Pod `name` is pending, anew: count what it asks for (core/headroom.py), and add rounds (no-op events)
        for when it will have waited long enough to take back a borrowed slice."""
        bucket = demand_bucket(self.now)
        for resource, count in self.pods[name].job.mig:
            self.demand[bucket, resource] = self.demand.get((bucket, resource), 0) + count
        for delay in self.reclaim_delays:
            self.push(self.now + delay, "tick", name)

    # -- re-carving -----------------------------------------------------------

    def recarve_round(self) -> None:
        """What the re-carver does every round: plan with the core, drop the planned nodes' slices, and look again."""
        assert self.recarve is not None
        if self.now + RECARVE_ROUND_SECONDS <= self.end:
            self.push(self.now + RECARVE_ROUND_SECONDS, "recarve", "")
        requests = [self.pods[name].request for name in self.pending]
        waited = {self.pods[name].request.key: self.now - self.pods[name].pending_since for name in self.pending}
        snapshot = self.snapshot()
        unmet = unmet_demand(snapshot, requests, self.rules, waited, self.recarve)
        lent = [borrower.loan.borrowed for borrower in self.borrowing.values()]
        spare = spare_slices(snapshot, requests, lent, self.recarve)
        for recarve, _ in self.in_flight.values():  # demand a re-carve under way will serve is met already
            for resource, count in recarve.serves.items():
                unmet[resource] = unmet.get(resource, 0) - count
        unmet = {resource: count for resource, count in unmet.items() if count > 0}
        if not unmet and not self.draining:
            return
        carvable = []
        for name, state in self.state.items():
            node = carvable_node(
                state,
                not any(state.used.values()),
                tuple(self.recarved_at.get(name, ())),
                name in self.in_flight,
            )
            if node is not None:
                carvable.append(self._drain_view(node))
        # The last holders of a drained node are evicted only when the node, idle, would be re-carved now.
        ending = {node.name for node in carvable if finish_drain(node)}
        emptied = [
            dataclasses.replace(n, idle=True, held={}, drain_cost=0.0) if n.name in ending else n for n in carvable
        ]
        # Without `waiting`: passing every pending pod's slices cost small-heavy 1.2 points of useful utilisation
        # and tripled 2g.10gb's mean pending (docs/recarving.md).
        plan = plan_recarves(emptied, unmet, self.now, self.recarve, spare=spare)
        for recarve in plan:
            for pod in sorted(self.on_node.get(recarve.node, ()) if recarve.node in ending else ()):
                self.restart(self.pods[pod])
        for recarve in plan:
            self.start_recarve(recarve, next(node.gpus for node in carvable if node.name == recarve.node))
            for resource, count in recarve.serves.items():
                unmet[resource] -= count
        started = {recarve.node for recarve in plan}
        rest = [dataclasses.replace(node, in_flight=node.in_flight or node.name in started) for node in carvable]
        drains = {drain.node for drain in plan_drains(rest, unmet, self.now, self.recarve, spare=spare)}
        for name in sorted(self.draining - drains - started):  # no longer worth draining: uncordon
            self.state[name] = dataclasses.replace(self.state[name], mig_config_state="success")
        for name in sorted(drains - self.draining):
            self.state[name] = dataclasses.replace(self.state[name], mig_config_state="draining")
        self.draining = drains
        self.drain_waste = {name: waste for name, waste in self.drain_waste.items() if name in drains}

    def _drain_view(self, node: CarvableNode) -> CarvableNode:
        """`node` with what drains read: the slices held on it, and for a draining one its waste and eviction cost."""
        state = self.state[node.name]
        held = {resource: count for resource, count in state.used.items() if count}
        if node.name not in self.draining:
            return dataclasses.replace(node, held=held)
        cost = sum(
            compute_of(self.pods[pod].job.mig) * (self.now - self.pods[pod].started)
            for pod in self.on_node.get(node.name, ())
        )
        waste = self.drain_waste.get(node.name, 0.0)
        return dataclasses.replace(node, draining=True, held=held, drain_waste=waste, drain_cost=cost)

    def start_recarve(self, recarve: Recarve, gpus: int) -> None:
        """The MIG manager takes the node: its device plugin stops, and it offers nothing until `reconfigured`."""
        state = self.state[recarve.node]
        assert not any(state.used.values()), state  # the planner plans idle nodes only
        for resource, count in state.allocatable.items():
            self.offered_now[resource] -= count
        self.state[recarve.node] = dataclasses.replace(state, allocatable={}, used={}, mig_config_state="pending")
        self.in_flight[recarve.node] = (recarve, gpus)
        self.recarved_at.setdefault(recarve.node, []).append(self.now)
        self.metrics.recarves += 1
        self.push(self.now + self.reconfigure_seconds, "reconfigured", recarve.node)

    def reconfigured(self, node: str) -> None:
        recarve, gpus = self.in_flight.pop(node)
        allocatable = {resource: count * gpus for resource, count in recarve.layout.items() if count}
        for resource, count in allocatable.items():
            self.offered_now[resource] = self.offered_now.get(resource, 0) + count
        self.state[node] = dataclasses.replace(
            self.state[node], allocatable=allocatable, used={}, mig_config_state="success"
        )

    # -- results --------------------------------------------------------------

    def finish_metrics(self, end: float) -> None:
        self.metrics.finished = sum(1 for pod in self.pods.values() if pod.finished is not None)
        self.metrics.running_at_end = sum(1 for pod in self.pods.values() if pod.placement is not None)
        self.metrics.pending_at_end = len(self.pending) + len(self.jobs) - len(self.pods)
        # A pod still pending when the run ends (never placed, or restarted and never placed again)
        # is censored: it waited at least until the later of the horizon and the last event.
        censored = max(self.now, end)
        waits: dict[str, list[float]] = {}
        for name, pod in self.pods.items():
            if not pod.placed_once:
                self.metrics.never_placed += 1
            wait = pod.waited + (censored - pod.pending_since if name in self.pending else 0.0)
            waits.setdefault(_requested_type(pod.job), []).append(wait)
        self.metrics.never_placed += len(self.jobs) - len(self.pods)
        if waits:
            m = self.metrics
            m.mean_pending_s, m.p95_pending_s = _mean_and_p95([wait for each in waits.values() for wait in each])
            for resource, each in sorted(waits.items()):
                m.mean_pending_by_type_s[resource], m.p95_pending_by_type_s[resource] = _mean_and_p95(each)
        if end > 0 and self.capacity:
            self.metrics.useful_utilisation = self.useful / (self.capacity * end)
            self.metrics.held_utilisation = self.held / (self.capacity * end)
            self.metrics.utilisation_by_type = {
                resource: self.held_by_type.get(resource, 0.0) / offered
                for resource, offered in sorted(self.offered_by_type.items())
                if offered
            }
        self.metrics.max_recarves_node_hour = max(
            (
                sum(1 for t in times if start <= t < start + HOUR)
                for times in self.recarved_at.values()
                for start in times
            ),
            default=0,
        )
