"""Regenerate the shipped traces under bench/traces/ (deterministic: fixed seeds). Run: python bench/make_traces.py

Each trace is made for one fleet of bench/fleets/ (its load is over that fleet's compute slices) and runs
there under its chains (bench/efficiency.py reads TRACES).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from extender.core.geometry import compute_of
from extender.sim.fleet import load_fleet
from extender.sim.workload import WorkloadSpec, generate, write_csv

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Trace:
    spec: WorkloadSpec
    seed: int
    fleet: str  # a file of bench/fleets/
    chains: tuple[str, ...]  # files of chains/
    about: str  # the fleet in a few words, for plot titles


A100_FLEET = ("a100-balanced.yaml", ("a100-40gb.yaml",), "100 A100-40GB (all-balanced)")

TRACES = {
    # A day whose mix drifts from small-type-heavy at midnight to large-type-heavy at noon.
    "drifting-mix": Trace(
        WorkloadSpec(
            mix_a={"1g.5gb": 0.80, "2g.10gb": 0.15, "3g.20gb": 0.05},
            mix_b={"1g.5gb": 0.35, "2g.10gb": 0.30, "3g.20gb": 0.35},
            load=0.85,
        ),
        7,
        *A100_FLEET,
    ),
    # A steady small-type-heavy day: the mix the borrowing bound was first quoted for.
    "small-heavy": Trace(
        WorkloadSpec(
            mix_a={"1g.5gb": 0.75, "2g.10gb": 0.17, "3g.20gb": 0.08},
            mix_b={"1g.5gb": 0.75, "2g.10gb": 0.17, "3g.20gb": 0.08},
            load=0.93,
        ),
        1,
        *A100_FLEET,
    ),
    # H100s with a few large slots (4g.40gb): a day of arrivals that follow a working day (a cycle
    # peaking at 14:00, with bursts), a mix drifting from large types at midnight to small ones at noon,
    # and some pods of two 1g.10gb slices. Small pods borrow the large slots by day; the large pods of the
    # night then find them taken.
    "h100-large-slots": Trace(
        WorkloadSpec(
            mix_a={"1g.10gb": 0.40, "2x1g.10gb": 0.05, "2g.20gb": 0.20, "3g.40gb": 0.31, "4g.40gb": 0.04},
            mix_b={"1g.10gb": 0.64, "2x1g.10gb": 0.09, "2g.20gb": 0.16, "3g.40gb": 0.09, "4g.40gb": 0.02},
            load=0.85,
            cycle_amplitude=0.3,
            cycle_peak_h=14.0,
            bursts_per_day=3,
            burst_factor=3.0,
            burst_s=1200.0,
        ),
        20,
        "h100-large-slots.yaml",
        ("h100-80gb.yaml",),
        "96 H100-80GB (64 all-balanced, 16 all-1g.10gb, 16 4g.40gb+3g.40gb)",
    ),
    # A100s and H100s under one policy: A100-sized pods may borrow H100 slices. The mix spans both
    # models' types, with pods of two slices and pods of two types, and drifts from small A100 types at
    # midnight to larger and H100 types at noon.
    "mixed-a100-h100": Trace(
        WorkloadSpec(
            mix_a={
                "1g.5gb": 0.38,
                "2x1g.5gb": 0.03,
                "1g.5gb+2g.10gb": 0.02,
                "2g.10gb": 0.12,
                "3g.20gb": 0.06,
                "1g.10gb": 0.22,
                "2g.20gb": 0.11,
                "3g.40gb": 0.06,
            },
            mix_b={
                "1g.5gb": 0.18,
                "2x1g.5gb": 0.02,
                "1g.5gb+2g.10gb": 0.02,
                "2g.10gb": 0.12,
                "3g.20gb": 0.12,
                "1g.10gb": 0.22,
                "2x1g.10gb": 0.04,
                "2g.20gb": 0.14,
                "3g.40gb": 0.14,
            },
            load=0.88,
            cycle_amplitude=0.2,
            cycle_peak_h=15.0,
            bursts_per_day=2,
            burst_factor=2.5,
            burst_s=1800.0,
        ),
        11,
        "mixed-a100-h100.yaml",
        ("mixed-a100-h100.yaml",),
        "48 A100-40GB + 48 H100-80GB (all-balanced)",
    ),
}


def capacity(trace: Trace) -> int:
    """Compute slices of the trace's fleet: what its load is a share of."""
    return sum(compute_of(node.allocatable.items()) for node in load_fleet(HERE / "fleets" / trace.fleet))


def main() -> None:
    for name, trace in TRACES.items():
        jobs = generate(trace.spec, capacity(trace), trace.seed)
        write_csv(jobs, HERE / "traces" / f"{name}.csv")
        several = sum(1 for job in jobs if sum(count for _, count in job.mig) > 1)
        print(f"{name}: {len(jobs)} pods, {several} of several slices (seed {trace.seed}, fleet {trace.fleet})")


if __name__ == "__main__":
    main()
