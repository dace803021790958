"""Runs of the simulator side by side with the bounds, as a table or JSON; the CLI and the bench share it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from extender.core.geometry import compute_slices
from extender.core.mig import short_name
from extender.core.recarve import RecarvePolicy
from extender.core.rules import ChainRules
from extender.sim.bounds import Bounds, bounds
from extender.sim.engine import Job, Metrics, SimPolicy, simulate
from extender.sim.fleet import load_fleet
from extender.sim.workload import read_csv, read_openb


@dataclass
class Report:
    pods: int
    horizon_h: float
    bounds: Bounds
    runs: dict[str, Metrics]
    nodes: int = 0  # nodes in the fleet (re-carves per node per hour)

    def table(self) -> str:
        b = self.bounds
        lines = [
            f"{self.pods} pods over {self.horizon_h:.1f} h; useful-utilisation bounds: fluid {b.fluid:.1%}, "
            f"static {b.static:.1%}, fixed geometry with borrowing {b.borrowing:.1%} (day-aggregated), "
            f"time-aware {b.timed:.1%} ({b.bin_s / 60:g}-min bins; 'of bound' is against it)",
            "mean and p95 pending count pods still pending at the end (the 'never' placed ones too), "
            "censored at the end of the run",
            "",
            f"{'policy':<10} {'mean pend':>10} {'p95 pend':>10} {'useful':>7} {'of bound':>8} {'of fluid':>8} "
            f"{'held':>6} {'borrows':>8} {'restarts':>8} {'lost s-h':>9} {'never':>6}",
        ]
        for name, m in self.runs.items():
            of_bound = m.useful_utilisation / b.timed if b.timed else 0.0
            of_fluid = m.useful_utilisation / b.fluid if b.fluid else 0.0
            lines.append(
                f"{name:<10} {m.mean_pending_s / 60:>8.1f} m {m.p95_pending_s / 60:>8.1f} m "
                f"{m.useful_utilisation:>7.1%} {of_bound:>8.1%} {of_fluid:>8.1%} {m.held_utilisation:>6.1%} "
                f"{m.borrows:>8} {m.restarts:>8} {m.lost_work_slice_hours:>9.1f} {m.never_placed:>6}"
            )
        for name, m in self.runs.items():
            if m.recarves:
                per_node_hour = m.recarves / max(1, self.nodes) / max(self.horizon_h, 1e-9)
                lines.append(
                    f"{name}: {m.recarves} re-carves ({per_node_hour:.3f} per node per hour, at most "
                    f"{m.max_recarves_node_hour} of one node in any hour), {m.reconfiguring_gpu_hours:.1f} GPU-h "
                    "offering nothing while reconfigured ('of bound' is against fixed geometry: re-carving may pass it)"
                )
        lines.append("")
        asked = sorted({t for m in self.runs.values() for t in m.mean_pending_by_type_s}, key=_size)
        lines.append(f"{'pending per type, mean / p95 (min)':<36}" + "".join(f"{short_name(t):>16}" for t in asked))
        for name, m in self.runs.items():
            cells = (
                f"{m.mean_pending_by_type_s[t] / 60:.1f} / {m.p95_pending_by_type_s[t] / 60:.1f}"
                if t in m.mean_pending_by_type_s
                else "-"
                for t in asked
            )
            lines.append(f"{name:<36}" + "".join(f"{cell:>16}" for cell in cells))
        lines.append("")
        types = sorted({t for m in self.runs.values() for t in m.utilisation_by_type})
        lines.append(f"{'held per type':<14}" + "".join(f"{short_name(t):>10}" for t in types))
        for name, m in self.runs.items():
            lines.append(f"{name:<14}" + "".join(f"{m.utilisation_by_type.get(t, 0):>10.1%}" for t in types))
        return "\n".join(lines)

    def json(self) -> str:
        return json.dumps(self.document(), indent=2)

    def document(self) -> dict[str, Any]:
        return {
            "pods": self.pods,
            "horizon_h": self.horizon_h,
            "bounds": asdict(self.bounds),
            "runs": {name: {k: v for k, v in asdict(m).items() if k != "timeline"} for name, m in self.runs.items()},
        }


def _size(resource: str) -> tuple[int, str]:
    """Smallest type first: compute slices, then the name."""
    return compute_slices(resource), resource


def load_jobs(workload: str | None, openb: str | None, rules: ChainRules) -> list[Job]:
    if workload:
        return read_csv(Path(workload))
    assert openb is not None
    profiles = [t.removeprefix("nvidia.com/mig-") for t in rules.chains[0].types]
    jobs, _skipped = read_openb(Path(openb), profiles)
    return jobs


def run_policies(
    fleet: Path,
    rules: ChainRules,
    workload: str | None,
    openb: str | None,
    policies: Sequence[SimPolicy],
    *,
    recarve: RecarvePolicy | None = None,
) -> Report:
    nodes = load_fleet(fleet)
    jobs = load_jobs(workload, openb, rules)
    horizon = max((job.arrival for job in jobs), default=0.0)
    runs = {policy.value: simulate(nodes, rules, jobs, policy, horizon=horizon, recarve=recarve) for policy in policies}
    return Report(len(jobs), horizon / 3600, bounds(nodes, rules, jobs, horizon), runs, len(nodes))
