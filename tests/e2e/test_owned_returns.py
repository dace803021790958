"""Returns of pods a controller owns, on the real control plane: Deployments, Jobs (indexed, with a
podFailurePolicy), and which pods a ReplicaSet scale-down removes (issue 16, items 3 and 4)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from extender.kube.api import ApiError, path
from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import create_node, pod_template, replica_set

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"  # chain a100-40gb: on-demand returns
EAGER_GPU = "TEST-EAGER-GPU"  # tests/fixtures/chains/e2e-eager.yaml: eager returns
G1 = "nvidia.com/mig-1g.5gb"
INDEX = "batch.kubernetes.io/job-completion-index"


def loaned(pod: dict[str, Any]) -> bool:
    return "migchain.io/replaced-uid" in (pod["metadata"].get("annotations") or {})


def owned_by(scenario: Scenario, owner_uid: str) -> list[dict[str, Any]]:
    """The owner's pods that are not on their way out."""
    return [
        pod
        for pod in scenario.pods()
        if not pod["metadata"].get("deletionTimestamp")
        and any(ref.get("uid") == owner_uid for ref in pod["metadata"].get("ownerReferences") or [])
    ]


def borrowers_of(scenario: Scenario, owner_uid: str, count: int) -> list[dict[str, Any]] | None:
    """The owner's running borrowers once there are `count` of them; None until then."""
    pods = [pod for pod in owned_by(scenario, owner_uid) if loaned(pod) and pod["spec"].get("nodeName")]
    return pods if len(pods) == count else None


def fill(scenario: Scenario, node: str, count: int) -> list[str]:
    """Take `count` 1g.5gb slices of `node` with bare pods that fit exactly, so what follows must borrow."""
    names = [f"filler-{index}" for index in range(count)]
    for name in names:
        scenario.create_pod(name, {"1g.5gb": 1})
    for name in names:
        assert scenario.wait_bound(name) == node
    return names


def left(scenario: Scenario, pod: dict[str, Any]) -> bool:
    """Whether that pod (that UID) is gone or on its way out."""
    try:
        current = scenario.pod(pod["metadata"]["name"])
    except ApiError:
        return True
    return current["metadata"]["uid"] != pod["metadata"]["uid"] or bool(current["metadata"].get("deletionTimestamp"))


def job_path(scenario: Scenario, name: str = "") -> str:
    return path("apis", "batch", "v1", "namespaces", scenario.namespace, "jobs", *([name] if name else []))


def create_job(scenario: Scenario, name: str, spec: dict[str, Any]) -> str:
    """A Job of pods like `mig_pod`'s asking for one 1g.5gb, backoffLimit 0 (one failure fails it); its UID."""
    template = pod_template(scenario.test, {"1g.5gb": 1}, {})
    template["spec"]["restartPolicy"] = "Never"
    job = scenario.api.create(
        job_path(scenario),
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name},
            "spec": {"backoffLimit": 0, "template": template, **spec},
        },
    )
    return str(job["metadata"]["uid"])


def job_status(scenario: Scenario, name: str) -> dict[str, Any]:
    status: dict[str, Any] = scenario.api.get(job_path(scenario, name)).get("status") or {}
    return status


def conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c.get("reason", "") for c in status.get("conditions") or [] if c.get("status") == "True"}


def successor_or_failure(scenario: Scenario, job: str, owner: str, seen: set[str]) -> dict[str, Any] | str | None:
    """A new pod of the Job (not one in `seen`) bound without a loan; or why the Job failed; None until either."""
    failed = conditions(job_status(scenario, job)).get("Failed")
    if failed is not None:
        return f"the Job failed: {failed}"
    for pod in owned_by(scenario, owner):
        if pod["metadata"]["uid"] not in seen and pod["spec"].get("nodeName") and not loaned(pod):
            return pod
    return None


def kubelet_fails_it_once_terminating(scenario: Scenario, pod: dict[str, Any]) -> None:
    """What a real kubelet does to a pod being deleted: it stops it and reports it Failed before it goes.

    kwok (tests/e2e/kube/stages.yaml) only finishes deletions; a pod a finalizer holds would stay Running.
    """
    wait_until(lambda: left(scenario, pod), 30, "the return to start")
    try:
        current = scenario.pod(pod["metadata"]["name"])
        if current["metadata"]["uid"] == pod["metadata"]["uid"]:
            scenario.set_phase(pod["metadata"]["name"], "Failed")
    except ApiError:
        pass  # gone already: nothing held it


