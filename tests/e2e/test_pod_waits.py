"""Waits a pod controls, on the real control plane: finalizers on bare pods, a slow-terminating borrower, journal
recovery past terminating originals, and a reservation that must outlast a slow borrow.

A finalizer someone else holds keeps a deleted pod Terminating for as long as its holder likes: no bind thread,
return round or recovery pass may wait on it. And however long a borrow's API calls take, the slices reserved for
it stay reserved until it is over, so no slice is given twice.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from extender.config import load_rules
from extender.core.cluster import node_state, pod_request
from extender.core.decide import Placement, place
from extender.core.loan import plan_borrow
from extender.kube.api import ApiError, path
from extender.kube.executor import Executor
from tests.e2e.conftest import CHAINS, Cluster, Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import create_node, mig_pod
from tests.e2e.invariants import borrowing, check_invariants, journaled_pods, namespace_pods, over_commits, settle

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"
OPT_OUT_GPU = "TEST-OPT-OUT-GPU"  # tests/fixtures/chains/e2e-opt-outs.yaml: pod opt-outs honoured
EAGER_GPU = "TEST-EAGER-GPU"  # tests/fixtures/chains/e2e-eager.yaml: returnMode eager
HOLD = "e2e.migchain.io/hold"
FAILPOINTS = "MIGCHAIN_FAILPOINTS"
HOSTNAME = "kubernetes.io/hostname"


def report(test: str, **numbers: Any) -> None:
    """The numbers a run saw, on one line (pytest -s shows them; -rA keeps them in the summary)."""
    print(f"\n[waits] {test}: " + ", ".join(f"{key}={value}" for key, value in numbers.items()))


def pod_resource(scenario: Scenario, name: str) -> str:
    return path("api", "v1", "namespaces", scenario.namespace, "pods", name)


def let_go(scenario: Scenario, names: list[str]) -> None:
    """The finalizer's holder lets go of every pod named (those still there)."""
    for name in names:
        with contextlib.suppress(ApiError):
            scenario.api.patch(pod_resource(scenario, name), {"metadata": {"finalizers": None}})


def restart_extender(cluster: Cluster, failpoints: str = "") -> None:
    extender = cluster.extender
    extender.kill()
    extender.env = {**os.environ, FAILPOINTS: failpoints} if failpoints else None
    extender.start()
    cluster.wait_extender_ready()


@contextlib.contextmanager
def extender_restarted_with(cluster: Cluster, failpoints: str) -> Iterator[None]:
    restart_extender(cluster, failpoints)
    try:
        yield
    finally:
        restart_extender(cluster)


def replaced(scenario: Scenario, name: str, old_uid: str) -> dict[str, Any] | None:
    """The pod of that name if it is a new one (not `old_uid`) and bound; None until then."""
    try:
        pod = scenario.pod(name)
    except ApiError:
        return None
    if pod["metadata"]["uid"] == old_uid or not pod["spec"].get("nodeName"):
        return None
    return pod


# -- 3a: bare pods with a finalizer ----------------------------------------------------------------------------------


def test_eight_bare_pods_with_a_finalizer_never_stall_the_binds_of_other_pods(scenario: Scenario):
    node = f"gpu-{scenario.test}-a"
    # No 1g.5gb anywhere: the held pods could only borrow a 2g.10gb; the 3g.20gb pods fit exactly.
    create_node(scenario.api, node, A100, {"2g.10gb": 12, "3g.20gb": 4}, scenario.test)
    held = [f"held-{index}" for index in range(10)]
    prompt = [f"prompt-{index}" for index in range(4)]
    uids: dict[str, str] = {}
    try:
        for name in held:
            pod = mig_pod(name, scenario.test, {"1g.5gb": 1})
            pod["metadata"]["finalizers"] = [HOLD]
            uids[name] = scenario.api.create(path("api", "v1", "namespaces", scenario.namespace, "pods"), pod)[
                "metadata"
            ]["uid"]
        time.sleep(3)  # the held pods go through filter and bind first
        started = time.monotonic()
        for name in prompt:
            scenario.create_pod(name, {"3g.20gb": 1})
        latencies = []
        for name in prompt:
            scenario.wait_bound(name, timeout=90)
            latencies.append(round(time.monotonic() - started, 1))
        # Every held pod is there as it was made: pending, never deleted, never only in the journal.
        pods = {pod["metadata"]["name"]: pod for pod in namespace_pods(scenario.api, scenario.namespace)}
        touched = [
            name
            for name in held
            if pods.get(name, {}).get("metadata", {}).get("uid") != uids[name]
            or pods[name]["metadata"].get("deletionTimestamp")
        ]
        journaled = journaled_pods(scenario.api, scenario.namespace)
        reason: list[str] = []
        with contextlib.suppress(TimeoutError):
            reason = wait_until(
                lambda: [m for m in scenario.events("held-0", "FailedScheduling") if "finalizer" in m], 30, ""
            )
    finally:
        let_go(scenario, held)
    report("finalizer pods", prompt_bind_seconds=latencies, held_touched=touched, journaled=journaled)
    assert max(latencies) < 10, f"exact-fit pods waited {latencies} s behind the held pods' binds"
    assert not touched, f"bare pods with a finalizer were deleted: {touched}"
    assert not journaled
    assert reason, "no FailedScheduling event says why the held pods do not borrow"
    settle(scenario.api, scenario.namespace)  # let go of, the held pods may borrow now
    check_invariants(scenario.api, scenario.namespace, held + prompt)


