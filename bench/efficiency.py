"""What borrowing buys, on numbers: every policy on every shipped trace, beside the bounds; one table per trace.

Each trace runs on the fleet and chains it was made for (make_traces.TRACES).
Run: python bench/efficiency.py   (about five minutes; writes docs/efficiency-<trace>.png)
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
    pending.set_ylabel("pending pods")
    useful.set_ylabel("useful utilisation %")
    useful.set_xlabel("hour of the trace")
    pending.set_title(f"{name}: {report.pods} pods on {fleet}")
    pending.legend()
    useful.legend(loc="lower right")
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
        eager = report.runs["eager"]
        cut = 1 - ours.mean_pending_s / static.mean_pending_s if static.mean_pending_s else 0.0
        print(
            f"\non-demand vs static: mean pending cut by {cut:.0%}; vs eager: utilisation "
            f"{ours.useful_utilisation - eager.useful_utilisation:+.1%}, restarts {ours.restarts} vs {eager.restarts}\n"
        )
        plot(trace.stem, report, ROOT / "docs" / f"efficiency-{trace.stem}.png", made.about)
    return 0


if __name__ == "__main__":
    sys.exit(main())
