"""Upper bounds on useful utilisation that no online policy can beat on a trace.

- fluid: demand over capacity (as if slices could be cut to any size);
- static: each type served only by its own slices (the plain mixed strategy);
- fixed geometry with upward borrowing: a transportation LP in which the
  demand of a type may be served by its own type or a larger type up its
  chains (as policy allows), never by repartitioning.

Demand and capacity are aggregated over the trace, so the bounds ignore
timing (arrivals, queues): they are relaxations, valid as upper bounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scipy.optimize import linprog  # type: ignore[import-untyped]

from extender.core.cluster import NodeState
from extender.core.rules import ChainRules
from extender.sim.engine import Job
from extender.sim.geometry import compute_slices


@dataclass(frozen=True)
class Bounds:
    fluid: float
    static: float
    borrowing: float


def bounds(nodes: Sequence[NodeState], rules: ChainRules, jobs: Sequence[Job], horizon: float) -> Bounds:
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
        return Bounds(0.0, 0.0, 0.0)
    fluid = min(1.0, sum(compute_slices(t) * d for t, d in demand.items()) / total)
    static = (
        sum(compute_slices(t) * min(d, sum(a for (_, r), a in capacity.items() if r == t)) for t, d in demand.items())
        / total
    )
    # Variables: x[t, (p, u)] slice-seconds of type t served on slices u of product p.
    arcs = []
    for t in demand:
        for product, u in capacity:
            if u == t or any(o.granted == u and o.allowed for o in rules.borrow_options(t, product, "default")):
                arcs.append((t, (product, u)))
    if not arcs:
        return Bounds(fluid, static, static)
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
    return Bounds(fluid, static, -result.fun / total)
