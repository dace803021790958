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
from extender.sim.engine import SimPolicy
from extender.sim.report import Report, run_policies

ROOT = Path(__file__).resolve().parents[1]


def plot(name: str, report: Report, path: Path, fleet: str) -> None:
    figure, (pending, useful) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for policy, metrics in report.runs.items():
        hours = [t / 3600 for t, _, _ in metrics.timeline]
        pending.plot(hours, [p for _, _, p in metrics.timeline], label=policy)
        useful.plot(hours, [u * 100 for _, u, _ in metrics.timeline], label=policy)
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


def main() -> int:
    traces = sorted((ROOT / "bench" / "traces").glob("*.csv"))
    for trace in traces:
        made = TRACES[trace.stem]
        rules = load_rules([ROOT / "chains" / name for name in made.chains])
        started, cpu = time.perf_counter(), time.process_time()
        report = run_policies(ROOT / "bench" / "fleets" / made.fleet, rules, str(trace), None, list(SimPolicy))
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
        plot(trace.stem, report, ROOT / "docs" / f"efficiency-{trace.stem}.png", made.about)
        plot_per_type(trace.stem, report, ROOT / "docs" / f"efficiency-{trace.stem}-per-type.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
