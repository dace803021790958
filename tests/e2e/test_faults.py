"""Faults on the real control plane: kill -9 the extender mid-burst, the returner mid-return, restart
kube-apiserver mid-burst, and the extender down or frozen while pods arrive.

Every test ends on the same invariants (tests/e2e/invariants.py), checked once
the system has settled: no node over-committed, no pod lost, each loan
recorded once. Over-commit is also checked on every poll while the fault runs.
Random choices come from one seeded random.Random (MIGCHAIN_FAULT_SEED).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from extender.kube.api import ApiError, path
from extender.kube.executor import Executor
from tests.e2e.conftest import Cluster, Scenario
from tests.e2e.controlplane import Process, wait_until
from tests.e2e.fleet import PAUSE, SCHEDULER, TEST_LABEL, create_node, mig_pod, replica_set
from tests.e2e.invariants import (
    borrowing,
    bound,
    check_invariants,
    holds_slices,
    journal_entries,
    journaled_pods,
    live,
    mig_requests,
    namespace_pods,
    over_commits,
    settle,
)
from tests.e2e.test_pod_waits import journal_a_borrow

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("MIGCHAIN_FAULT_SEED", "9"))
A100 = "NVIDIA-A100-SXM4-40GB"
EAGER_GPU = "TEST-EAGER-GPU"  # tests/fixtures/chains/e2e-eager.yaml: returnMode eager
G1 = "nvidia.com/mig-1g.5gb"
BALLAST_PODS = 80
HOLD = "e2e.migchain.io/hold"
FAILPOINTS = "MIGCHAIN_FAILPOINTS"


# -- helpers ------------------------------------------------------------------


def report(test: str, **numbers: Any) -> None:
    """The numbers a run saw, on one line (pytest -s shows them; -rA keeps them in the summary)."""
    print(f"\n[faults] {test}: " + ", ".join(f"{key}={value}" for key, value in numbers.items()))


def create_replica_set(scenario: Scenario, name: str, replicas: int) -> dict[str, Any]:
    return scenario.api.create(
        path("apis", "apps", "v1", "namespaces", scenario.namespace, "replicasets"),
        replica_set(name, scenario.test, {"1g.5gb": 1}, replicas),
    )


def create_patiently(create: Callable[[], object], timeout: float = 120.0) -> None:
    """Create one object, retrying while the API server is away (a restart); AlreadyExists means an earlier try
    got through before its connection broke."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            create()
            return
        except ApiError as error:
            if error.status == 409:
                return
            if error.definitive or time.monotonic() > deadline:
                raise
        except Exception:  # connection refused or reset: the API server is restarting
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


@contextlib.contextmanager
def burst(scenario: Scenario, names: Iterable[str], requests: dict[str, int]) -> Iterator[None]:
    """Create bare MIG pods from 8 threads in the background; the block runs during the burst; every pod
    is created (or the error raised) when it ends."""
    with ThreadPoolExecutor(8, thread_name_prefix="burst") as pool:
        futures: list[Future[None]] = [
            pool.submit(create_patiently, functools.partial(scenario.create_pod, name, requests)) for name in names
        ]
        yield
        for future in futures:
            future.result()


class Observer:
    """Polls the namespace from a thread while a fault runs: over-commit at any moment, every node each pod
    name was seen bound to, the bound count. API errors (a restarting API server) are counted, not raised."""

    def __init__(self, scenario: Scenario, interval: float = 0.25) -> None:
        self.scenario = scenario
        self.interval = interval
        self.bound = 0
        self.polls = 0
        self.errors = 0
        self.over_commits: list[str] = []
        self.nodes_of: dict[str, set[str]] = collections.defaultdict(set)
        self.names: set[str] = set()  # pod names there at the last poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)

    def __enter__(self) -> Observer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        nodes, _ = self.scenario.api.list_all("/api/v1/nodes", labelSelector=f"{TEST_LABEL}={self.scenario.test}")
        while not self._stop.is_set():
            try:
                self.poll(nodes)
            except Exception:
                self.errors += 1
            self._stop.wait(self.interval)

    def poll(self, nodes: list[dict[str, Any]]) -> None:
        pods = namespace_pods(self.scenario.api, self.scenario.namespace)
        self.over_commits += over_commits(nodes, pods)
        placed = bound(pods)
        for pod in placed:
            name = pod["metadata"]["name"]
            self.nodes_of[name].add(pod["spec"]["nodeName"])
        self.bound = len(placed)
        self.names = {pod["metadata"]["name"] for pod in pods}
        self.polls += 1

    def moved(self) -> dict[str, set[str]]:
        """Pod names seen bound to more than one node."""
        return {name: nodes for name, nodes in self.nodes_of.items() if len(nodes) > 1}


