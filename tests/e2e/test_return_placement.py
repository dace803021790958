"""Returns on the real control plane count a pending pod only where it may run (issue 16, item 2).

Each test has two nodes, `home` (where a borrower runs) and `elsewhere`, and
pods pinned with the usual hostname label. A return that would not let the
waiting pod run is a restart spent for nothing; a slice the waiting pod may
not take is free for a return.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import create_node
from tests.e2e.test_return import borrowing, limits, returned

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"  # the shipped chain: returnMode on-demand
EAGER_GPU = "TEST-EAGER-GPU"  # tests/fixtures/chains/e2e-eager.yaml: returnMode eager
G1 = "nvidia.com/mig-1g.5gb"
HOSTNAME = "kubernetes.io/hostname"
ROUNDS = 8.0  # seconds: at least three return rounds (every change, else every 2 s), with margin for a busy machine


def pinned(node: str) -> dict[str, Any]:
    """create_pod arguments that pin the pod to one node, as users do with the hostname label."""
    return {"node_selector": {HOSTNAME: node}}


def nodes(scenario: Scenario, product: str, home: dict[str, int], elsewhere: dict[str, int]) -> tuple[str, str]:
    names = f"gpu-{scenario.test}-home", f"gpu-{scenario.test}-elsewhere"
    for name, slices in zip(names, (home, elsewhere), strict=True):
        create_node(scenario.api, name, product, slices, scenario.test)
        scenario.nodes.append(name)
    return names


def borrower_on(scenario: Scenario, home: str, borrowed: str) -> dict[str, Any]:
    """`b` asks for a 1g.5gb, pinned to `home`, where only a larger slice is free: it borrows it."""
    scenario.create_pod("b", {"1g.5gb": 1}, **pinned(home))
    wait_until(lambda: borrowing(scenario.pod("b")), 30, "b to borrow")
    b = scenario.pod("b")
    assert b["spec"]["nodeName"] == home
    assert limits(b) == {f"nvidia.com/mig-{borrowed}": "1"}
    return b


def fill(scenario: Scenario, name: str, node: str) -> None:
    scenario.create_pod(name, {"1g.5gb": 1}, **pinned(node))
    assert scenario.wait_bound(name) == node


def still(scenario: Scenario, name: str, pod: dict[str, Any]) -> bool:
    return bool(scenario.pod(name)["metadata"]["uid"] == pod["metadata"]["uid"])


def test_on_demand_returns_nobody_for_a_pod_that_may_not_run_on_the_borrowers_node(scenario: Scenario):
    home, elsewhere = nodes(scenario, A100, {"1g.5gb": 1, "3g.20gb": 1}, {"1g.5gb": 1})
    fill(scenario, "filler-home", home)
    fill(scenario, "filler-elsewhere", elsewhere)
    b = borrower_on(scenario, home, "3g.20gb")
    scenario.set_phase("filler-home", "Succeeded")  # home's 1g.5gb frees: b could go back to it
    scenario.create_pod("needs-3g-elsewhere", {"3g.20gb": 1}, **pinned(elsewhere))
    time.sleep(ROUNDS)
    assert still(scenario, "b", b), "b was evicted for a pod that may not run on its node"
    assert not scenario.events("b", "Returning")
    assert not scenario.pod("needs-3g-elsewhere")["spec"].get("nodeName")
    # The same pod free to run on home is worth the return.
    scenario.create_pod("needs-3g", {"3g.20gb": 1})
    back = wait_until(lambda: returned(scenario, "b", b), 60, "b to be returned for needs-3g")
    assert (back["spec"]["nodeName"], limits(back)) == (home, {G1: "1"})
    assert scenario.wait_bound("needs-3g", timeout=60) == home


def test_eager_returns_the_borrower_though_a_pod_pinned_elsewhere_waits_for_its_type(scenario: Scenario):
    home, elsewhere = nodes(scenario, EAGER_GPU, {"1g.5gb": 1, "2g.10gb": 1}, {"1g.5gb": 1})
    fill(scenario, "filler-home", home)
    fill(scenario, "filler-elsewhere", elsewhere)
    b = borrower_on(scenario, home, "2g.10gb")
    scenario.create_pod("waits-elsewhere", {"1g.5gb": 1}, **pinned(elsewhere))
    time.sleep(2)  # it is pending, and cannot borrow: elsewhere has no larger slice
    assert not scenario.pod("waits-elsewhere")["spec"].get("nodeName")
    scenario.set_phase("filler-home", "Succeeded")  # home's 1g.5gb frees: the pinned pod may not take it
    back = wait_until(lambda: returned(scenario, "b", b), 60, "b to be returned to home's free 1g.5gb")
    assert (back["spec"]["nodeName"], limits(back)) == (home, {G1: "1"})
    assert not scenario.pod("waits-elsewhere")["spec"].get("nodeName")


PHANTOMS = {
    # Never scheduled while the gate stands.
    "gated": {"schedulingGates": [{"name": "example.com/not-yet"}]},
    # No scheduler runs under this name.
    "foreign-scheduler": {"schedulerName": "nobody-runs-this-scheduler"},
    # No node has the label its required node affinity asks for.
    "impossible-affinity": {
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "example.com/pool", "operator": "In", "values": ["none"]}]}
                    ]
                }
            }
        }
    },
}


@pytest.mark.parametrize("kind", sorted(PHANTOMS))
def test_a_pod_that_can_never_run_evicts_nobody(scenario: Scenario, kind: str):
    home, elsewhere = nodes(scenario, A100, {"1g.5gb": 1, "3g.20gb": 1}, {"1g.5gb": 1})
    fill(scenario, "filler-home", home)
    fill(scenario, "filler-elsewhere", elsewhere)
    b = borrower_on(scenario, home, "3g.20gb")
    scenario.set_phase("filler-home", "Succeeded")
    scenario.create_pod("phantom", {"3g.20gb": 1}, spec=PHANTOMS[kind])
    time.sleep(ROUNDS)
    assert still(scenario, "b", b), f"b was evicted for a {kind} pod"
    assert not scenario.events("b", "Returning")
    assert not scenario.pod("phantom")["spec"].get("nodeName")
    # A pod that can run is still served: the returner was not idle.
    scenario.create_pod("needs-3g", {"3g.20gb": 1})
    back = wait_until(lambda: returned(scenario, "b", b), 60, "b to be returned for needs-3g")
    assert limits(back) == {G1: "1"}
    assert scenario.wait_bound("needs-3g", timeout=60) == home
