"""Workloads for the simulator: a seeded generator, and readers of CSV traces (ours, and Alibaba's openb pod lists).

Our CSV (one row a pod, header required):
    name        a unique pod name
    arrival_s   seconds from the start of the trace when the pod is created
    type        the MIG profile it asks for (`1g.5gb`) or its resource name (`nvidia.com/mig-1g.5gb`)
    runtime_s   seconds of work it needs once running
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from extender.core.mig import MIG_RESOURCE_PREFIX, is_mig_resource, parse_mig_resource
from extender.sim.engine import Job

DAY = 24 * 3600.0


@dataclass(frozen=True)
class WorkloadSpec:
    """Poisson arrivals whose type mix drifts from `mix_a` (midnight) to `mix_b` (noon) and back."""

    mix_a: Mapping[str, float]  # profile -> share of arrivals
    mix_b: Mapping[str, float]
    load: float  # demanded compute slices over the fleet's, on average
    duration_s: float = DAY
    mean_runtime_s: float = 3600.0
    runtime_sigma: float = 1.0  # lognormal shape: the tail of long jobs
    max_runtime_s: float = 12 * 3600.0


def _mix_at(spec: WorkloadSpec, t: float) -> dict[str, float]:
    drift = (1 - math.cos(2 * math.pi * t / DAY)) / 2  # 0 at midnight, 1 at noon
    profiles = sorted(set(spec.mix_a) | set(spec.mix_b))
    weights = {p: (1 - drift) * spec.mix_a.get(p, 0.0) + drift * spec.mix_b.get(p, 0.0) for p in profiles}
    total = sum(weights.values())
    return {p: w / total for p, w in weights.items()}


def generate(spec: WorkloadSpec, capacity_slices: int, seed: int) -> list[Job]:
    """A trace for a fleet of `capacity_slices` compute slices; the same seed gives the same trace."""
    rng = random.Random(seed)
    mu = math.log(spec.mean_runtime_s) - spec.runtime_sigma**2 / 2  # lognormal with the asked-for mean

    def rate(t: float) -> float:  # arrivals per second that keep the demanded load at `load`
        mean_slices = sum(
            share * parse_mig_resource(MIG_RESOURCE_PREFIX + p).compute_slices for p, share in _mix_at(spec, t).items()
        )
        return spec.load * capacity_slices / (mean_slices * spec.mean_runtime_s)

    peak = max(rate(spec.duration_s * k / 96) for k in range(97)) * 1.05
    jobs: list[Job] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)  # thinning: a Poisson process of rate(t) from one of rate `peak`
        if t >= spec.duration_s:
            return jobs
        if rng.random() > rate(t) / peak:
            continue
        mix = _mix_at(spec, t)
        profile = rng.choices(list(mix), weights=list(mix.values()))[0]
        runtime = min(spec.max_runtime_s, max(60.0, rng.lognormvariate(mu, spec.runtime_sigma)))
        jobs.append(Job(f"pod-{len(jobs):06d}", round(t, 3), MIG_RESOURCE_PREFIX + profile, round(runtime, 3)))


def write_csv(jobs: Sequence[Job], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "arrival_s", "type", "runtime_s"])
        for job in jobs:
            writer.writerow([job.name, job.arrival, job.resource[len(MIG_RESOURCE_PREFIX) :], job.runtime])


def read_csv(path: Path) -> list[Job]:
    """Our trace format (see the module docstring); errors name the file, the line and the column."""
    jobs = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"name", "arrival_s", "type", "runtime_s"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}:1: missing column(s) {', '.join(sorted(missing))}")
        for row in reader:
            line = reader.line_num
            try:
                resource = row["type"] if is_mig_resource(row["type"]) else MIG_RESOURCE_PREFIX + row["type"]
                parse_mig_resource(resource)
                jobs.append(Job(row["name"], float(row["arrival_s"]), resource, float(row["runtime_s"])))
            except (ValueError, TypeError) as error:
                raise ValueError(f"{path}:{line}: {error}") from None
    return jobs


def read_openb(path: Path, profiles: Sequence[str]) -> tuple[list[Job], int]:
    """Alibaba's 2023 GPU cluster trace (openb_pod_list_*.csv): fractional-GPU pods as MIG requests.

    A pod asking for `gpu_milli` thousandths of one GPU gets the smallest
    profile of `profiles` (one GPU model's, smallest first) whose compute
    share (g/7) covers it; a whole GPU gets the largest. Pods asking for
    several GPUs, or none, are skipped and counted. Arrival is creation_time,
    runtime is deletion_time - scheduled_time (creation_time when unscheduled).
    """
    shares = sorted((parse_mig_resource(MIG_RESOURCE_PREFIX + p).compute_slices / 7, p) for p in profiles)
    jobs, skipped = [], 0
    rows = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                gpus, milli = int(row["num_gpu"]), int(row["gpu_milli"])
                created, deleted = float(row["creation_time"]), float(row["deletion_time"])
                started = float(row.get("scheduled_time") or created)
            except (KeyError, ValueError):
                skipped += 1
                continue
            if gpus != 1 or milli <= 0 or deleted <= started:
                skipped += 1
                continue
            need = min(1.0, milli / 1000)
            profile = next((p for share, p in shares if share + 1e-9 >= need), shares[-1][1])
            rows.append((created, row["name"], profile, deleted - started))
    origin = min((created for created, *_ in rows), default=0.0)
    for created, name, profile, runtime in sorted(rows):
        jobs.append(Job(name, created - origin, MIG_RESOURCE_PREFIX + profile, runtime))
    return jobs, skipped