# -- 3b: a slow-terminating borrower -----------------------------------------------------------------------------------


def test_a_slow_terminating_borrower_does_not_hold_other_returns_back(scenario: Scenario):
    nodes = [f"gpu-{scenario.test}-{side}" for side in ("a", "b")]
    for node in nodes:
        create_node(scenario.api, node, EAGER_GPU, {"1g.5gb": 1, "2g.10gb": 1}, scenario.test)
    for node, filler, borrower in zip(nodes, ("filler-a", "filler-b"), ("slow", "quick"), strict=True):
        scenario.create_pod(filler, {"1g.5gb": 1}, node_selector={HOSTNAME: node})
        assert scenario.wait_bound(filler) == node
        scenario.create_pod(borrower, {"1g.5gb": 1}, node_selector={HOSTNAME: node})
        wait_until(lambda name=borrower: borrowing(scenario.pod(name)), 30, f"{borrower} to borrow")
    slow, quick = scenario.pod("slow"), scenario.pod("quick")
    # Someone adds a finalizer to the running borrower: once evicted, it stays Terminating until they let go.
    scenario.api.patch(pod_resource(scenario, "slow"), {"metadata": {"finalizers": [HOLD]}})
    try:
        scenario.set_phase("filler-a", "Succeeded")  # eager: `slow` goes back to its 1g.5gb
        wait_until(lambda: scenario.pod("slow")["metadata"].get("deletionTimestamp"), 30, "slow to be evicted")
        time.sleep(1)
        started = time.monotonic()
        scenario.set_phase("filler-b", "Succeeded")
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: replaced(scenario, "quick", quick["metadata"]["uid"]), 30, "")
        quick_seconds = round(time.monotonic() - started, 1)
        slow_waiting = bool(scenario.pod("slow")["metadata"].get("deletionTimestamp"))
    finally:
        let_go(scenario, ["slow"])
    let_go_at = time.monotonic()
    back = wait_until(lambda: replaced(scenario, "slow", slow["metadata"]["uid"]), 30, "slow to be recreated")
    slow_seconds = round(time.monotonic() - let_go_at, 1)
    report("slow-terminating borrower", other_return_seconds=quick_seconds, slow_back_after_let_go=slow_seconds)
    assert quick_seconds < 15, f"the other return waited {quick_seconds} s behind a terminating borrower"
    assert slow_waiting
    assert slow_seconds < 10, f"the slow borrower came back {slow_seconds} s after it went"
    assert not borrowing(back) and back["spec"]["nodeName"] == nodes[0]
    assert not borrowing(scenario.pod("quick"))
    check_invariants(scenario.api, scenario.namespace, ["slow", "quick", "filler-a", "filler-b"])


# -- 3c: recovery past terminating originals ---------------------------------------------------------------------------


def journal_a_borrow(scenario: Scenario, executor: Executor, pod: dict[str, Any], node: dict[str, Any]) -> None:
    """Journal a borrow of `pod` on `node` and delete the original, as the extender does before it is killed.

    The borrow is planned on the pod as read before any finalizer was added: one added between that read and
    the delete keeps the original Terminating.
    """
    rules = load_rules(CHAINS)
    pod = copy.deepcopy(pod)
    pod["metadata"].pop("finalizers", None)
    placement = place(pod_request(pod), node_state(node), node["metadata"]["name"], rules)
    assert isinstance(placement, Placement) and placement.borrows
    executor._write_journal(plan_borrow(pod, placement, executor.loan_key))
    scenario.api.delete(
        pod_resource(scenario, pod["metadata"]["name"]),
        {"gracePeriodSeconds": 0, "preconditions": {"uid": pod["metadata"]["uid"]}},
    )