@contextlib.contextmanager
def scheduler_held(cluster: Cluster) -> Iterator[None]:
    """Freeze kube-scheduler (SIGSTOP) for the block: it calls nobody meanwhile, then carries on (SIGCONT)."""
    scheduler = cluster.plane.processes["kube-scheduler"]
    assert scheduler.popen is not None
    os.killpg(scheduler.popen.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(scheduler.popen.pid, signal.SIGCONT)


def start_extender(cluster: Cluster, failpoint: str = "") -> None:
    """Start the (dead) extender, armed with a failpoint or not, and wait until it is ready (or already dead of its
    failpoint).

    kube-scheduler keeps calling meanwhile (a loopback URL has no Service to hold calls back from a pod not ready
    yet): until its cache is in sync the extender answers 503 and kube-scheduler retries the pods.
    """
    extender = cluster.extender
    extender.env = {**os.environ, FAILPOINTS: failpoint} if failpoint else None
    extender.start()
    wait_until(
        lambda: not extender.alive() or cluster.probe("/readyz")[0] == 200,
        60,
        "migchain /readyz",
    )


def lease_holder_log(process: Process, identity: str) -> bool:
    """Whether this run of the returner (its log since the last start) says it holds the lease."""
    text = process.log.read_text(errors="replace")
    return f"{identity} holds the lease" in text.rsplit("=== start", 1)[-1]


def restart_returner(cluster: Cluster, env: dict[str, str] | None = None) -> Process:
    process = cluster.start_returner("returner-a", env)
    wait_until(lambda: lease_holder_log(process, "returner-a"), 60, "the returner to lead")
    return process


def heal(cluster: Cluster) -> None:
    """Leave the session's cluster as every test expects it: API server, scheduler, extender, returner up."""
    apiserver = cluster.plane.processes["kube-apiserver"]
    if not apiserver.alive():
        apiserver.start()
    wait_until(cluster.api.healthy, 60, "kube-apiserver /readyz")
    scheduler = cluster.plane.processes["kube-scheduler"]
    if scheduler.alive():
        assert scheduler.popen is not None
        os.killpg(scheduler.popen.pid, signal.SIGCONT)
    else:
        scheduler.start()
    extender = cluster.extender
    if extender.popen is not None and extender.alive():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(extender.popen.pid, signal.SIGCONT)
    if extender.env is not None or not extender.alive():
        extender.kill()
        start_extender(cluster)
    cluster.wait_extender_ready()
    for returner in cluster.returners:
        if returner.env is not None or not returner.alive():
            returner.kill()
            returner.env = None
            returner.start()


@pytest.fixture(autouse=True)
def healed(scenario: Scenario) -> Iterator[None]:
    """Heal before the scenario's clean-up (it needs the API server)."""
    yield
    heal(scenario.cluster)


def extender_free_slices(cluster: Cluster) -> dict[str, float]:
    text = cluster.probe("/metrics")[1].decode()
    return {
        f"nvidia.com/mig-{sample.labels['type']}": sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "migchain_free_slices" and sample.value
    }


def api_free_slices(cluster: Cluster) -> dict[str, float]:
    """Free slices per type as the API server's objects say, counted as the extender's gauge counts them."""
    nodes, _ = cluster.api.list_all("/api/v1/nodes")
    pods, _ = cluster.api.list_all("/api/v1/pods")
    used: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for pod in pods:
        if pod["spec"].get("nodeName") and pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
            used[pod["spec"]["nodeName"]].update(mig_requests(pod))
    free: collections.Counter[str] = collections.Counter()
    for node in nodes:
        labels = node["metadata"].get("labels") or {}
        if labels.get("nvidia.com/mig.config.state", "success") != "success":
            continue
        name = node["metadata"]["name"]
        for resource, count in (node.get("status", {}).get("allocatable") or {}).items():
            if resource.startswith("nvidia.com/mig-"):
                free[resource] += max(0, int(count) - used[name][resource])
    return {resource: float(count) for resource, count in free.items() if count}


def assert_extender_agrees(cluster: Cluster) -> None:
    """The extender's cache (through its free-slice gauge) ends equal to the API server's truth: its watches
    resumed and missed nothing, and no reservation is left over."""
    wait_until(
        lambda: extender_free_slices(cluster) == api_free_slices(cluster),
        30,
        "the extender's free slices to match the API server's",
        interval=0.5,
    )


def extender_loans(cluster: Cluster) -> dict[tuple[str, str], float]:
    text = cluster.probe("/metrics")[1].decode()
    return {
        (sample.labels["requested"], sample.labels["granted"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "migchain_loans" and sample.value
    }


def api_loans(cluster: Cluster) -> dict[tuple[str, str], float]:
    """Slices on loan as the pods' loan annotations say (pods that borrow one type, as every pod here)."""
    pods, _ = cluster.api.list_all("/api/v1/pods")
    loans: collections.Counter[tuple[str, str]] = collections.Counter()
    for pod in pods:
        annotations = pod["metadata"].get("annotations") or {}
        if not holds_slices(pod) or "migchain.io/original-requests" not in annotations or not borrowing(pod):
            continue
        [requested] = [item.split("=")[0] for item in annotations["migchain.io/original-requests"].split(",")]
        for item in annotations["migchain.io/borrowed-requests"].split(","):
            granted, count = item.split("=")
            loans[requested.removeprefix("nvidia.com/mig-"), granted.removeprefix("nvidia.com/mig-")] += int(count)
    return {pair: float(count) for pair, count in loans.items()}


def assert_extender_sees_the_pods(cluster: Cluster) -> None:
    """The extender's pod records (through its loans gauge, which reservations do not touch) end equal to the API
    server's: its pod watch resumed and missed nothing."""
    wait_until(
        lambda: extender_loans(cluster) == api_loans(cluster), 30, "the extender's loans to match the pods'", 0.5
    )


def limits(pod: dict[str, Any]) -> dict[str, str]:
    return dict(pod["spec"]["containers"][0]["resources"]["limits"])


def slice_counts(pods: Iterable[dict[str, Any]]) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for pod in pods:
        counts.update(mig_requests(pod))
    return {resource.removeprefix("nvidia.com/mig-"): count for resource, count in sorted(counts.items())}


# -- 1. kill -9 the extender at random points of a 500-pod borrow-heavy burst --------------------------


def test_kill_9_the_extender_at_random_points_of_a_500_pod_borrow_heavy_burst(scenario: Scenario):
    rng = random.Random(SEED)
    cluster = scenario.cluster
    started = time.monotonic()
    # 8 nodes of 8 GPUs cut 1x1g.5gb + 3x2g.10gb, 4 nodes of 8 GPUs cut 2x3g.20gb: 64 exact slices for 1g.5gb
    # pods, 256 they can only borrow (2g.10gb is 2 steps up the A100-40GB chain, 3g.20gb 3).
    for index in range(8):
        create_node(scenario.api, f"gpu-{scenario.test}-w{index}", A100, {"1g.5gb": 8, "2g.10gb": 24}, scenario.test)
    for index in range(4):
        create_node(scenario.api, f"gpu-{scenario.test}-t{index}", A100, {"3g.20gb": 16}, scenario.test)
    exact, slices = 64, 320
    bare = [f"bare-{index}" for index in range(400)]
    replicas = 100  # + 400 bare = 500 pods, 180 more than there are slices
    # Three kill -9 at random points of the burst (by pods bound so far); after the first two the extender
    # comes back armed with a failpoint that kills its process group at a precise step of a borrow.
    schedule = [
        (rng.randint(slices * 10 // 100, slices * 25 // 100), "owned-after-create"),
        (rng.randint(slices * 35 // 100, slices * 55 // 100), "bare-after-delete"),
        (rng.randint(slices * 65 // 100, slices * 90 // 100), ""),
    ]
    kills, fired, downtime = 0, [], 0.0
    with Observer(scenario) as observer:
        with burst(scenario, bare, {"1g.5gb": 1}):
            create_replica_set(scenario, "train", replicas)
            for threshold, failpoint in schedule:
                wait_until(lambda t=threshold: observer.bound >= t, 180, f"{threshold} pods bound")
                down = time.monotonic()
                cluster.extender.kill()
                kills += 1
                start_extender(cluster, failpoint)
                if failpoint:
                    # It dies at the next borrow of that kind; should none come, kill it anyway.
                    with contextlib.suppress(TimeoutError):
                        wait_until(lambda: not cluster.extender.alive(), 30, f"failpoint {failpoint}")
                        fired.append(failpoint)
                    cluster.extender.kill()
                    start_extender(cluster)
                downtime += time.monotonic() - down
        created = time.monotonic()
        wait_until(lambda: observer.bound >= slices, 180, f"all {slices} slices taken", interval=0.5)
        pods = settle(scenario.api, scenario.namespace, timeout=120)
    placed = bound(pods)
    borrowers = [pod for pod in placed if borrowing(pod)]
    pending = [pod for pod in pods if live(pod) and not pod["spec"].get("nodeName")]
    report(
        "extender kill -9",
        seed=SEED,
        pods=len(bare) + replicas,
        bound=len(placed),
        borrowed=len(borrowers),
        pending=len(pending),
        slices_used=slice_counts(placed),
        kills=kills,
        failpoints_fired=fired,
        kill_points=[threshold for threshold, _ in schedule],
        extender_down_s=round(downtime, 1),
        burst_s=round(created - started, 1),
        total_s=round(time.monotonic() - started, 1),
        polls=observer.polls,
    )
    assert not observer.over_commits, observer.over_commits[:5]
    assert not observer.moved(), observer.moved()
    check_invariants(scenario.api, scenario.namespace, bare)
    assert len(placed) == slices
    assert len(borrowers) == slices - exact  # exact fits first: only the 64 1g.5gb slices are not borrowed
    assert len(pending) == len(bare) + replicas - slices
    assert sorted(fired) == ["bare-after-delete", "owned-after-create"], f"failpoints fired: {fired}"
    assert_extender_agrees(cluster)
    assert_extender_sees_the_pods(cluster)


# -- 2. kill -9 the returner at random moments of several returns ----------------------------------------


def journaled_returns_finished(cluster: Cluster) -> int:
    [returner] = cluster.returners
    return returner.log.read_text(errors="replace").count(" finished: ")


def test_kill_9_the_returner_at_random_moments_of_several_returns(scenario: Scenario):
    rng = random.Random(SEED + 2)
    cluster = scenario.cluster
    [returner] = cluster.returners
    started = time.monotonic()
    recoveries_before = journaled_returns_finished(cluster)
    # Eager returns: a freed 1g.5gb goes back at once to the borrower of the most steps.
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, EAGER_GPU, {"1g.5gb": 9, "2g.10gb": 5, "3g.20gb": 5}, scenario.test)
    fillers = [f"filler-{index}" for index in range(9)]
    for name in fillers:
        scenario.create_pod(name, {"1g.5gb": 1})
    wait_until(lambda: len(bound(namespace_pods(scenario.api, scenario.namespace))) == 9, 60, "the fillers bound")
    # 4 owned borrowers first (they take 2g.10gb, one step), then 6 bare ones (one 2g.10gb, five 3g.20gb: two
    # steps, so the first to go back).
    create_replica_set(scenario, "serve", 4)
    wait_until(
        lambda: len([p for p in bound(namespace_pods(scenario.api, scenario.namespace)) if borrowing(p)]) == 4,
        60,
        "4 owned borrowers",
    )
    solos = [f"solo-{index}" for index in range(6)]
    for name in solos:
        scenario.create_pod(name, {"1g.5gb": 1})
    wait_until(
        lambda: len([p for p in bound(namespace_pods(scenario.api, scenario.namespace)) if borrowing(p)]) == 10,
        60,
        "10 borrowers",
    )
    before = {name: scenario.pod(name)["metadata"]["uid"] for name in solos}
    kills, fired, waits, caught = 0, False, [], []
    with Observer(scenario) as observer:
        # Wave 1: a failpoint kills the returner right after its first eviction of a bare borrower.
        returner.stop()
        restart_returner(cluster, {**os.environ, FAILPOINTS: "return-after-evict"})
        for name in fillers[:3]:
            scenario.set_phase(name, "Succeeded")
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not returner.alive(), 30, "the returner's failpoint")
            fired = True
        returner.kill()
        kills += 1
        # Waves 2 and 3: three more slices freed at once, each time as a new returner takes over (finishing the
        # journaled return of the one before), then kill -9 at a random moment of the returns.
        for wave in (fillers[3:6], fillers[6:9]):
            restart_returner(cluster)
            for name in wave:
                scenario.set_phase(name, "Succeeded")
            waits.append(round(rng.uniform(0.05, 1.0), 2))
            time.sleep(waits[-1])  # the random moment of the kill
            returner.kill()
            kills += 1
            caught.append(len(journal_entries(scenario.api, scenario.namespace)))
        restart_returner(cluster)

        def converged() -> bool:
            pods = bound(namespace_pods(scenario.api, scenario.namespace))
            return len(pods) == 10 and sum(limits(p) == {G1: "1"} for p in pods) == 9

        wait_until(converged, 120, "9 borrowers returned onto the 9 freed 1g.5gb", interval=0.5)
        pods = settle(scenario.api, scenario.namespace, timeout=90)
    check_invariants(scenario.api, scenario.namespace, fillers + solos)
    assert not observer.over_commits, observer.over_commits[:5]
    outcome: collections.Counter[str] = collections.Counter()
    for name in solos:
        pod = scenario.pod(name)
        assert pod["spec"].get("nodeName") == node, name
        if pod["metadata"]["uid"] == before[name]:
            assert borrowing(pod), f"{name} kept its UID but lost its loan"
            outcome["still borrowing"] += 1
        elif borrowing(pod):
            outcome["returned, then borrowed again"] += 1
        else:
            assert limits(pod) == {G1: "1"}, f"{name} came back asking for {limits(pod)}"
            outcome["returned"] += 1
    owned = [pod for pod in bound(pods) if pod["metadata"]["name"].startswith("serve-")]
    assert len(owned) == 4
    events, _ = scenario.api.list_all(
        path("api", "v1", "namespaces", scenario.namespace, "events"), fieldSelector="reason=Returning"
    )
    report(
        "returner kill -9",
        seed=SEED + 2,
        borrowers=len(solos) + 4,
        freed_slices=len(fillers),
        kills=kills,
        failpoint_fired=fired,
        kill_after_s=waits,
        journaled_returns_cut_by_the_kills=caught,
        returns_started=sum(event.get("count", 1) for event in events),
        journaled_returns_finished_by_a_new_returner=journaled_returns_finished(cluster) - recoveries_before,
        bare=dict(outcome),
        owned_returned=sum(limits(pod) == {G1: "1"} for pod in owned),
        total_s=round(time.monotonic() - started, 1),
    )


# -- 3. restart kube-apiserver during a burst --------------------------------------------------------------


def binder_failures(cluster: Cluster) -> float:
    """Binds the extender saw fail on the API server's side (the reservation of one of unknown outcome stays)."""
    return sum(cluster.metric("migchain_errors_total", component="binder", kind=kind) for kind in ("api", "unexpected"))


def wait_for_progress(observer: Observer, done: Callable[[], bool], stall: float = 20.0) -> bool:
    """Wait until `done`; False once nothing was bound or unbound for `stall` seconds without it."""
    last, since = (-1, -1), time.monotonic()
    while not done():
        now = (observer.bound, len(observer.names))
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall:
            return False
        time.sleep(0.5)
    return True


def test_restart_kube_apiserver_during_a_burst(scenario: Scenario):
    rng = random.Random(SEED + 3)
    cluster = scenario.cluster
    started = time.monotonic()
    for index in range(4):
        create_node(scenario.api, f"gpu-{scenario.test}-{index}", A100, {"1g.5gb": 4, "2g.10gb": 12}, scenario.test)
    exact, slices = 16, 64
    bare = [f"burst-{index}" for index in range(100)]
    threshold = rng.randint(slices * 20 // 100, slices * 60 // 100)
    watch_errors = cluster.metric("migchain_errors_total", component="watch")
    binder_errors = binder_failures(cluster)
    apiserver = cluster.plane.processes["kube-apiserver"]
    port = cluster.plane.api_port
    with Observer(scenario) as observer:
        with burst(scenario, bare, {"1g.5gb": 1}):
            wait_until(lambda: observer.bound >= threshold, 120, f"{threshold} pods bound")
            down = time.monotonic()
            # SIGTERM, then SIGKILL after a 3s grace period (its graceful shutdown waits on open watches longer:
            # ten seconds down and kube-scheduler, unable to renew its lease, exits).
            apiserver.stop(timeout=3)
            stopped = time.monotonic() - down
            apiserver.start()  # the same argv: the same port, certificates, etcd
            assert f"--secure-port={port}" in apiserver.argv
            wait_until(cluster.api.healthy, 90, "kube-apiserver /readyz again")
            downtime = time.monotonic() - down
        # kube-scheduler exits when it cannot renew its lease for renewDeadline (10s); kubelet would restart it.
        scheduler_survived = cluster.plane.processes["kube-scheduler"].alive()
        if not scheduler_survived:
            cluster.plane.processes["kube-scheduler"].start()
        report(
            "kube-apiserver restart",
            seed=SEED + 3,
            pods=len(bare),
            restart_at_bound=threshold,
            stop_s=round(stopped, 1),
            apiserver_down_s=round(downtime, 1),
            scheduler_survived=scheduler_survived,
        )

        def everyone() -> bool:
            return observer.bound >= slices and set(bare) <= observer.names

        if not wait_for_progress(observer, everyone):
            assert_extender_sees_the_pods(cluster)  # the pod watch resumed, whatever else stalls
            missing = sorted(set(bare) - observer.names)
            journaled = journaled_pods(scenario.api, scenario.namespace)
            unknown_binds = binder_failures(cluster) - binder_errors
            raise AssertionError(
                f"stalled: {observer.bound} bound, missing {missing}, journaled {journaled}, "
                f"{unknown_binds:.0f} binds of unknown outcome"
            )
        pods = settle(scenario.api, scenario.namespace, timeout=120)
    check_invariants(scenario.api, scenario.namespace, bare)
    assert not observer.over_commits, observer.over_commits[:5]
    assert not observer.moved(), observer.moved()
    placed = bound(pods)
    assert len(placed) == slices
    assert len([pod for pod in placed if borrowing(pod)]) == slices - exact
    # The extender's watches broke (counted) and resumed: its cache agrees with the API server to the slice.
    assert cluster.metric("migchain_errors_total", component="watch") > watch_errors
    assert_extender_agrees(cluster)
    assert_extender_sees_the_pods(cluster)
    assert cluster.extender.alive()
    wait_until(lambda: cluster.lease_holder() == "returner-a", 60, "the returner to hold its lease again")
    report(
        "kube-apiserver restart, after",
        bound=len(placed),
        borrowed=slices - exact,
        observer_errors=observer.errors,
        watch_errors=cluster.metric("migchain_errors_total", component="watch") - watch_errors,
        total_s=round(time.monotonic() - started, 1),
    )


# -- 4. the extender down, then frozen --------------------------------------------------------------------


def plain_pod(scenario: Scenario, name: str) -> dict[str, Any]:
    """A pod for migchain-scheduler that asks for no MIG slice: kube-scheduler never calls the extender for it."""
    return scenario.api.create(
        path("api", "v1", "namespaces", scenario.namespace, "pods"),
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "schedulerName": SCHEDULER,
                "nodeSelector": {TEST_LABEL: scenario.test},
                "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "main", "image": PAUSE, "resources": {"requests": {"cpu": "100m"}}}],
            },
        },
    )


def scheduled_events(scenario: Scenario) -> dict[str, list[str]]:
    """kube-scheduler's Scheduled events by pod name ("Successfully assigned ns/pod to node")."""
    items, _ = scenario.api.list_all(
        path("api", "v1", "namespaces", scenario.namespace, "events"), fieldSelector="reason=Scheduled"
    )
    found: dict[str, list[str]] = collections.defaultdict(list)
    for item in items:
        found[item["involvedObject"]["name"]] += [item.get("message", "")] * int(item.get("count") or 1)
    return found


def test_with_the_extender_down_or_frozen_mig_pods_wait_and_are_bound_once(scenario: Scenario):
    cluster = scenario.cluster
    started = time.monotonic()
    for index in range(2):
        create_node(
            scenario.api, f"gpu-{scenario.test}-{index}", A100, {"1g.5gb": 4, "2g.10gb": 4, "3g.20gb": 4}, scenario.test
        )
    slices = 24
    down = [f"down-{index}" for index in range(12)]
    # 10 created as the extender is frozen (some of them in flight then), 2 more while it is: 24 in all.
    frozen = [f"frozen-{index}" for index in range(12)]
    plain = [f"plain-{index}" for index in range(3)]
    url = cluster.forwarder.url  # what kube-scheduler calls: the forwarder standing in for the Service
    with Observer(scenario) as observer:
        # Down: MIG pods wait, told why; pods without MIG requests never reach the extender and are scheduled.
        cluster.extender.stop()
        stopped_at = time.monotonic()
        with burst(scenario, down, {"1g.5gb": 1}):
            for name in plain:
                plain_pod(scenario, name)
        for name in plain:
            scenario.wait_bound(name)
        messages = {
            name: wait_until(functools.partial(scenario.events, name, "FailedScheduling"), 60, f"{name} told why")
            for name in down
        }
        bound_while_down = [name for name in down if name in observer.nodes_of]
        assert not bound_while_down
        assert all(url in message for texts in messages.values() for message in texts), messages[down[0]]
        back = time.monotonic()
        down_for = back - stopped_at
        start_extender(cluster)
        wait_until(lambda: all(name in observer.nodes_of for name in down), 60, "the waiting MIG pods bound")
        bind_after_restart = time.monotonic() - back
        # Frozen: SIGSTOP the extender's process group for longer than the scheduler's httpTimeout (5s) while a
        # second burst is being placed: filter and bind calls time out at the scheduler; the requests queued in
        # the socket are served on SIGCONT, after the scheduler has given up on them.
        assert cluster.extender.popen is not None
        group = cluster.extender.popen.pid
        with burst(scenario, frozen[:10], {"1g.5gb": 1}):
            wait_until(lambda: any(name in observer.nodes_of for name in frozen), 60, "the first frozen-* pod bound")
            os.killpg(group, signal.SIGSTOP)
            stopped = time.monotonic()
            bound_at_stop = len([name for name in frozen if name in observer.nodes_of])
        try:
            for name in frozen[10:]:
                scenario.create_pod(name, {"1g.5gb": 1})
            timeouts = wait_until(
                lambda: [
                    message
                    for name in frozen
                    for message in scenario.events(name, "FailedScheduling")
                    if "Client.Timeout" in message or "deadline exceeded" in message
                ],
                30,
                "a call to time out",
            )
            time.sleep(max(0.0, 7.0 - (time.monotonic() - stopped)))  # frozen for 7s in all, > httpTimeout
            bound_at_cont = len([name for name in frozen if name in observer.nodes_of])
        finally:
            os.killpg(group, signal.SIGCONT)
        frozen_for = time.monotonic() - stopped
        wait_until(lambda: observer.bound == len(down) + len(frozen) + len(plain), 90, "every pod bound", interval=0.5)
        pods = settle(scenario.api, scenario.namespace, timeout=60)
    check_invariants(scenario.api, scenario.namespace, down + frozen + plain)
    assert not observer.over_commits, observer.over_commits[:5]
    assert not observer.moved(), observer.moved()  # bound once: a pod's node never changes
    scheduled = scheduled_events(scenario)
    for pod in bound(pods):
        name, node = pod["metadata"]["name"], pod["spec"]["nodeName"]
        assert len(scheduled.get(name, [])) <= 1, scheduled[name]
        assert all(message.endswith(f" to {node}") for message in scheduled.get(name, [])), scheduled[name]
    mig = [pod for pod in bound(pods) if mig_requests(pod)]
    assert sum(sum(mig_requests(pod).values()) for pod in mig) == len(down) + len(frozen) <= slices
    report(
        "extender down / frozen",
        mig_pods=len(down) + len(frozen),
        plain_pods=len(plain),
        borrowed=len([pod for pod in mig if borrowing(pod)]),
        down_s=round(down_for, 1),
        bound_after_restart_s=round(bind_after_restart, 1),
        frozen_s=round(frozen_for, 1),
        frozen_bound_at_stop=bound_at_stop,
        frozen_bound_at_cont=bound_at_cont,
        scheduler_timeouts=len(timeouts),
        without_scheduled_event=len([pod for pod in mig if not scheduled.get(pod["metadata"]["name"])]),
        first_failed_scheduling=messages[down[0]][0][:300],
        first_timeout=timeouts[0][:300],
        total_s=round(time.monotonic() - started, 1),
    )


# -- a restarted extender binds nothing from a half-listed cache --------------------------------------------------


def test_a_restarted_extender_binds_nothing_before_its_cache_is_in_sync(scenario: Scenario):
    cluster = scenario.cluster
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"1g.5gb": 1}, scenario.test)
    scenario.create_pod("holder", {"1g.5gb": 1})
    scenario.wait_bound("holder")
    pods = path("api", "v1", "namespaces", scenario.namespace, "pods")
    # No scheduler serves "nobody": only the bind calls below ever try to place these.
    intruder = mig_pod("intruder", scenario.test, {"1g.5gb": 1})
    intruder["spec"]["schedulerName"] = "nobody"
    uid = scenario.api.create(pods, intruder)["metadata"]["uid"]
    # Ballast: pods nobody schedules, heavy enough that listing every pod takes the restarted extender a while
    # (its nodes are listed long before), as a large cluster's pods do.
    ballast = "x" * 200_000

    def heavy(index: int) -> None:
        pod = mig_pod(f"ballast-{index}", scenario.test, {}, annotations={"e2e.migchain.io/ballast": ballast})
        pod["spec"]["schedulerName"] = "nobody"
        scenario.api.create(pods, pod)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(heavy, range(BALLAST_PODS)))
    bind = json.dumps({"PodName": "intruder", "PodNamespace": scenario.namespace, "PodUID": uid, "Node": node})
    answers: list[str] = []
    cluster.extender.kill()
    with scheduler_held(cluster):  # kube-scheduler must not take part: only the bind below asks
        cluster.extender.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                status, payload = cluster.call("/bind", bind.encode())
            except OSError:  # not listening yet
                time.sleep(0.005)
                continue
            error = json.loads(payload).get("Error")
            answers.append(f"{status}: {error or 'bound'}")
            if not error or cluster.probe("/readyz")[0] == 200:
                break
    report("half-listed cache", bind_answers=len(answers), last=answers[-1:])
    assert not scenario.pod("intruder")["spec"].get("nodeName"), f"bound before the cache was in sync: {answers}"
    check_invariants(scenario.api, scenario.namespace, ["holder", "intruder"])


# -- journal recovery waits for a terminating original, never takes it for one never deleted -------------------------


def extender_log_since_start(cluster: Cluster) -> str:
    return cluster.extender.log.read_text(errors="replace").rsplit("=== start", 1)[-1]


def test_recovery_of_a_bare_borrow_whose_original_is_still_terminating_loses_nothing(scenario: Scenario):
    cluster = scenario.cluster
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"2g.10gb": 1}, scenario.test)
    # A finalizer someone else holds keeps the deleted original Terminating for as long as we like; under load a
    # deletion whose client died can linger the same way (kube-controller-manager's podgc completes it later).
    # A bare pod with finalizers never borrows, so the finalizer came after the extender read the pod: the
    # extender journaled the borrow, deleted the original, and was killed.
    pod = mig_pod("notebook", scenario.test, {"1g.5gb": 1}, spec={"schedulerName": "nobody"})
    pod["metadata"]["finalizers"] = [HOLD]
    resource = path("api", "v1", "namespaces", scenario.namespace, "pods", "notebook")
    cluster.extender.kill()
    try:
        original = scenario.api.create(path("api", "v1", "namespaces", scenario.namespace, "pods"), pod)
        journal_a_borrow(
            scenario,
            Executor(scenario.api, "migchain-system", cluster.plane.loan_key.read_bytes()),
            original,
            scenario.api.get(path("api", "v1", "nodes", node)),
        )
        start_extender(cluster)
        with contextlib.suppress(TimeoutError):  # a recovery that waits for the pod to go says nothing yet
            wait_until(lambda: "/notebook finished:" in extender_log_since_start(cluster), 10, "")
    finally:
        # The finalizer's holder lets go: the deletion completes.
        with contextlib.suppress(ApiError):
            scenario.api.patch(resource, {"metadata": {"finalizers": None}})
    back = wait_until(
        lambda: (p := scenario.pod("notebook"))["metadata"]["uid"] != original["metadata"]["uid"] and p,
        10,
        "notebook back under its name",
    )
    recovery = [line for line in extender_log_since_start(cluster).splitlines() if "/notebook " in line]
    report("terminating original", recovery=[line.split(": ", 1)[-1][:120] for line in recovery])
    assert borrowing(back) and back["spec"]["nodeName"] == node
    check_invariants(scenario.api, scenario.namespace, ["notebook"])


# -- a bare borrow that fails after the delete brings the pod back without a restart ---

WEBHOOKS = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"


@contextlib.contextmanager
def failing_webhook(scenario: Scenario, resource: str) -> Iterator[None]:
    """A validating webhook nobody serves on CREATE of `resource` in the test's namespace: every such create
    fails with a 500 (failurePolicy Fail), an error whose outcome a client cannot know, as a timeout's."""
    name = f"{scenario.test}-{resource.replace('/', '-')}"
    scenario.api.create(
        WEBHOOKS,
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [
                {
                    "name": "refuse.e2e.migchain.io",
                    "clientConfig": {"url": "https://127.0.0.1:1/refuse"},
                    "rules": [
                        {
                            "operations": ["CREATE"],
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "resources": [resource],
                            "scope": "Namespaced",
                        }
                    ],
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": scenario.namespace}},
                    "failurePolicy": "Fail",
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "timeoutSeconds": 2,
                }
            ],
        },
    )
    try:
        yield
    finally:
        scenario.api.delete(f"{WEBHOOKS}/{name}")


