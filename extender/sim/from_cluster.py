"""`migchain simulate --from-cluster`: the live cluster as the simulator's starting state, and the report from it.

The nodes are the cluster's, with their MIG allocatable; the pods running
now hold their slices, loans included, for the whole replay: their remaining
runtime is unknown, so they never finish, are never returned and never move
(`engine.Running`). Pods pending now are not replayed; the trace is. So an
admin can replay a trace on the cluster as it stands under a changed chain
before applying the change. The objects are read elsewhere
(extender.kube.snapshot); this module reads nothing from the cluster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from extender.core.cluster import NodeState, PodRecord, Snapshot
from extender.core.geometry import compute_slices
from extender.core.loan import Loan, record_loan
from extender.core.rules import ChainRules
from extender.sim.bounds import Bounds, bounds
from extender.sim.engine import Job, Running, SimPolicy, simulate
from extender.sim.report import Report, load_jobs

SHOWN_LEFT_OUT = 5  # pod names listed in the table; JSON lists all


@dataclass(frozen=True)
class StartingState:
    nodes: tuple[NodeState, ...]  # every node with MIG slices, `used` empty: the engine counts `running`
    running: tuple[Running, ...]  # the pods holding slices now
    borrowers: int  # how many of them are on a loan (they keep it for the whole replay)
    left_out: tuple[str, ...]  # bound pods that cannot be counted where they are: node unknown, or beyond its slices


def starting_state(snapshot: Snapshot, records: Iterable[PodRecord]) -> StartingState:
    """The nodes migchain knows and the pods that hold slices on them, as the ledger counts them.

    A pod whose node is unknown, or whose slices are more than its node has
    left (a node repartitioned under running pods), cannot be placed in the
    simulator: it is left out and named, oldest pods counted first.
    """
    nodes = tuple(dataclasses.replace(node, used={}) for _, node in sorted(snapshot.nodes.items()) if node.allocatable)
    room = {node.name: dict(node.allocatable) for node in nodes}
    running: list[Running] = []
    left_out: list[str] = []
    borrowers = 0
    for record in sorted(records, key=lambda r: (r.created, r.request.key)):
        if not record.holds_slices:
            continue
        request = record.request
        free = room.get(record.node)
        if free is None or any(free.get(resource, 0) < count for resource, count in request.mig):
            left_out.append(request.key)
            continue
        for resource, count in request.mig:
            free[resource] -= count
        read = record_loan(record)
        loan = read if isinstance(read, Loan) else None  # a loan record that cannot be read is no loan
        borrowers += loan is not None
        running.append(Running(request.key, record.node, request.mig, request.mig if loan is None else loan.original))
    return StartingState(nodes, tuple(running), borrowers, tuple(left_out))


def starting_bounds(start: StartingState, rules: ChainRules, jobs: Sequence[Job], horizon: float) -> Bounds:
    """The simulator's bounds with the running pods pinned: the trace's bound on the slices they leave free,
    plus the work they do, over the whole capacity."""
    total = _compute(start.nodes)
    if total == 0 or horizon <= 0:
        return Bounds(0.0, 0.0, 0.0, 0.0)
    held: dict[str, dict[str, int]] = {}
    for pod in start.running:
        slices = held.setdefault(pod.node, {})
        for resource, count in pod.slices:
            slices[resource] = slices.get(resource, 0) + count
    free_nodes = [
        dataclasses.replace(
            node, allocatable={r: n - held.get(node.name, {}).get(r, 0) for r, n in node.allocatable.items()}
        )
        for node in start.nodes
    ]
    free = bounds(free_nodes, rules, jobs, horizon)
    free_total = _compute(free_nodes)
    pinned = sum(compute_slices(r) * n for pod in start.running for r, n in pod.asked)
    fluid, static, borrowing, timed = (
        (share * free_total + pinned) / total for share in (free.fluid, free.static, free.borrowing, free.timed)
    )
    return Bounds(fluid, static, borrowing, timed, free.bin_s)


def _compute(nodes: Iterable[NodeState]) -> int:
    return sum(compute_slices(resource) * count for node in nodes for resource, count in node.allocatable.items())


@dataclass
class ClusterReport(Report):
    """The simulate report, preceded by what the replay started from."""

    start: StartingState = field(default_factory=lambda: StartingState((), (), 0, ()))
    skipped: int = 0  # node or pod objects that could not be read

    def preamble(self) -> list[str]:
        start = self.start
        lines = [
            f"starting from the cluster: {len(start.nodes)} node(s) with MIG slices, {len(start.running)} running "
            f"pod(s) ({start.borrowers} on a loan) holding their slices for the whole replay (remaining runtime "
            "unknown: never finished, returned or moved); pods pending now are not replayed"
        ]
        if start.left_out:
            names = ", ".join(start.left_out[:SHOWN_LEFT_OUT])
            more = f" and {len(start.left_out) - SHOWN_LEFT_OUT} more" if len(start.left_out) > SHOWN_LEFT_OUT else ""
            lines.append(f"left out {len(start.left_out)} bound pod(s) that do not fit where they are: {names}{more}")
        if self.skipped:
            lines.append(f"skipped {self.skipped} unreadable node or pod object(s)")
        return lines

    def table(self) -> str:
        return "\n".join([*self.preamble(), super().table()])

    def document(self) -> dict[str, Any]:
        start = self.start
        return {
            "start": {
                "nodes": len(start.nodes),
                "running": len(start.running),
                "borrowers": start.borrowers,
                "left_out": list(start.left_out),
                "skipped": self.skipped,
            },
            **super().document(),
        }


def run_from_cluster(
    start: StartingState,
    rules: ChainRules,
    workload: str | None,
    openb: str | None,
    policies: Sequence[SimPolicy],
    *,
    skipped: int = 0,
) -> ClusterReport:
    """`run_policies` on the cluster's starting state instead of a fleet file."""
    jobs = load_jobs(workload, openb, rules)
    horizon = max((job.arrival for job in jobs), default=0.0)
    runs = {
        policy.value: simulate(start.nodes, rules, jobs, policy, horizon=horizon, initial=start.running)
        for policy in policies
    }
    return ClusterReport(
        len(jobs),
        horizon / 3600,
        starting_bounds(start, rules, jobs, horizon),
        runs,
        len(start.nodes),
        start=start,
        skipped=skipped,
    )
