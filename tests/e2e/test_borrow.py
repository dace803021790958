"""Borrowing on the real control plane: owned pods, Jobs, bare pods across a crash, policy, and exact-first."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from extender.kube.api import path
from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import SUCCEED_AFTER, create_node, pod_template

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"
G1 = "nvidia.com/mig-1g.5gb"
G2 = "nvidia.com/mig-2g.10gb"
JOB_RUNS_FOR = 8  # seconds each of the Job's pods runs once started: past the checks made while they run
LOAN_KEYS = ("migchain.io/original-requests", "migchain.io/borrowed-requests", "migchain.io/chain", "migchain.io/steps")


def template(scenario: Scenario, labels: dict[str, str]) -> dict[str, Any]:
    return pod_template(scenario.test, {"1g.5gb": 1}, labels)


def fill_small_slices(scenario: Scenario, node: str, count: int) -> None:
    """Take every 1g.5gb of `node` with pods that fit exactly, so what follows must borrow."""
    for index in range(count):
        scenario.create_pod(f"filler-{index}", {"1g.5gb": 1})
    for index in range(count):
        assert scenario.wait_bound(f"filler-{index}") == node


def live_pods(scenario: Scenario, owner_uid: str) -> list[dict[str, Any]]:
    return [
        pod
        for pod in scenario.pods()
        if not pod["metadata"].get("deletionTimestamp")
        and any(ref.get("uid") == owner_uid for ref in pod["metadata"].get("ownerReferences") or [])
    ]


def assert_borrower(pod: dict[str, Any], node: str) -> None:
    annotations = pod["metadata"].get("annotations") or {}
    assert pod["spec"]["nodeName"] == node
    assert annotations["migchain.io/original-requests"] == f"{G1}=1"
    assert annotations["migchain.io/borrowed-requests"] == f"{G2}=1"
    assert annotations["migchain.io/chain"] == "a100-40gb"
    assert annotations["migchain.io/steps"] == "2"
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {G2: "1"}


def reasons(scenario: Scenario, kind: str, name: str) -> list[str]:
    items, _ = scenario.api.list_all(
        path("api", "v1", "namespaces", scenario.namespace, "events"),
        fieldSelector=f"involvedObject.kind={kind},involvedObject.name={name}",
    )
    return [item["reason"] for item in items]


def test_a_deployment_borrows_and_its_replicaset_still_owns_exactly_three(scenario: Scenario):
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"1g.5gb": 2, "2g.10gb": 4}, scenario.test)
    fill_small_slices(scenario, node, 2)
    labels = {"app": "infer"}
    scenario.api.create(
        path("apis", "apps", "v1", "namespaces", scenario.namespace, "deployments"),
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "infer"},
            "spec": {"replicas": 3, "selector": {"matchLabels": labels}, "template": template(scenario, labels)},
        },
    )
    [replica_set] = wait_until(
        lambda: scenario.api.list_all(path("apis", "apps", "v1", "namespaces", scenario.namespace, "replicasets"))[0],
        30,
        "the ReplicaSet",
    )
    owner = replica_set["metadata"]["uid"]
    wait_until(
        lambda: len([p for p in live_pods(scenario, owner) if p["spec"].get("nodeName")]) == 3, 60, "3 borrowers"
    )
    time.sleep(2)  # let the controller settle: it must not add or drop pods now
    pods = live_pods(scenario, owner)
    assert len(pods) == 3
    for pod in pods:
        assert_borrower(pod, node)
        assert "Borrowed" in reasons(scenario, "Pod", pod["metadata"]["name"])
    deployment = scenario.api.get(path("apis", "apps", "v1", "namespaces", scenario.namespace, "deployments", "infer"))
    assert deployment["status"].get("replicas") == 3
    # For the closing note: what the ReplicaSet controller did.
    print("ReplicaSet events:", reasons(scenario, "ReplicaSet", replica_set["metadata"]["name"]))


def test_a_job_borrows_and_is_not_charged_a_failure(scenario: Scenario):
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"1g.5gb": 1, "2g.10gb": 2}, scenario.test)
    fill_small_slices(scenario, node, 1)
    scenario.api.create(
        path("apis", "batch", "v1", "namespaces", scenario.namespace, "jobs"),
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "train"},
            "spec": {
                "parallelism": 2,
                "completions": 2,
                "backoffLimit": 0,  # a single failure would fail the Job
                "template": {
                    "metadata": {"annotations": {SUCCEED_AFTER: f"{JOB_RUNS_FOR}s"}},  # kwok ends them, exit 0
                    "spec": {**template(scenario, {})["spec"], "restartPolicy": "Never"},
                },
            },
        },
    )
    job = wait_until(
        lambda: scenario.api.get(path("apis", "batch", "v1", "namespaces", scenario.namespace, "jobs", "train")),
        10,
        "the Job",
    )
    owner = job["metadata"]["uid"]
    wait_until(
        lambda: len([p for p in live_pods(scenario, owner) if p["spec"].get("nodeName")]) == 2, 60, "2 borrowers"
    )
    time.sleep(2)
    pods = live_pods(scenario, owner)
    assert len(pods) == 2
    for pod in pods:
        assert_borrower(pod, node)
    status = scenario.api.get(path("apis", "batch", "v1", "namespaces", scenario.namespace, "jobs", "train"))["status"]
    assert status.get("failed", 0) == 0, status
    assert status.get("active") == 2, status
    # The borrowers run their time and complete; the Job succeeds on them.
    wait_until(
        lambda: (
            scenario.api.get(path("apis", "batch", "v1", "namespaces", scenario.namespace, "jobs", "train"))[
                "status"
            ].get("succeeded")
            == 2
        ),
        JOB_RUNS_FOR + 30,
        "the Job to count 2 successes",
    )
    ended = {pod["metadata"]["uid"] for pod in live_pods(scenario, owner) if pod["status"].get("phase") == "Succeeded"}
    assert ended == {pod["metadata"]["uid"] for pod in pods}  # the borrowers themselves, not restarted copies
    print("Job events:", reasons(scenario, "Job", "train"))


def test_a_bare_pod_borrows_keeps_its_name_and_survives_a_crash_mid_borrow(scenario: Scenario):
    cluster = scenario.cluster
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"2g.10gb": 1}, scenario.test)
    # Crash after the original is deleted and before the replacement exists.
    cluster.extender.env = {**os.environ, "MIGCHAIN_FAILPOINTS": "bare-after-delete"}
    cluster.restart_extender(kill=False)
    try:
        original = scenario.create_pod("notebook", {"1g.5gb": 1})
        wait_until(lambda: not cluster.extender.alive(), 30, "the extender to hit its failpoint")
        journal, _ = scenario.api.list_all(
            path("api", "v1", "namespaces", "migchain-system", "configmaps"), labelSelector="migchain.io/journal"
        )
        assert any(original["metadata"]["uid"] in item["metadata"]["name"] for item in journal)
    finally:
        cluster.extender.env = None
        cluster.extender.start()
        cluster.wait_extender_ready()
    pod = wait_until(lambda: scenario.pod("notebook"), 30, "the pod to be back under its name")
    assert pod["metadata"]["uid"] != original["metadata"]["uid"]
    assert pod["metadata"]["annotations"]["migchain.io/replaced-uid"] == original["metadata"]["uid"]
    assert_borrower(pod, node)
    wait_until(
        lambda: (
            not scenario.api.list_all(
                path("api", "v1", "namespaces", "migchain-system", "configmaps"), labelSelector="migchain.io/journal"
            )[0]
        ),
        10,
        "the journal to be cleared",
    )


@pytest.mark.parametrize(
    ("annotations", "namespace_reason"),
    [
        ({"migchain.io/borrow": "false"}, "borrowing off: pod annotation migchain.io/borrow=false"),
    ],
)
def test_an_opted_out_pod_stays_pending_with_a_clear_reason(scenario: Scenario, annotations, namespace_reason):
    create_node(scenario.api, f"gpu-{scenario.test}-a", A100, {"2g.10gb": 1}, scenario.test)
    scenario.create_pod("private", {"1g.5gb": 1}, annotations=annotations)
    messages = wait_until(lambda: scenario.events("private", "FailedScheduling"), 30, "FailedScheduling")
    assert namespace_reason in messages[0]
    assert not scenario.pod("private")["spec"].get("nodeName")


def test_a_type_the_policy_forbids_is_never_borrowed(scenario: Scenario):
    # 3g.20gb -> 7g.40gb is 2 steps, within maxSteps, but 7g.40gb is not in allowedTypes.
    create_node(scenario.api, f"gpu-{scenario.test}-a", A100, {"7g.40gb": 1}, scenario.test)
    scenario.create_pod("big", {"3g.20gb": 1})
    messages = wait_until(lambda: scenario.events("big", "FailedScheduling"), 30, "FailedScheduling")
    assert "7g.40gb denied: 7g.40gb is not in allowedTypes of chain a100-40gb" in messages[0]
    assert not scenario.pod("big")["spec"].get("nodeName")


def test_a_statefulset_pod_never_borrows(scenario: Scenario):
    create_node(scenario.api, f"gpu-{scenario.test}-a", A100, {"2g.10gb": 1}, scenario.test)
    labels = {"app": "db"}
    scenario.api.create(
        path("apis", "apps", "v1", "namespaces", scenario.namespace, "statefulsets"),
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "db"},
            "spec": {
                "replicas": 1,
                "serviceName": "db",
                "selector": {"matchLabels": labels},
                "template": template(scenario, labels),
            },
        },
    )
    messages = wait_until(lambda: scenario.events("db-0", "FailedScheduling"), 30, "FailedScheduling for db-0")
    assert "StatefulSet pods never borrow" in messages[0]


def test_an_exact_fit_is_preferred_to_any_borrow(scenario: Scenario):
    create_node(scenario.api, f"gpu-{scenario.test}-big", A100, {"2g.10gb": 3, "3g.20gb": 2}, scenario.test)
    create_node(scenario.api, f"gpu-{scenario.test}-small", A100, {"1g.5gb": 1}, scenario.test)
    scenario.create_pod("exact", {"1g.5gb": 1})
    assert scenario.wait_bound("exact") == f"gpu-{scenario.test}-small"
    pod = scenario.pod("exact")
    assert not any(key in (pod["metadata"].get("annotations") or {}) for key in LOAN_KEYS)
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {G1: "1"}