def finish_job(scenario: Scenario, job: str, owner: str, completions: int) -> dict[str, Any]:
    """Complete the Job's running pods, as their containers would; its status once it counts them.

    Borrowers first: a pod that fits exactly frees its slice as it ends, and an
    eager return would take a borrower still running.
    """
    for pod in sorted(owned_by(scenario, owner), key=lambda pod: not loaned(pod)):
        scenario.set_phase(pod["metadata"]["name"], "Succeeded")
    status: dict[str, Any] = wait_until(
        lambda: (s := job_status(scenario, job)).get("succeeded") == completions and "Complete" in conditions(s) and s,
        30,
        f"Job {job} to complete",
    )
    return status


# -- item 3: the next return on the node comes at once -------------------------


def test_after_a_deployments_borrower_is_returned_the_next_return_comes_within_a_second(scenario: Scenario):
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, EAGER_GPU, {"1g.5gb": 2, "2g.10gb": 2}, scenario.test)
    fillers = fill(scenario, node, 2)
    labels = {"app": "infer"}
    scenario.api.create(
        path("apis", "apps", "v1", "namespaces", scenario.namespace, "deployments"),
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "infer"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": pod_template(scenario.test, {"1g.5gb": 1}, labels),
            },
        },
    )
    [owner] = wait_until(
        lambda: scenario.api.list_all(path("apis", "apps", "v1", "namespaces", scenario.namespace, "replicasets"))[0],
        30,
        "the ReplicaSet",
    )
    owner_uid = owner["metadata"]["uid"]
    borrowers = wait_until(lambda: borrowers_of(scenario, owner_uid, 2), 30, "two borrowers")
    delays = []
    for filler in fillers:
        freed = time.monotonic()
        scenario.set_phase(filler, "Succeeded")
        [going] = wait_until(
            lambda: [p for p in borrowers if left(scenario, p)], 45, "a borrower to be returned", interval=0.02
        )
        delays.append(time.monotonic() - freed)
        borrowers.remove(going)
        # Its successor, created by the ReplicaSet, lands on the freed 1g.5gb.
        wait_until(
            lambda: (
                len([p for p in owned_by(scenario, owner_uid) if p["spec"].get("nodeName") and not loaned(p)])
                == 2 - len(borrowers)
            ),
            30,
            "the ReplicaSet's new pod to run on the freed slice",
        )
    print(f"seconds from a slice freeing to its return: first {delays[0]:.2f}, second {delays[1]:.2f}")
    assert delays[1] < 1.0, delays


# -- item 4: returning a Job's pod is never one of its failures -----------------


def test_returning_a_jobs_borrower_costs_the_job_no_failure_and_it_completes(scenario: Scenario):
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, EAGER_GPU, {"1g.5gb": 1, "2g.10gb": 1}, scenario.test)
    [filler] = fill(scenario, node, 1)
    owner = create_job(scenario, "train", {})
    [borrower] = wait_until(lambda: borrowers_of(scenario, owner, 1), 30, "the Job's pod to borrow")
    freed = time.monotonic()
    scenario.set_phase(filler, "Succeeded")
    successor = wait_until(
        lambda: successor_or_failure(scenario, "train", owner, {borrower["metadata"]["uid"]}), 30, "a new pod"
    )
    assert isinstance(successor, dict), successor
    print(f"seconds from the slice freeing to the Job's new pod running on it: {time.monotonic() - freed:.2f}")
    assert successor["spec"]["nodeName"] == node
    assert successor["spec"]["containers"][0]["resources"]["limits"] == {G1: "1"}
    assert job_status(scenario, "train").get("failed", 0) == 0
    status = finish_job(scenario, "train", owner, completions=1)
    assert status.get("failed", 0) == 0, status


