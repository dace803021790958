"""What borrowing buys, on numbers: every policy on every shipped trace, beside the bounds; one table per trace.

Each trace runs on the fleet and chains it was made for (make_traces.TRACES).
Run: python bench/efficiency.py   (several minutes, most of them on small-heavy; writes
docs/efficiency-<trace>.png and docs/efficiency-<trace>-per-type.png)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from make_traces import TRACES  # the script's own folder is on sys.path

from extender.config import load_rules
from extender.core.geometry import compute_slices
from extender.core.mig import short_name
from extender.core.recarve import RecarvePolicy
from extender.sim.engine import SimPolicy
from extender.sim.report import Report, run_policies

ROOT = Path(__file__).resolve().parents[1]
# The recarve column: the default policy (whole idle nodes re-carved after 5 min of unmet demand, one node at
# a time, each at most twice an hour and not again within 30 min) with drains on (a busy node cordoned, its last
# holders evicted once the wait has wasted what evicting loses); 120 s of reconfiguration per node. Three at a
# time did better on small-heavy and far worse on mixed-a100-h100, before the forecast (docs/recarving.md).
BENCH_RECARVE = RecarvePolicy(drain=True)


def plot(name: str, report: Report, path: Path, fleet: str) -> None:
    figure, (pending, useful) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for policy, metrics in report.runs.items():
        hours = [t / 3600 for t, _, _ in metrics.timeline]
        pending.plot(hours, [p for _, _, p in metrics.timeline], label=policy)
        useful.plot(hours, [u * 100 for _, u, _ in metrics.timeline], label=policy)
    useful.axhline(report.bounds.fluid * 100, color="grey", linestyle="-.", label="fluid bound")
    useful.axhline(report.bounds.borrowing * 100, color="grey", linestyle="--", label="borrowing bound (day)")
    useful.axhline(report.bounds.timed * 100, color="black", linestyle=":", label="time-aware bound")
    pending.set_ylabel("pending pods")
    useful.set_ylabel("useful utilisation %")
    useful.set_xlabel("hour of the trace")
    pending.set_title(f"{name}: {report.pods} pods on {fleet}")
    pending.legend()
    useful.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_per_type(name: str, report: Report, path: Path) -> None:
    """Mean pending per requested type, one bar per policy, side by side."""
    types = sorted({t for m in report.runs.values() for t in m.mean_pending_by_type_s}, key=compute_slices)
    figure, axes = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(report.runs))
    for index, (policy, metrics) in enumerate(report.runs.items()):
        means = [metrics.mean_pending_by_type_s.get(t, 0.0) / 60 for t in types]
        bars = axes.bar([k + index * width for k in range(len(types))], means, width, label=policy)
        axes.bar_label(bars, fmt="%.1f", fontsize=7)  # small bars stay readable beside a tall one
    axes.set_xticks([k + width * (len(report.runs) - 1) / 2 for k in range(len(types))], [short_name(t) for t in types])
    axes.set_ylabel("mean pending, min")
    axes.set_title(f"{name}: mean pending per requested type (pods never placed censored at the end)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def recarve_targets(report: Report) -> str:
    """Issue 21's targets: useful utilisation of the fluid bound, mean pending against static, no type worse."""
    static, borrow, recarve = report.runs["static"], report.runs["on-demand"], report.runs["recarve"]
    worse = [
        f"{short_name(t)} {borrow.mean_pending_by_type_s[t] / 60:.1f} -> {wait / 60:.1f} min"
        for t, wait in recarve.mean_pending_by_type_s.items()
        if round(wait / 60, 1) > round(borrow.mean_pending_by_type_s.get(t, 0.0) / 60, 1)  # as printed
    ]
    of_static = recarve.mean_pending_s / static.mean_pending_s if static.mean_pending_s else 0.0
    hours = max(report.horizon_h, 1e-9)
    return (
        f"recarve: useful {recarve.useful_utilisation:.1%} = {recarve.useful_utilisation / report.bounds.fluid:.1%} "
        f"of the fluid bound (on-demand {borrow.useful_utilisation / report.bounds.fluid:.1%}); mean pending "
        f"{of_static:.0%} of static's; {recarve.recarves} re-carves "
        f"({recarve.recarves / max(1, report.nodes) / hours:.3f} per node per hour, at most "
        f"{recarve.max_recarves_node_hour} of one node in an hour), {recarve.restarts} restarts "
        f"(on-demand {borrow.restarts}); types waiting longer than on-demand: {', '.join(worse) or 'none'}"
    )


def main() -> int:
    traces = sorted((ROOT / "bench" / "traces").glob("*.csv"))
    for trace in traces:
        made = TRACES[trace.stem]
        rules = load_rules([ROOT / "chains" / name for name in made.chains])
        started, cpu = time.perf_counter(), time.process_time()
        fleet = ROOT / "bench" / "fleets" / made.fleet
        report = run_policies(fleet, rules, str(trace), None, list(SimPolicy), recarve=BENCH_RECARVE)
        took = f"{time.perf_counter() - started:.0f} s, CPU {time.process_time() - cpu:.0f} s"
        print(f"## {trace.stem} on {made.fleet}, chains {' '.join(made.chains)}  ({took})\n")
        print(report.table())
        static, ours = report.runs["static"], report.runs["on-demand"]
        eager, never = report.runs["eager"], report.runs["never"]
        cut = 1 - ours.mean_pending_s / static.mean_pending_s if static.mean_pending_s else 0.0
        print(
            f"\non-demand vs static: mean pending cut by {cut:.0%}; vs eager: utilisation "
            f"{ours.useful_utilisation - eager.useful_utilisation:+.1%}, restarts {ours.restarts} vs {eager.restarts}; "
            f"vs never: mean pending {ours.mean_pending_s / 60:.2f} vs {never.mean_pending_s / 60:.2f} min, "
            f"lost work {ours.lost_work_slice_hours:.1f} slice-h\n"
        )
        print(recarve_targets(report) + "\n")
        plot(trace.stem, report, ROOT / "docs" / f"efficiency-{trace.stem}.png", made.about)
        plot_per_type(trace.stem, report, ROOT / "docs" / f"efficiency-{trace.stem}-per-type.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
