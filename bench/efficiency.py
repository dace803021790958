"""What borrowing buys, on numbers: every policy on every shipped trace, beside the bounds; one table per trace.

Run: python bench/efficiency.py   (about two minutes; writes docs/efficiency-<trace>.png)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from extender.config import load_rules
from extender.sim.engine import SimPolicy
from extender.sim.report import Report, run_policies

ROOT = Path(__file__).resolve().parents[1]
FLEET = ROOT / "bench" / "fleets" / "a100-balanced.yaml"
CHAINS = [ROOT / "chains" / "a100-40gb.yaml"]


def plot(name: str, report: Report, path: Path) -> None:
    figure, (pending, useful) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for policy, metrics in report.runs.items():
        hours = [t / 3600 for t, _, _ in metrics.timeline]
        pending.plot(hours, [p for _, _, p in metrics.timeline], label=policy)
        useful.plot(hours, [u * 100 for _, u, _ in metrics.timeline], label=policy)
    useful.axhline(report.bounds.borrowing * 100, color="grey", linestyle="--", label="borrowing bound (day)")
    pending.set_ylabel("pending pods")
    useful.set_ylabel("useful utilisation %")
    useful.set_xlabel("hour of the trace")
    pending.set_title(f"{name}: {report.pods} pods on 100 A100-40GB (all-balanced)")
    pending.legend()
    useful.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main() -> int:
    rules = load_rules(CHAINS)
    traces = sorted((ROOT / "bench" / "traces").glob("*.csv"))
    for trace in traces:
        started = time.perf_counter()
        report = run_policies(FLEET, rules, str(trace), None, list(SimPolicy))
        print(f"## {trace.stem}  ({time.perf_counter() - started:.0f} s)\n")
        print(report.table())
        static, ours = report.runs["static"], report.runs["on-demand"]
        eager = report.runs["eager"]
        cut = 1 - ours.mean_pending_s / static.mean_pending_s if static.mean_pending_s else 0.0
        print(
            f"\non-demand vs static: mean pending cut by {cut:.0%}; vs eager: utilisation "
            f"{ours.useful_utilisation - eager.useful_utilisation:+.1%}, restarts {ours.restarts} vs {eager.restarts}\n"
        )
        plot(trace.stem, report, ROOT / "docs" / f"efficiency-{trace.stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
