"""Regenerate the shipped traces under bench/traces/ (deterministic: fixed seeds). Run: python bench/make_traces.py"""

from __future__ import annotations

from pathlib import Path

from extender.sim.workload import WorkloadSpec, generate, write_csv

HERE = Path(__file__).resolve().parent
CAPACITY = 700  # compute slices of bench/fleets/a100-balanced.yaml: 100 GPUs x 7

TRACES = {
    # A day whose mix drifts from small-type-heavy at midnight to large-type-heavy at noon.
    "drifting-mix": (
        WorkloadSpec(
            mix_a={"1g.5gb": 0.80, "2g.10gb": 0.15, "3g.20gb": 0.05},
            mix_b={"1g.5gb": 0.35, "2g.10gb": 0.30, "3g.20gb": 0.35},
            load=0.85,
        ),
        7,
    ),
    # A steady small-type-heavy day: the mix the borrowing bound was first quoted for.
    "small-heavy": (
        WorkloadSpec(
            mix_a={"1g.5gb": 0.75, "2g.10gb": 0.17, "3g.20gb": 0.08},
            mix_b={"1g.5gb": 0.75, "2g.10gb": 0.17, "3g.20gb": 0.08},
            load=0.93,
        ),
        1,
    ),
}


def main() -> None:
    for name, (spec, seed) in TRACES.items():
        jobs = generate(spec, CAPACITY, seed)
        write_csv(jobs, HERE / "traces" / f"{name}.csv")
        print(f"{name}: {len(jobs)} pods (seed {seed})")


if __name__ == "__main__":
    main()
