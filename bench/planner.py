"""The returner's round time (borrowers, pending pods, return plan, preemption plan) at 500 / 2,000 / 5,000 nodes.

Each size: half the nodes are CPU-only (no MIG allocatable), the other half
8-GPU A100-40GB and H100-80GB nodes in GPU Operator layouts (all-balanced,
all-1g), nearly full: bound pods hold all but `--free` of the slices, some of
them borrowers (a 1g or 2g pod on a larger slice; the shipped chains return
on demand). Then `--pending` pods wait, in workloads of ten alike
(ReplicaSets): mixed MIG types, a quarter with a nodeSelector, all found
unschedulable by kube-scheduler, a fifth of a higher priority than the
running pods (they may preempt). The objects are read, and kept out of the
cyclic collector, as the returner's cache does; one round is what
`Returner.round` computes before it acts: `borrowers_of`, `pending_requests`,
`plan_returns` and `plan_preemptions`. Prints p50 / p99 of `--rounds` rounds
per size (wall clock, and the process's CPU time, which a busy shared machine
inflates less), and what the last round planned.

Run: .venv/bin/python bench/planner.py [--sizes 500 2000 5000 --pending 400 --rounds 20]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extender.config import load_rules  # noqa: E402
from extender.core.cluster import MIGCHAIN_SCHEDULER, PodRecord, Snapshot  # noqa: E402
from extender.core.preempt import plan_preemptions  # noqa: E402
from extender.core.returns import borrowers_of, pending_requests, plan_returns  # noqa: E402
from extender.core.rules import ChainRules  # noqa: E402
from extender.ledger import Ledger  # noqa: E402

CHAINS = [ROOT / "chains" / f for f in ("a100-40gb.yaml", "a100-80gb.yaml", "h100-80gb.yaml", "a30-24gb.yaml")]
A100 = "NVIDIA-A100-SXM4-40GB"
H100 = "NVIDIA-H100-80GB-HBM3"
GPU_FLEET = [  # share of the GPU nodes, product, per-GPU layout (GPU Operator's all-balanced, all-1g), GPUs
    (0.5, A100, {"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1}, 8),
    (0.3, H100, {"1g.10gb": 2, "2g.20gb": 1, "3g.40gb": 1}, 8),
    (0.2, A100, {"1g.5gb": 7}, 8),
]
# Pending workloads: type, weight. Pods of one workload are alike (one ReplicaSet's template).
PENDING_TYPES = [("1g.5gb", 4), ("2g.10gb", 2), ("3g.20gb", 2), ("1g.10gb", 2), ("2g.20gb", 1), ("3g.40gb", 1)]
ZONES = ("zone-a", "zone-b", "zone-c")
# A borrower: (requested, borrowed, steps on its chain), by product.
BORROWS = {
    A100: [("1g.5gb", "2g.10gb", 2), ("1g.5gb", "3g.20gb", 3), ("2g.10gb", "3g.20gb", 1)],
    H100: [("1g.10gb", "2g.20gb", 2), ("1g.10gb", "3g.40gb", 3), ("2g.20gb", "3g.40gb", 1)],
}
CHAIN_OF = {A100: "a100-40gb", H100: "h100-80gb"}


def node_object(name: str, zone: str, gpu: tuple[str, dict[str, int], int] | None) -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "topology.kubernetes.io/zone": zone}
    resources = {"cpu": "96", "memory": "1Ti", "pods": "110"}
    if gpu is not None:
        product, layout, gpus = gpu
        resources |= {f"nvidia.com/mig-{p}": str(n * gpus) for p, n in layout.items()}
        labels |= {
            "nvidia.com/gpu.product": product,
            "nvidia.com/mig.strategy": "mixed",
            "nvidia.com/mig.config.state": "success",
            **{f"nvidia.com/mig-{p}.count": str(n * gpus) for p, n in layout.items()},
        }
    return {"kind": "Node", "metadata": {"name": name, "labels": labels}, "status": {"allocatable": resources}}


def pod_object(
    name: str,
    resource: str,
    *,
    node: str = "",
    owner: str = "",
    annotations: dict[str, str] | None = None,
    priority: int = 0,
    selector: dict[str, str] | None = None,
    unschedulable: bool = False,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": "ml",
        "uid": f"uid-{name}",
        "creationTimestamp": "2026-11-25T10:00:00Z",
        "annotations": annotations or {},
    }
    if owner:
        metadata["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": owner, "uid": f"uid-{owner}", "controller": True}
        ]
    spec: dict[str, Any] = {
        "schedulerName": MIGCHAIN_SCHEDULER,
        "priority": priority,
        "containers": [{"name": "main", "image": "cuda", "resources": {"limits": {resource: "1"}}}],
    }
    if node:
        spec["nodeName"] = node
    if selector:
        spec["nodeSelector"] = selector
    status: dict[str, Any] = {"phase": "Running" if node else "Pending"}
    if unschedulable:
        status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]
    return {"kind": "Pod", "metadata": metadata, "spec": spec, "status": status}


def fleet(size: int, pending: int, free_share: float, rng: random.Random) -> list[dict[str, Any]]:
    """Node and Pod objects: half the nodes CPU-only, the GPU half nearly full, `pending` pods waiting."""
    objects: list[dict[str, Any]] = []
    for index in range(size):
        name, zone = f"node-{index:05d}", ZONES[index % len(ZONES)]
        if index % 2:
            objects.append(node_object(name, zone, None))  # CPU-only
            continue
        roll, kind = rng.random(), GPU_FLEET[-1]
        for candidate in GPU_FLEET:
            if roll < candidate[0]:
                kind = candidate
                break
            roll -= candidate[0]
        _, product, layout, gpus = kind
        objects.append(node_object(name, zone, (product, layout, gpus)))
        for slot, profile in enumerate(p for p, n in layout.items() for _ in range(n * gpus)):
            if rng.random() < free_share:
                continue  # a free slice
            pod_name = f"run-{index:05d}-{slot}"
            borrow = [b for b in BORROWS.get(product, ()) if b[1] == profile]
            if borrow and rng.random() < 0.15:
                requested, borrowed, steps = rng.choice(borrow)
                loan = {
                    "migchain.io/original-requests": f"nvidia.com/mig-{requested}=1",
                    "migchain.io/borrowed-requests": f"nvidia.com/mig-{borrowed}=1",
                    "migchain.io/chain": CHAIN_OF[product],
                    "migchain.io/steps": str(steps),
                    "migchain.io/replaced-uid": f"uid-was-{pod_name}",
                }
                objects.append(pod_object(pod_name, f"nvidia.com/mig-{profile}", node=name, annotations=loan))
            else:
                objects.append(pod_object(pod_name, f"nvidia.com/mig-{profile}", node=name, owner=f"rs-{index % 50}"))
    types = [t for t, weight in PENDING_TYPES for _ in range(weight)]
    for workload in range(pending // 10 + 1):
        profile = rng.choice(types)
        selector = None
        if workload % 4 == 1:
            selector = {"topology.kubernetes.io/zone": rng.choice(ZONES)}
        elif workload % 4 == 3 and workload % 8 == 3:
            selector = {"nvidia.com/gpu.product": A100 if profile.endswith(("5gb", "10gb")) else H100}
        urgent = workload % 5 == 0
        for replica in range(min(10, pending - workload * 10)):
            objects.append(
                pod_object(
                    f"wait-{workload:03d}-{replica}",
                    f"nvidia.com/mig-{profile}",
                    owner=f"waiting-{workload}",
                    priority=1000 if urgent else 0,
                    selector=selector,
                    unschedulable=True,  # kube-scheduler tried it and found no node
                )
            )
    return objects


def one_round(snapshot: Snapshot, records: list[PodRecord], rules: ChainRules) -> tuple[int, int, int]:
    """What Returner.round plans before acting: (borrowers seen, restores, preemptions)."""
    borrowers = borrowers_of(records, rules)
    waiting = pending_requests(records, (MIGCHAIN_SCHEDULER,))
    restores = plan_returns(snapshot, borrowers, waiting, rules, [])
    preemptions = plan_preemptions(
        snapshot,
        records,
        rules,
        schedulers=(MIGCHAIN_SCHEDULER,),
        claims=[(r.target, r.borrower.loan.original) for r in restores],
        waiting={r.unblocks for r in restores if r.unblocks},
        spared={r.borrower.record.request.uid for r in restores},
    )
    return len(borrowers), len(restores), len(preemptions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 5000])
    parser.add_argument("--pending", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--free", type=float, default=0.01, help="share of GPU slices left free (default 0.01)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rules = load_rules(CHAINS)
    print(f"{args.pending} pending pods, {args.free:.1%} of slices free, {args.rounds} rounds per size")
    print("| nodes (CPU-only) | bound pods | borrowers | round p50 / p99 | CPU p50 | restores | preemptions |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        ledger = Ledger.of_objects(fleet(size, args.pending, args.free, random.Random(args.seed)))
        snapshot, records = ledger.snapshot(), list(ledger.pods())
        gc.collect()
        gc.freeze()  # as the returner's cache does once its first lists are in (extender/kube/cache.py)
        times, cpu, outcome = [], [], (0, 0, 0)
        for _ in range(args.rounds):
            start, start_cpu = time.perf_counter(), time.process_time()
            outcome = one_round(snapshot, records, rules)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        times.sort()
        p50 = statistics.median(times) * 1000
        p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))] * 1000
        bound = sum(1 for r in records if r.node)
        print(
            f"| {size:,} ({size // 2:,}) | {bound:,} | {outcome[0]:,} | {p50:,.1f} / {p99:,.1f} ms "
            f"| {statistics.median(cpu) * 1000:,.1f} ms | {outcome[1]} | {outcome[2]} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
