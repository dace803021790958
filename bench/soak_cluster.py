"""Soak on the real control plane: MINUTES of churn (arrivals, completions, borrows, returns) with faults injected.

Starts the local control plane as `make run` does (etcd, kube-apiserver,
kube-controller-manager, kwok (the fake nodes' kubelet), migchain-extender over mutual
TLS, migchain-returner, kube-scheduler with scheduler-config.yaml) on a fleet
of fake A100-40GB nodes in mixed layouts. Then, every second: MIG pods arrive
(bare pods, and two ReplicaSets whose size changes). Each bare pod carries a
run time drawn from the seed (MEAN_RUNTIME on average) in kwok's annotation,
and kwok ends it that long after it started running (tests/e2e/kube/
stages.yaml): Succeeded, or Failed (exit 1) for a FAIL_SHARE of them; a
borrower's copy and a returned pod run it again from the start. Ended bare
pods are deleted now and then; running ReplicaSet pods are deleted at random,
as a crash or an eviction would. Every FAULT_EVERY seconds the extender or
the returner is killed with SIGKILL and restarted. With --replicas 2 two
extender replicas run behind a forwarder that, as the Service, routes
kube-scheduler to the ready one (the leader), and a fault kills one of them
(the leader or the follower) or the returner. Each minute it checks that no
node holds more slices than it has (an ended pod, Succeeded or Failed, holds
none); at the end it lets the cluster settle and checks that no pod was lost
(every bare pod there under its name, every ReplicaSet at its count) and that
each loan is recorded once. Prints a line a minute and the totals: bare pods
created, seen Succeeded and Failed (each run once: a borrower's copy is
another run), ReplicaSet pods crashed, borrows, returns, faults, over-commits.

Run: .venv/bin/python bench/soak_cluster.py [--minutes 15] [--seed 1] [--replicas 2] [--fault-every 60]
(needs make control-plane)
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extender.kube.api import ApiError, KubeApi, path  # noqa: E402
from tests.e2e.controlplane import ControlPlane, Extender, ExtenderTls, Process, running  # noqa: E402
from tests.e2e.fleet import FAIL_AFTER, SUCCEED_AFTER, create_node, mig_pod, replica_set  # noqa: E402
from tests.e2e.forwarder import Backend, Forwarder  # noqa: E402
from tests.e2e.invariants import REPLACED_UID, borrowing, check_invariants, over_commits, settle  # noqa: E402

CHAINS = [str(ROOT / "chains" / "a100-40gb.yaml")]
NAMESPACE = "soak"
A100 = "NVIDIA-A100-SXM4-40GB"
LAYOUTS = [{"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1}, {"1g.5gb": 7}, {"3g.20gb": 2}, {"2g.10gb": 3}]
MIX = {"1g.5gb": 0.7, "2g.10gb": 0.2, "3g.20gb": 0.1}
FAULT_EVERY = 60.0
MEAN_RUNTIME = 60.0  # seconds a bare pod runs, on average (exponential)
RUNTIME_RANGE = (3, 600)  # the shortest and longest run time drawn
FAIL_SHARE = 0.1  # the bare pods that end Failed (exit 1) instead of Succeeded
CRASH_CHANCE = 0.015  # per second, that a running ReplicaSet pod is deleted
ENDED = ("Succeeded", "Failed")
BATCH = {"restartPolicy": "Never"}  # a bare pod is a job: once its container exits, it is done


class Soak:
    def __init__(self, plane: ControlPlane, rng: random.Random, processes: list[Process]) -> None:
        self.plane = plane
        self.processes = processes  # what the faults kill: the extender and the returner
        self.api: KubeApi = plane.api
        self.rng = rng
        self.pods = path("api", "v1", "namespaces", NAMESPACE, "pods")
        self.bare: set[str] = set()  # bare pods created and not deleted by us: each must exist at the end
        self.created = self.crashes = self.faults = 0
        self.succeeded: set[str] = set()  # UIDs of bare pods seen ended by kwok, exit 0
        self.failed: set[str] = set()  # and exit 1
        self.loans: set[str] = set()  # replaced UIDs seen: one per borrow
        self.returned: set[str] = set()  # borrower UIDs seen returned (Returning events)
        self.next_name = 0

    def arrive(self, count: int) -> None:
        for _ in range(count):
            profile = self.rng.choices(list(MIX), weights=list(MIX.values()))[0]
            name = f"p{self.next_name:05d}"
            self.next_name += 1
            with contextlib.suppress(ApiError):
                self.api.create(
                    self.pods, mig_pod(name, NAMESPACE, {profile: 1}, annotations=self.runtime(), spec=BATCH)
                )
                self.bare.add(name)
                self.created += 1

    def runtime(self) -> dict[str, str]:
        """How long a bare pod runs, and how it ends: the kwok annotation. A borrower's copy and a returned pod
        carry it too, and run it again from the start, as a restarted job would."""
        shortest, longest = RUNTIME_RANGE
        seconds = min(longest, max(shortest, round(self.rng.expovariate(1 / MEAN_RUNTIME))))
        ending = FAIL_AFTER if self.rng.random() < FAIL_SHARE else SUCCEED_AFTER
        return {ending: f"{seconds}s"}

    def churn(self) -> None:
        """Crash some running ReplicaSet pods, delete some ended bare ones, resize the ReplicaSets now and then."""
        items, _ = self.api.list_all(self.pods)
        self.note_loans(items)
        self.note_ends(items)
        for pod in items:
            metadata = pod["metadata"]
            phase = (pod.get("status") or {}).get("phase")
            owned = bool(metadata.get("ownerReferences"))
            if owned and phase == "Running" and self.rng.random() < CRASH_CHANCE:
                with contextlib.suppress(ApiError):  # the ReplicaSet replaces it
                    self.api.delete(f"{self.pods}/{metadata['name']}")
                    self.crashes += 1
            elif not owned and phase in ENDED and self.rng.random() < 0.5:
                with contextlib.suppress(ApiError):
                    self.api.delete(f"{self.pods}/{metadata['name']}")
                    self.bare.discard(metadata["name"])
        if self.rng.random() < 0.05:
            name = self.rng.choice(["train", "serve"])
            with contextlib.suppress(ApiError):
                self.api.patch(
                    path("apis", "apps", "v1", "namespaces", NAMESPACE, "replicasets", name),
                    {"spec": {"replicas": self.rng.randint(2, 8)}},
                )

    def replica_set(self, name: str, profile: str, replicas: int) -> None:
        self.api.create(
            path("apis", "apps", "v1", "namespaces", NAMESPACE, "replicasets"),
            replica_set(name, NAMESPACE, {profile: 1}, replicas),
        )

    def note_loans(self, pods: list[dict[str, Any]]) -> None:
        self.loans.update(pod["metadata"]["annotations"][REPLACED_UID] for pod in pods if borrowing(pod))

    def note_ends(self, pods: list[dict[str, Any]]) -> None:
        """The bare pods kwok ended, by UID: a name can run again (a borrower's copy, a returned pod)."""
        for pod in pods:
            if not pod["metadata"].get("ownerReferences"):
                phase = (pod.get("status") or {}).get("phase")
                ended = self.succeeded if phase == "Succeeded" else self.failed if phase == "Failed" else None
                if ended is not None:
                    ended.add(pod["metadata"]["uid"])

    def figures(self, minute: float, over: int) -> str:
        return (
            f"{minute:6.1f} {self.created:8d} {len(self.succeeded):9d} {len(self.failed):6d} {self.crashes:7d} "
            f"{len(self.loans):8d} {self.returns_seen():8d} {self.faults:7d} {over:5d}"
        )

    def fault(self) -> None:
        """kill -9 the extender or the returner, and start it again."""
        self.faults += 1
        process = self.rng.choice(self.processes)
        process.kill()
        process.start()

    def returns_seen(self) -> int:
        items, _ = self.api.list_all(
            path("api", "v1", "namespaces", NAMESPACE, "events"), fieldSelector="reason=Returning"
        )
        self.returned |= {item["involvedObject"].get("uid", "") for item in items}
        return len(self.returned)

    def over_commits(self) -> list[str]:
        nodes, _ = self.api.list_all("/api/v1/nodes")
        pods, _ = self.api.list_all("/api/v1/pods")
        return over_commits(nodes, pods)


def start_extenders(plane: ControlPlane, tls: ExtenderTls, replicas: int) -> list[Extender]:
    """The extender replicas and kube-scheduler, which calls them through a forwarder standing in for the Service."""
    extenders = [plane.start_extender(tls, CHAINS, "--log-level=warning")]
    if replicas == 2:
        extenders.append(
            plane.start_extender(tls, CHAINS, "--log-level=warning", identity="extender-b", wait_ready=False)
        )
    forwarder = Forwarder(
        [Backend(e.process.name, ("127.0.0.1", int(e.url.rsplit(":", 1)[1])), e.health_url) for e in extenders],
        fallback=replicas == 1,
    )
    plane.start_scheduler(forwarder.url, tls)
    return extenders


def parse_args() -> argparse.Namespace:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--minutes", type=float, default=15.0)
    cli.add_argument("--seed", type=int, default=1)
    cli.add_argument("--nodes", type=int, default=4)
    cli.add_argument("--replicas", type=int, default=1, choices=(1, 2), help="extender replicas (default 1)")
    cli.add_argument("--fault-every", type=float, default=FAULT_EVERY, help="mean seconds between faults")
    return cli.parse_args()


def main() -> int:
    args = parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="migchain-soak-") as folder, running(ControlPlane(Path(folder))) as plane:
        plane.start_kwok()
        tls = ExtenderTls.issue(Path(folder))
        extenders = start_extenders(plane, tls, args.replicas)
        returner = plane.start_returner(CHAINS)
        plane.ensure_namespace(NAMESPACE)
        for index in range(args.nodes):
            create_node(
                plane.api, f"gpu-{index:03d}", A100, {k: v * 8 for k, v in LAYOUTS[index % 4].items()}, NAMESPACE
            )
        soak = Soak(plane, rng, [e.process for e in extenders] + [returner])
        soak.replica_set("train", "1g.5gb", 4)
        soak.replica_set("serve", "2g.10gb", 3)
        started = time.monotonic()
        next_fault, next_report = started + args.fault_every, started
        violations: list[str] = []
        print(
            f"{'minute':>6} {'created':>8} {'succeeded':>9} {'failed':>6} {'crashes':>7} {'borrows':>8} "
            f"{'returns':>8} {'faults':>7} {'over':>5}"
        )
        while time.monotonic() - started < args.minutes * 60:
            soak.arrive(rng.randint(0, 4))
            soak.churn()
            now = time.monotonic()
            if now >= next_fault:
                soak.fault()
                next_fault = now + args.fault_every * rng.uniform(0.5, 1.5)
            if now >= next_report:
                found = soak.over_commits()
                violations += found
                print(soak.figures((now - started) / 60, len(found)), flush=True)
                next_report = now + 60
            time.sleep(1.0)
        # Let it settle (the last fault's process back, every pod bound or pending with a reason), then check.
        settle(plane.api, NAMESPACE, timeout=180)
        lost = ""
        try:
            pods: list[dict[str, Any]] = check_invariants(plane.api, NAMESPACE, soak.bare)
        except AssertionError as error:
            lost, pods = str(error), []
        soak.note_loans(pods)
        soak.note_ends(pods)
        print(soak.figures((time.monotonic() - started) / 60, len(violations)) + "  (total)")
        print(f"pods at the end: {len(pods)}; bare pods that must exist: {len(soak.bare)}")
        print(f"over-commits seen: {len(violations)}; invariants at the end: {lost or 'all hold (nothing lost)'}")
        return 1 if lost or violations else 0


if __name__ == "__main__":
    sys.exit(main())
