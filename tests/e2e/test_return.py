"""Returns on the real control plane: eager, on-demand, a blocking PDB, a returner killed mid-return, two replicas."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from extender.kube.api import ApiError, path
from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import create_node

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"
EAGER_GPU = "TEST-EAGER-GPU"  # covered by tests/fixtures/chains/e2e-eager.yaml, returnMode eager
G1 = "nvidia.com/mig-1g.5gb"


def limits(pod: dict[str, Any]) -> dict[str, str]:
    return dict(pod["spec"]["containers"][0]["resources"]["limits"])


def borrowing(pod: dict[str, Any]) -> bool:
    return "migchain.io/replaced-uid" in (pod["metadata"].get("annotations") or {})


def two_borrowers(scenario: Scenario, product: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """One node: a 1g.5gb held by `filler`, `b1` borrowing the 2g.10gb, `b2` borrowing the 3g.20gb."""
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, product, {"1g.5gb": 1, "2g.10gb": 1, "3g.20gb": 1}, scenario.test)
    scenario.create_pod("filler", {"1g.5gb": 1})
    scenario.wait_bound("filler")
    scenario.create_pod("b1", {"1g.5gb": 1}, labels={"app": "b1"})
    wait_until(lambda: borrowing(scenario.pod("b1")), 30, "b1 to borrow")
    scenario.create_pod("b2", {"1g.5gb": 1}, labels={"app": "b2"})
    wait_until(lambda: borrowing(scenario.pod("b2")), 30, "b2 to borrow")
    b1, b2 = scenario.pod("b1"), scenario.pod("b2")
    assert limits(b1) == {"nvidia.com/mig-2g.10gb": "1"}
    assert limits(b2) == {"nvidia.com/mig-3g.20gb": "1"}
    return node, b1, b2


def returned(scenario: Scenario, name: str, old: dict[str, Any]) -> dict[str, Any] | None:
    """The pod back under its name with its original request, bound, no loan; None until then."""
    try:
        pod = scenario.pod(name)
    except ApiError:
        return None
    if pod["metadata"]["uid"] == old["metadata"]["uid"] or borrowing(pod) or not pod["spec"].get("nodeName"):
        return None
    return pod


def test_eager_restores_the_most_steps_borrower_onto_the_freed_slice(scenario: Scenario):
    node, b1, b2 = two_borrowers(scenario, EAGER_GPU)
    scenario.set_phase("filler", "Succeeded")
    back = wait_until(lambda: returned(scenario, "b2", b2), 60, "b2 to be returned")
    assert back["spec"]["nodeName"] == node
    assert limits(back) == {G1: "1"}
    assert back["metadata"]["annotations"]["migchain.io/restarts"] == "1"
    assert scenario.pod("b1")["metadata"]["uid"] == b1["metadata"]["uid"]  # fewer steps: stays
    assert scenario.events("b2", "Returning")


def test_on_demand_moves_nothing_until_a_pending_pod_needs_the_large_slice(scenario: Scenario):
    node, b1, b2 = two_borrowers(scenario, A100)
    scenario.set_phase("filler", "Succeeded")
    time.sleep(6)  # three return rounds: nothing may move, nobody is waiting
    assert scenario.pod("b1")["metadata"]["uid"] == b1["metadata"]["uid"]
    assert scenario.pod("b2")["metadata"]["uid"] == b2["metadata"]["uid"]
    scenario.create_pod("needs-3g", {"3g.20gb": 1})
    back = wait_until(lambda: returned(scenario, "b2", b2), 60, "b2 to be returned")
    assert limits(back) == {G1: "1"}
    assert scenario.wait_bound("needs-3g", timeout=60) == node
    assert scenario.pod("b1")["metadata"]["uid"] == b1["metadata"]["uid"]


def test_a_pdb_that_allows_no_disruption_blocks_the_return(scenario: Scenario):
    _, b1, b2 = two_borrowers(scenario, EAGER_GPU)
    budgets = path("apis", "policy", "v1", "namespaces", scenario.namespace, "poddisruptionbudgets")
    scenario.api.create(
        budgets,
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": "keep-b2"},
            "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "b2"}}},
        },
    )
    scenario.set_phase("filler", "Succeeded")
    wait_until(lambda: scenario.events("b2", "ReturnBlocked"), 60, "the return to be blocked")
    # The refused borrower holds no one back: the freed slice goes to the next one, in the same round.
    wait_until(lambda: returned(scenario, "b1", b1), 60, "b1 to be returned in b2's stead")
    assert scenario.pod("b2")["metadata"]["uid"] == b2["metadata"]["uid"]
    scenario.api.delete(budgets + "/keep-b2")
    scenario.set_phase("b1", "Succeeded")  # a 1g.5gb frees again
    back = wait_until(lambda: returned(scenario, "b2", b2), 60, "b2 to be returned once the PDB is gone")
    assert limits(back) == {G1: "1"}


def test_killing_the_returner_mid_return_loses_nothing(scenario: Scenario):
    cluster = scenario.cluster
    [returner] = cluster.returners
    returner.stop()
    cluster.start_returner("returner-a", env={**os.environ, "MIGCHAIN_FAILPOINTS": "return-after-evict"})
    try:
        _, _, b2 = two_borrowers(scenario, EAGER_GPU)
        scenario.set_phase("filler", "Succeeded")
        wait_until(lambda: not returner.alive(), 60, "the returner to die after the eviction")
    finally:
        cluster.start_returner("returner-a")
    back = wait_until(lambda: returned(scenario, "b2", b2), 90, "b2 to be recreated after the restart")
    assert limits(back) == {G1: "1"}
    wait_until(
        lambda: (
            not scenario.api.list_all(
                path("api", "v1", "namespaces", "migchain-system", "configmaps"), labelSelector="migchain.io/journal"
            )[0]
        ),
        10,
        "the journal to be cleared",
    )


def test_two_returner_replicas_never_both_act(scenario: Scenario):
    cluster = scenario.cluster
    second = cluster.start_returner("returner-b")
    try:
        time.sleep(3)
        assert cluster.lease_holder() == "returner-a"
        _, _, b2 = two_borrowers(scenario, EAGER_GPU)
        scenario.set_phase("filler", "Succeeded")
        wait_until(lambda: returned(scenario, "b2", b2), 60, "b2 to be returned")
        time.sleep(2)
        events, _ = scenario.api.list_all(
            path("api", "v1", "namespaces", scenario.namespace, "events"), fieldSelector="reason=Returning"
        )
        assert sum(event.get("count", 1) for event in events) == 1
        assert [event["source"].get("host") for event in events] == ["returner-a"]
        assert "returned" not in second.log.read_text()
    finally:
        second.stop()
