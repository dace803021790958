"""Soak the decision core in the simulator: random fleets, chains and workloads, one after another, for MINUTES.

Each round draws a fleet (A100-40GB and H100-80GB nodes in GPU Operator
layouts), a workload (Poisson arrivals, a drifting type mix, a load from
under- to over-subscribed) and a return mode, replays it on the same pure core
the extender and the returner run, and checks after every event that no node
holds more slices than it has, and at the end that every pod finished, runs
or still waits: none lost. Prints a line per N rounds and the totals.

Run: .venv/bin/python bench/soak_sim.py [--minutes 60] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extender.config import load_rules  # noqa: E402
from extender.core.cluster import MigCounts, Snapshot  # noqa: E402
from extender.sim.engine import SimPolicy, simulate  # noqa: E402
from extender.sim.fleet import nodes_of  # noqa: E402
from extender.sim.workload import WorkloadSpec, generate  # noqa: E402

RULES = load_rules([ROOT / "chains" / "mixed-a100-h100.yaml"])
MODELS = {
    "NVIDIA-A100-SXM4-40GB": [
        {"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1},
        {"1g.5gb": 7},
        {"3g.20gb": 2},
        {"2g.10gb": 3},
    ],
    "NVIDIA-H100-80GB-HBM3": [
        {"1g.10gb": 2, "2g.20gb": 1, "3g.40gb": 1},
        {"1g.10gb": 7},
        {"3g.40gb": 2},
    ],
}
PROFILES = ["1g.5gb", "2g.10gb", "3g.20gb", "1g.10gb", "2g.20gb", "3g.40gb"]


class Overcommit(AssertionError):
    pass


def check(snapshot: Snapshot, running: Mapping[str, tuple[str, MigCounts]]) -> None:
    """After every event: what the running pods hold on each node is what the node says is used, within allocatable."""
    held: dict[str, dict[str, int]] = {}
    for node, slices in running.values():
        for resource, count in slices:
            held.setdefault(node, {})[resource] = held.setdefault(node, {}).get(resource, 0) + count
    for name, node in snapshot.nodes.items():
        for resource, count in held.get(name, {}).items():
            if count > node.allocatable.get(resource, 0):
                raise Overcommit(f"{name}: {count} x {resource} held, {node.allocatable.get(resource, 0)} exist")
        if {r: n for r, n in node.used.items() if n} != held.get(name, {}):
            raise Overcommit(f"{name}: used {dict(node.used)} but running pods hold {held.get(name, {})}")


def one_round(rng: random.Random) -> tuple[int, int, int, int]:
    fleet = []
    for index in range(rng.randint(2, 6)):
        product = rng.choice(sorted(MODELS))
        fleet += nodes_of(product, 8, rng.choice(MODELS[product]), 8, f"n{index}-{product[-8:].lower()}")
    capacity = sum(7 * 8 for _ in fleet)
    profiles = rng.sample(PROFILES, rng.randint(1, len(PROFILES)))
    spec = WorkloadSpec(
        mix_a={p: rng.random() + 0.01 for p in profiles},
        mix_b={p: rng.random() + 0.01 for p in profiles},
        load=rng.uniform(0.4, 1.4),
        duration_s=rng.uniform(1, 4) * 3600,
        mean_runtime_s=rng.uniform(600, 3600),
    )
    jobs = generate(spec, capacity, rng.randrange(2**31))
    policy = rng.choice([SimPolicy.EAGER, SimPolicy.ON_DEMAND])
    metrics = simulate(fleet, RULES, jobs, policy, observe=check)
    accounted = metrics.finished + metrics.running_at_end + metrics.pending_at_end
    lost = metrics.pods - accounted
    return metrics.pods, metrics.borrows, metrics.restarts, lost


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--minutes", type=float, default=60.0)
    cli.add_argument("--seed", type=int, default=1)
    args = cli.parse_args()
    rng = random.Random(args.seed)
    started = time.monotonic()
    rounds = pods = borrows = returns = lost = overcommits = 0
    print(f"{'minute':>6} {'rounds':>7} {'pods':>10} {'borrows':>9} {'returns':>8} {'lost':>5} {'over-commits':>12}")
    next_report = 0.0
    while time.monotonic() - started < args.minutes * 60:
        try:
            round_pods, round_borrows, round_returns, round_lost = one_round(rng)
        except Overcommit as error:
            overcommits += 1
            print(f"OVER-COMMIT in round {rounds}: {error}")
            continue
        rounds += 1
        pods, borrows, returns, lost = (
            pods + round_pods,
            borrows + round_borrows,
            returns + round_returns,
            lost + round_lost,
        )
        elapsed = (time.monotonic() - started) / 60
        if elapsed >= next_report:
            print(f"{elapsed:6.1f} {rounds:7d} {pods:10,d} {borrows:9,d} {returns:8,d} {lost:5d} {overcommits:12d}")
            next_report += 5
    elapsed = (time.monotonic() - started) / 60
    print(f"{elapsed:6.1f} {rounds:7d} {pods:10,d} {borrows:9,d} {returns:8,d} {lost:5d} {overcommits:12d}  (total)")
    return 1 if lost or overcommits else 0


if __name__ == "__main__":
    sys.exit(main())
