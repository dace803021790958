"""Returns of pods a controller owns, on the real control plane: Deployments, Jobs (indexed, with a
podFailurePolicy), and which pods a ReplicaSet scale-down removes (issue 16, items 3 and 4)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from extender.kube.api import ApiError, path
from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import create_node, pod_template

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

    The stand-in kubelet only finishes deletions; a pod a finalizer holds would stay Running.
    """
    wait_until(lambda: left(scenario, pod), 30, "the return to start")
    try:
        current = scenario.pod(pod["metadata"]["name"])
        if current["metadata"]["uid"] == pod["metadata"]["uid"]:
            scenario.set_phase(pod["metadata"]["name"], "Failed")
    except ApiError:
        pass  # gone already: nothing held it


def finish_job(scenario: Scenario, job: str, owner: str, completions: int) -> dict[str, Any]:
    """Complete the Job's running pods, as their containers would; its status once it counts them."""
    for pod in owned_by(scenario, owner):
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
