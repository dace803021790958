"""Workloads for the simulator: a seeded generator, and readers of CSV traces (ours, and Alibaba's openb pod lists).

Our CSV (one row a pod, header required):
    name        a unique pod name
    arrival_s   seconds from the start of the trace when the pod is created (a number, at least 0)
    type        the MIG slices it asks for: a MIG profile (`1g.5gb`) or its resource name
                (`nvidia.com/mig-1g.5gb`) for one slice; `2x1g.5gb` for two of a type;
                `1g.5gb+2g.10gb` for several types, on one node, as one pod's containers ask
                (`2x1g.5gb+3g.20gb` alike; spaces around `x` and `+` are allowed). A type
                named twice adds up. A profile's `+me` is written `.me`, as the device plugin does.
    runtime_s   seconds of work it needs once running (a number, at least 0)
A bad value is an error naming the file, the line and the column.
"""

from __future__ import annotations

import bisect
import csv
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from extender.core.cluster import MigCounts
from extender.core.geometry import compute_of
from extender.core.mig import MIG_RESOURCE_PREFIX, is_mig_resource, parse_mig_resource, short_name
from extender.sim.engine import Job

DAY = 24 * 3600.0
COLUMNS = ("name", "arrival_s", "type", "runtime_s")

_PART = re.compile(r"(?:(?P<count>[0-9]+)\s*x\s*)?(?P<name>\S+)")
_SUFFIX_ALONE = re.compile(r"[a-z][a-z.]*")  # `me` of `1g.5gb+me`: a profile suffix, not a profile


def parse_request(text: str) -> MigCounts:
    """A `type` value (`1g.5gb`, `2x1g.5gb`, `1g.5gb+2g.10gb`) as sorted (resource, count) pairs; ValueError if bad."""
    counts: dict[str, int] = {}
    for index, part in enumerate(text.split("+")):
        match = _PART.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"{text!r}: an empty part (expected <profile>, <N>x<profile>, or several joined by +)")
        name = match["name"]
        if index and _SUFFIX_ALONE.fullmatch(name):
            raise ValueError(
                f"{text!r}: {name!r} is no MIG profile; a profile's suffix is written with a dot, "
                f"as the device plugin does (1g.5gb+me is 1g.5gb.me)"
            )
        resource = name if is_mig_resource(name) else MIG_RESOURCE_PREFIX + name
        try:
            parse_mig_resource(resource)
        except ValueError as error:
            raise ValueError(f"{text!r}: {error}") from None
        count = int(match["count"] or 1)
        if count < 1:
            raise ValueError(f"{text!r}: {count} slices of {short_name(resource)} (at least 1)")
        counts[resource] = counts.get(resource, 0) + count
    return tuple(sorted(counts.items()))


def format_request(mig: MigCounts) -> str:
    """The `type` value of a request: `1g.5gb`, `2x1g.5gb`, `1g.5gb+2g.10gb`; `parse_request` reads it back."""
    return "+".join(short_name(r) if count == 1 else f"{count}x{short_name(r)}" for r, count in mig)


@dataclass(frozen=True)
class WorkloadSpec:
    """Poisson arrivals whose type mix drifts from `mix_a` (midnight) to `mix_b` (noon) and back.

    Mix keys are `type` values of the CSV format (`1g.5gb`, `2x1g.10gb`, `1g.5gb+2g.10gb`). The
    arrival rate keeps the demanded compute at `load` on average; on top of the mix's drift it may
    follow a daily cycle (a cosine of `cycle_amplitude` around its mean, highest at `cycle_peak_h`)
    and bursts (about `bursts_per_day` windows of `burst_s` at random times, in which it is
    `burst_factor` times what it would be; the rate elsewhere is lowered so that the load holds).
    """

    mix_a: Mapping[str, float]  # type -> share of arrivals
    mix_b: Mapping[str, float]
    load: float  # demanded compute slices over the fleet's, on average
    duration_s: float = DAY
    mean_runtime_s: float = 3600.0
    runtime_sigma: float = 1.0  # lognormal shape: the tail of long jobs
    max_runtime_s: float = 12 * 3600.0
    cycle_amplitude: float = 0.0  # 0: no daily cycle; 0.5: the rate swings between 50 % and 150 % of its mean
    cycle_peak_h: float = 14.0  # hour of the day the cycle peaks
    bursts_per_day: float = 0.0
    burst_factor: float = 1.0
    burst_s: float = 1800.0


def _mix_at(spec: WorkloadSpec, t: float) -> dict[str, float]:
    drift = (1 - math.cos(2 * math.pi * t / DAY)) / 2  # 0 at midnight, 1 at noon
    profiles = sorted(set(spec.mix_a) | set(spec.mix_b))
    weights = {p: (1 - drift) * spec.mix_a.get(p, 0.0) + drift * spec.mix_b.get(p, 0.0) for p in profiles}
    total = sum(weights.values())
    return {p: w / total for p, w in weights.items()}


