"""Upper bounds on useful utilisation that no online policy can beat on a trace.

- fluid: demand over capacity (as if slices could be cut to any size);
- static: each type served only by its own slices (the plain mixed strategy);
- fixed geometry with upward borrowing: a transportation LP in which the
  demand of a type may be served by its own type or a larger type up its
  chains (as policy allows), never by repartitioning.

Demand and capacity are aggregated over the trace, so these bounds ignore
timing (arrivals, queues): they are relaxations, valid as upper bounds.

- time-aware (`timed`): the borrowing LP over bins of time (15 minutes by
  default): the work of the pods of a type arriving in bin a is served in
  bins b >= a only, each bin offers its slices x its length, and a group of
  pods works at most its number of pods x the bin's length in a bin (a pod of
  one slice does at most one slice-second a second, and nothing before it
  arrives). Any run is a feasible point of it, so it bounds every policy,
  queueing included, and lies within the borrowing bound.

A pod of several slices counts, in every bound, as that many pods of one
slice each (a relaxation: they need not share a node or a start).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.optimize import linprog  # type: ignore[import-untyped]
from scipy.sparse import csr_array  # type: ignore[import-untyped]

from extender.core.cluster import NodeState
from extender.core.geometry import compute_slices
from extender.core.rules import ChainRules
from extender.sim.engine import Job

BIN_S = 900.0  # the time-aware bound's bins: 15 minutes


@dataclass(frozen=True)
class Bounds:
    fluid: float
    static: float
    borrowing: float
    timed: float  # the time-aware borrowing bound: the one "of bound" is measured against
    bin_s: float = BIN_S


def bounds(
    nodes: Sequence[NodeState], rules: ChainRules, jobs: Sequence[Job], horizon: float, *, bin_s: float = BIN_S
) -> Bounds:
    """Useful utilisation bounds over [0, horizon] (compute slices asked for x time / capacity x time)."""
    capacity: dict[tuple[str, str], float] = {}  # (product, type) -> slice-seconds offered
    for node in nodes:
        for resource, count in node.allocatable.items():
            key = (node.gpu_product, resource)
            capacity[key] = capacity.get(key, 0.0) + count * horizon
    total = sum(compute_slices(resource) * amount for (_, resource), amount in capacity.items())
    demand: dict[str, float] = {}  # type -> slice-seconds asked within the horizon
    for job in jobs:
        if job.arrival < horizon:
            for resource, count in job.mig:  # a pod of several slices as that many pods of one: a relaxation
                demand[resource] = demand.get(resource, 0.0) + count * min(job.runtime, horizon - job.arrival)
    if total == 0:
        return Bounds(0.0, 0.0, 0.0, 0.0, bin_s)
    fluid = min(1.0, sum(compute_slices(t) * d for t, d in demand.items()) / total)
    static = (
        sum(compute_slices(t) * min(d, sum(a for (_, r), a in capacity.items() if r == t)) for t, d in demand.items())
        / total
    )
    # Variables: x[t, (p, u)] slice-seconds of type t served on slices u of product p.
    serves = _serves(rules, demand, capacity)
    arcs = [(t, key) for t in demand for key in serves[t]]
    if not arcs:
        return Bounds(fluid, static, static, static, bin_s)
    objective = [-compute_slices(t) for t, _ in arcs]  # linprog minimises
    rows, limits = [], []
    for t, d in demand.items():
        rows.append([1.0 if arc[0] == t else 0.0 for arc in arcs])
        limits.append(d)
    for key, amount in capacity.items():
        rows.append([1.0 if arc[1] == key else 0.0 for arc in arcs])
        limits.append(amount)
    result = linprog(objective, A_ub=rows, b_ub=limits, bounds=(0, None), method="highs")
    if not result.success:
        raise RuntimeError(f"the borrowing bound LP failed: {result.message}")
    borrowing = -result.fun / total
    return Bounds(fluid, static, borrowing, _timed(capacity, serves, jobs, horizon, bin_s) / total, bin_s)


def _serves(
    rules: ChainRules, demand: dict[str, float], capacity: dict[tuple[str, str], float]
) -> dict[str, list[tuple[str, str]]]:
    """The (product, type) slices that may serve each requested type: its own, or a larger one up a chain."""
    return {
        t: [
            (product, u)
            for product, u in capacity
            if u == t or any(o.granted == u and o.allowed for o in rules.borrow_options(t, product, "default"))
        ]
        for t in demand
    }


def _timed(
    capacity: dict[tuple[str, str], float],
    serves: dict[str, list[tuple[str, str]]],
    jobs: Sequence[Job],
    horizon: float,
    bin_s: float,
) -> float:
    """The most compute-slice-seconds of work any run can do in [0, horizon], bin by bin (see the module docstring)."""
    count = math.ceil(horizon / bin_s)
    ends = [min((b + 1) * bin_s, horizon) for b in range(count)]
    length = [end - b * bin_s for b, end in enumerate(ends)]
    # Pods of one type arriving in one bin are one group: its work, and the most it can do in each bin.
    work: dict[tuple[str, int], float] = {}
    first: dict[tuple[str, int], float] = {}  # in its arrival bin: from each pod's arrival to the bin's end
    later: dict[tuple[str, int], list[float]] = {}  # in a later bin b: each pod's runtime or the bin, the least
    for job in jobs:
        if job.arrival >= horizon or job.runtime <= 0:
            continue
        for resource, slices in job.mig:  # a pod of several slices as that many pods of one: a relaxation
            group = (resource, min(count - 1, int(job.arrival // bin_s)))
            work[group] = work.get(group, 0.0) + slices * min(job.runtime, horizon - job.arrival)
            first[group] = first.get(group, 0.0) + slices * min(job.runtime, ends[group[1]] - job.arrival)
            spans = later.setdefault(group, [0.0, 0.0])  # a full bin, the last (maybe shorter) bin
            spans[0] += slices * min(job.runtime, bin_s)
            spans[1] += slices * min(job.runtime, length[-1])
    # Variables x[g, b, (p, u)]: seconds of group g's work done in bin b on slices u of product p.
    objective: list[float] = []
    cells: list[tuple[int, int]] = []  # (row, variable): every coefficient is 1
    limits: list[float] = []
    slot_rows: dict[tuple[int, tuple[str, str]], int] = {}
    for b in range(count):
        for key, amount in capacity.items():
            slot_rows[b, key] = len(limits)
            limits.append(amount / horizon * length[b])  # slices x the bin's length
    for group, amount in work.items():
        t, arrived = group
        if not serves[t]:
            continue
        demand_row = len(limits)
        limits.append(amount)
        for b in range(arrived, count):
            service_row = len(limits)
            limits.append(first[group] if b == arrived else later[group][b == count - 1])
            for key in serves[t]:
                variable = len(objective)
                objective.append(-compute_slices(t))
                cells += [(demand_row, variable), (service_row, variable), (slot_rows[b, key], variable)]
    if not objective:
        return 0.0
    rows, columns = zip(*cells, strict=True)
    matrix = csr_array(([1.0] * len(cells), (rows, columns)), shape=(len(limits), len(objective)))
    result = linprog(objective, A_ub=matrix, b_ub=limits, bounds=(0, None), method="highs")
    if not result.success:
        raise RuntimeError(f"the time-aware bound LP failed: {result.message}")
    return float(-result.fun)