def test_recovery_finishes_every_entry_it_can_without_waiting_on_terminating_originals(scenario: Scenario):
    cluster = scenario.cluster
    node_name = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node_name, A100, {"2g.10gb": 12}, scenario.test)
    node = scenario.api.get(path("api", "v1", "nodes", node_name))
    held = [f"held-{index}" for index in range(8)]
    gone = [f"gone-{index}" for index in range(3)]
    executor = Executor(scenario.api, "migchain-system", cluster.plane.loan_key.read_bytes())
    uids: dict[str, str] = {}
    cluster.extender.kill()  # the extender dies with all these borrows half-done
    try:
        for name in held + gone:
            pod = mig_pod(name, scenario.test, {"1g.5gb": 1}, spec={"schedulerName": "nobody"})
            if name in held:
                pod["metadata"]["finalizers"] = [HOLD]  # deleted, it stays Terminating
            pod = scenario.api.create(path("api", "v1", "namespaces", scenario.namespace, "pods"), pod)
            uids[name] = pod["metadata"]["uid"]
            journal_a_borrow(scenario, executor, pod, node)
        restart_extender(cluster)
        started = time.monotonic()
        recovered = []
        for name in gone:
            with contextlib.suppress(TimeoutError):
                wait_until(lambda name=name: replaced(scenario, name, uids[name]), 60, "")
            recovered.append(round(time.monotonic() - started, 1))
    finally:
        let_go(scenario, held)
        if not cluster.extender.alive():
            restart_extender(cluster)
    let_go_at = time.monotonic()
    for name in held:
        wait_until(lambda name=name: replaced(scenario, name, uids[name]), 30, f"{name} recreated")
    held_seconds = round(time.monotonic() - let_go_at, 1)
    report("recovery past terminating originals", gone_recovered_at=recovered, held_back_after_let_go=held_seconds)
    assert max(recovered) < 10, f"entries behind 8 terminating originals were finished only after {recovered} s"
    for name in held + gone:
        assert borrowing(scenario.pod(name)) and scenario.pod(name)["spec"]["nodeName"] == node_name
    check_invariants(scenario.api, scenario.namespace, held + gone)


# -- 4: a reservation outlasts a slow borrow ---------------------------------------------------------------------------

# cache.RESERVATION_TTL is 60 s and its janitor looks every 5 s: a borrow paused this long outlives an expiry.
SLOW_BORROW_SECONDS = 80
EXPIRED_BY_SECONDS = 68


def test_a_reservation_holds_while_its_borrow_is_slow_and_no_slice_is_given_twice(scenario: Scenario):
    cluster = scenario.cluster
    node = f"gpu-{scenario.test}-a"
    # On the chain that honours `migchain.io/return: "false"`: `exact`, waiting for its own type, would
    # otherwise take the slice back from the borrower once the borrow is done (a reclaim), and this test is
    # about the reservation while it is under way.
    create_node(scenario.api, node, OPT_OUT_GPU, {"2g.10gb": 1}, scenario.test)
    # The API answers slowly: the borrow stalls between deleting the original and creating its copy.
    with extender_restarted_with(cluster, f"bare-after-delete@{SLOW_BORROW_SECONDS}"):
        original = scenario.create_pod("slow-borrow", {"1g.5gb": 1}, annotations={"migchain.io/return": "false"})
        wait_until(lambda: not namespace_pods(scenario.api, scenario.namespace), 30, "the delete")
        deleted_at = time.monotonic()
        time.sleep(max(0.0, deleted_at + EXPIRED_BY_SECONDS - time.monotonic()))
        # The reservation would have expired by now: a pod that fits the one slice exactly comes.
        scenario.create_pod("exact", {"2g.10gb": 1})
        back = wait_until(
            lambda: replaced(scenario, "slow-borrow", original["metadata"]["uid"]), 40, "the borrow to finish"
        )
        finished = round(time.monotonic() - deleted_at, 1)
        time.sleep(3)  # any bind of `exact` in flight lands
        nodes, _ = scenario.api.list_all("/api/v1/nodes", labelSelector=f"e2e.migchain.io/test={scenario.test}")
        pods = namespace_pods(scenario.api, scenario.namespace)
        problems = over_commits(nodes, pods)
        exact_node = scenario.pod("exact")["spec"].get("nodeName")
    report("slow borrow", borrow_seconds=finished, exact_bound_to=exact_node, over_commits=problems)
    assert back["spec"]["nodeName"] == node and borrowing(back)
    assert not exact_node, f"the slice reserved for slow-borrow was given to `exact` too ({problems})"
    assert not problems