def _cycle(spec: WorkloadSpec, t: float) -> float:
    """The daily cycle's factor on the arrival rate at `t`: 1 on average over a day."""
    if not spec.cycle_amplitude:
        return 1.0
    return 1 + spec.cycle_amplitude * math.cos(2 * math.pi * (t / DAY - spec.cycle_peak_h / 24))


def _bursts(spec: WorkloadSpec, rng: random.Random) -> list[tuple[float, float]]:
    """Burst windows (start, end), sorted and merged where they overlap; none without bursts (and no draw)."""
    windows: list[tuple[float, float]] = []
    t = 0.0
    while spec.bursts_per_day > 0:
        t += rng.expovariate(spec.bursts_per_day / DAY)
        if t >= spec.duration_s:
            break
        end = min(spec.duration_s, t + spec.burst_s)
        if windows and t <= windows[-1][1]:
            windows[-1] = (windows[-1][0], end)
        else:
            windows.append((t, end))
    return windows


def generate(spec: WorkloadSpec, capacity_slices: int, seed: int) -> list[Job]:
    """A trace for a fleet of `capacity_slices` compute slices; the same seed gives the same trace."""
    rng = random.Random(seed)
    mu = math.log(spec.mean_runtime_s) - spec.runtime_sigma**2 / 2  # lognormal with the asked-for mean
    requests = {p: parse_request(p) for p in set(spec.mix_a) | set(spec.mix_b)}
    compute = {p: compute_of(mig) for p, mig in requests.items()}
    bursts = _bursts(spec, rng)
    starts = [start for start, _ in bursts]
    in_bursts = sum(end - start for start, end in bursts)
    # Outside bursts the rate is lowered so that, bursts included, the trace's load is the asked-for one.
    calm = 1 / (1 + (spec.burst_factor - 1) * in_bursts / spec.duration_s)

    def steady(t: float) -> float:  # arrivals per second that keep the demanded load at `load`, bursts aside
        mean_slices = sum(share * compute[p] for p, share in _mix_at(spec, t).items())
        return spec.load * capacity_slices / (mean_slices * spec.mean_runtime_s) * _cycle(spec, t)

    def burst(t: float) -> float:
        index = bisect.bisect_right(starts, t) - 1
        return spec.burst_factor if index >= 0 and t < bursts[index][1] else 1.0

    grid = 96 * max(1, math.ceil(spec.duration_s / DAY))
    peak = max(steady(spec.duration_s * k / grid) for k in range(grid + 1)) * 1.05
    peak *= calm * max(1.0, spec.burst_factor if bursts else 1.0)
    jobs: list[Job] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)  # thinning: a Poisson process of rate(t) from one of rate `peak`
        if t >= spec.duration_s:
            return jobs
        if rng.random() > steady(t) * calm * burst(t) / peak:
            continue
        mix = _mix_at(spec, t)
        profile = rng.choices(list(mix), weights=list(mix.values()))[0]
        runtime = min(spec.max_runtime_s, max(60.0, rng.lognormvariate(mu, spec.runtime_sigma)))
        jobs.append(Job(f"pod-{len(jobs):06d}", round(t, 3), requests[profile], round(runtime, 3)))


def write_csv(jobs: Sequence[Job], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for job in jobs:
            writer.writerow([job.name, job.arrival, format_request(job.mig), job.runtime])


def read_csv(path: Path) -> list[Job]:
    """Our trace format (see the module docstring); errors name the file, the line and the column."""
    jobs = []
    lines: dict[str, int] = {}  # pod name -> its line: names must be unique, the replay keys pods by them
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}:1: missing column(s) {', '.join(sorted(missing))}")
        for row in reader:
            line = reader.line_num
            column = "name"
            try:
                name = _cell(row, column)
                if not name:
                    raise ValueError("empty")
                if name in lines:
                    raise ValueError(f"{name!r} is already the name of the pod on line {lines[name]}")
                column = "arrival_s"
                arrival = _seconds(_cell(row, column))
                column = "type"
                mig = parse_request(_cell(row, column))
                column = "runtime_s"
                runtime = _seconds(_cell(row, column))
            except ValueError as error:
                raise ValueError(f"{path}:{line}: {column}: {error}") from None
            lines[name] = line
            jobs.append(Job(name, arrival, mig, runtime))
    return jobs


def _cell(row: Mapping[str, str | None], column: str) -> str:
    value = row.get(column)
    if value is None:  # a short row
        raise ValueError("missing")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    if value < 0:
        raise ValueError(f"{value} is below 0")
    return value


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
        jobs.append(Job(name, created - origin, ((MIG_RESOURCE_PREFIX + profile, 1),), runtime))
    return jobs, skipped