def test_a_bare_borrow_cut_short_by_an_api_error_brings_the_pod_back(scenario: Scenario):
    scenario.create_pod("notebook", {"1g.5gb": 1})  # pending: no node yet
    with failing_webhook(scenario, "pods"):
        # Now it can borrow; the dry-run create of the replacement fails (a 500: its outcome unknown), so nothing
        # is deleted. (Before dry runs, the journal and the delete went through and the create failed.)
        create_node(scenario.api, f"gpu-{scenario.test}-a", A100, {"2g.10gb": 1}, scenario.test)
        failed = wait_until(
            lambda: [m for m in scenario.events("notebook", "FailedScheduling") if "webhook" in m], 30, "the borrow"
        )
        journaled = journal_entries(scenario.api, scenario.namespace)
        missing = not [pod for pod in namespace_pods(scenario.api, scenario.namespace) if live(pod)]
    report("borrow cut short", failure=failed[0][:200], journaled=journaled, pod_missing=missing)
    # The API server accepts pods again: the pod must come back under its name (the replacement, or the original
    # for the scheduler to retry), without waiting for the extender's next restart.
    wait_until(lambda: scenario.pod("notebook"), 15, "notebook back under its name")
    check_invariants(scenario.api, scenario.namespace, ["notebook"])


# -- a bind that failed with an unknown outcome does not block the pod's own retries ------------------------


def test_a_pod_whose_bind_failed_with_a_server_error_is_bound_once_the_error_is_gone(scenario: Scenario):
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"1g.5gb": 1}, scenario.test)
    with failing_webhook(scenario, "pods/binding"):
        scenario.create_pod("first", {"1g.5gb": 1})
        failed = wait_until(
            lambda: [m for m in scenario.events("first", "FailedScheduling") if "webhook" in m], 30, "a bind to fail"
        )
    # Nothing refuses binds any more, and the slice is free: the next try must bind it.
    try:
        bound_to = scenario.wait_bound("first", timeout=20)
    finally:
        report(
            "bind failed with a 5xx",
            first_failure=failed[0][:160],
            then=[m[:160] for m in scenario.events("first", "FailedScheduling") if "webhook" not in m][:1],
        )
    assert bound_to == node
    check_invariants(scenario.api, scenario.namespace, ["first"])