def test_an_indexed_jobs_returned_pod_comes_back_with_its_completion_index(scenario: Scenario):
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, EAGER_GPU, {"1g.5gb": 1, "2g.10gb": 2}, scenario.test)
    [filler] = fill(scenario, node, 1)
    owner = create_job(scenario, "shard", {"completionMode": "Indexed", "completions": 2, "parallelism": 2})
    borrowers = wait_until(lambda: borrowers_of(scenario, owner, 2), 30, "both indexes to borrow")
    scenario.set_phase(filler, "Succeeded")
    seen = {pod["metadata"]["uid"] for pod in borrowers}
    successor = wait_until(lambda: successor_or_failure(scenario, "shard", owner, seen), 30, "a new pod")
    assert isinstance(successor, dict), successor
    [returned] = [pod for pod in borrowers if left(scenario, pod)]
    assert successor["metadata"]["annotations"][INDEX] == returned["metadata"]["annotations"][INDEX]
    status = finish_job(scenario, "shard", owner, completions=2)
    assert status.get("failed", 0) == 0, status
    assert status.get("completedIndexes") == "0,1", status


def test_returning_a_jobs_borrower_is_no_failure_under_a_pod_failure_policy(scenario: Scenario):
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, EAGER_GPU, {"1g.5gb": 1, "2g.10gb": 1}, scenario.test)
    [filler] = fill(scenario, node, 1)
    # With a podFailurePolicy the Job waits for a deleted pod to be Failed, then counts it
    # unless a rule says otherwise: this one only fails the Job on exit code 42.
    policy = {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}}]}
    owner = create_job(scenario, "train", {"podFailurePolicy": policy})
    [borrower] = wait_until(lambda: borrowers_of(scenario, owner, 1), 30, "the Job's pod to borrow")
    scenario.set_phase(filler, "Succeeded")
    kubelet_fails_it_once_terminating(scenario, borrower)
    successor = wait_until(
        lambda: successor_or_failure(scenario, "train", owner, {borrower["metadata"]["uid"]}), 30, "a new pod"
    )
    assert isinstance(successor, dict), successor
    status = finish_job(scenario, "train", owner, completions=1)
    assert status.get("failed", 0) == 0, status


def test_a_pdb_that_blocks_a_jobs_return_leaves_its_pod_tracked(scenario: Scenario):
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, EAGER_GPU, {"1g.5gb": 1, "2g.10gb": 1}, scenario.test)
    [filler] = fill(scenario, node, 1)
    owner = create_job(scenario, "train", {})
    [borrower] = wait_until(lambda: borrowers_of(scenario, owner, 1), 30, "the Job's pod to borrow")
    scenario.api.create(
        path("apis", "policy", "v1", "namespaces", scenario.namespace, "poddisruptionbudgets"),
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": "keep-train"},
            "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"job-name": "train"}}},
        },
    )
    scenario.set_phase(filler, "Succeeded")
    name = borrower["metadata"]["name"]
    wait_until(lambda: scenario.events(name, "ReturnBlocked"), 30, "the return to be blocked")
    pod = scenario.pod(name)
    assert pod["metadata"]["uid"] == borrower["metadata"]["uid"] and not pod["metadata"].get("deletionTimestamp")
    assert "batch.kubernetes.io/job-tracking" in pod["metadata"]["finalizers"]
    status = finish_job(scenario, "train", owner, completions=1)
    assert status.get("failed", 0) == 0, status


# -- scale-down: borrowers go first --------------------------------------------


def test_a_replicaset_scale_down_removes_borrowers_before_exact_fits(scenario: Scenario):
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"1g.5gb": 2, "2g.10gb": 2}, scenario.test)
    fillers = fill(scenario, node, 2)
    replica_sets = path("apis", "apps", "v1", "namespaces", scenario.namespace, "replicasets")
    owner = scenario.api.create(replica_sets, replica_set("web", scenario.test, {"1g.5gb": 1}, 2))["metadata"]["uid"]
    wait_until(lambda: borrowers_of(scenario, owner, 2), 30, "two borrowers")
    # Ready well before the exact fits: a ReplicaSet left to itself removes its newest pods first.
    time.sleep(3)
    for filler in fillers:
        scenario.set_phase(filler, "Succeeded")
    scenario.api.patch(f"{replica_sets}/web", {"spec": {"replicas": 4}})
    wait_until(
        lambda: len([p for p in owned_by(scenario, owner) if p["spec"].get("nodeName") and not loaned(p)]) == 2,
        30,
        "two exact fits",
    )
    scenario.api.patch(f"{replica_sets}/web", {"spec": {"replicas": 2}})
    kept = wait_until(lambda: pods if len(pods := owned_by(scenario, owner)) == 2 else None, 30, "two pods left")
    assert not any(loaned(pod) for pod in kept), [pod["metadata"].get("annotations") for pod in kept]
