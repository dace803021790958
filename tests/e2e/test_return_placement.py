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

from extender.kube.api import ApiError
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


def seen(evicted: float | None) -> str:
    return f"b evicted after {evicted:.2f} s" if evicted is not None else f"b not evicted in {ROUNDS:.0f} s"


def evicted_within(scenario: Scenario, b: dict[str, Any], seconds: float) -> float | None:
    """Seconds until borrower `b` is seen evicted or replaced (its UID changes, or it is gone), None if never."""
    start = time.monotonic()
    while (waited := time.monotonic() - start) < seconds:
        try:
            if scenario.pod("b")["metadata"]["uid"] != b["metadata"]["uid"]:
                return waited
        except ApiError:
            return waited
        time.sleep(0.25)
    return None


def served(scenario: Scenario, b: dict[str, Any], home: str) -> float:
    """A pod that can run on home arrives: seconds until b is back on its own type and the pod is bound on home."""
    start = time.monotonic()
    scenario.create_pod("needs-3g", {"3g.20gb": 1})
    back = wait_until(lambda: returned(scenario, "b", b), 60, "b to be returned for needs-3g")
    assert (back["spec"]["nodeName"], limits(back)) == (home, {G1: "1"})
    assert scenario.wait_bound("needs-3g", timeout=60) == home
    return time.monotonic() - start


def test_on_demand_returns_nobody_for_a_pod_that_may_not_run_on_the_borrowers_node(scenario: Scenario):
    home, elsewhere = nodes(scenario, A100, {"1g.5gb": 1, "3g.20gb": 1}, {"1g.5gb": 1})
    fill(scenario, "filler-home", home)
    fill(scenario, "filler-elsewhere", elsewhere)
    b = borrower_on(scenario, home, "3g.20gb")
    scenario.set_phase("filler-home", "Succeeded")  # home's 1g.5gb frees: b could go back to it
    scenario.create_pod("needs-3g-elsewhere", {"3g.20gb": 1}, **pinned(elsewhere))
    evicted = evicted_within(scenario, b, ROUNDS)
    print(f"figures: on-demand, pod pinned elsewhere: {seen(evicted)}")
    assert evicted is None, "b was evicted for a pod that may not run on its node"
    assert not scenario.events("b", "Returning")
    assert not scenario.pod("needs-3g-elsewhere")["spec"].get("nodeName")
    # The same pod free to run on home is worth the return.
    print(f"figures: on-demand, a pod free to run on home: served in {served(scenario, b, home):.1f} s")


def test_eager_returns_the_borrower_though_a_pod_pinned_elsewhere_waits_for_its_type(scenario: Scenario):
    home, elsewhere = nodes(scenario, EAGER_GPU, {"1g.5gb": 1, "2g.10gb": 1}, {"1g.5gb": 1})
    fill(scenario, "filler-home", home)
    fill(scenario, "filler-elsewhere", elsewhere)
    b = borrower_on(scenario, home, "2g.10gb")
    scenario.create_pod("waits-elsewhere", {"1g.5gb": 1}, **pinned(elsewhere))
    time.sleep(2)  # it is pending, and cannot borrow: elsewhere has no larger slice
    assert not scenario.pod("waits-elsewhere")["spec"].get("nodeName")
    scenario.set_phase("filler-home", "Succeeded")  # home's 1g.5gb frees: the pinned pod may not take it
    start = time.monotonic()
    back = wait_until(lambda: returned(scenario, "b", b), 60, "b to be returned to home's free 1g.5gb")
    print(f"figures: eager, pod pinned elsewhere waiting: b back on home's 1g.5gb in {time.monotonic() - start:.1f} s")
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
    evicted = evicted_within(scenario, b, ROUNDS)
    print(f"figures: {kind} pod: {seen(evicted)}")
    assert evicted is None, f"b was evicted for a {kind} pod"
    assert not scenario.events("b", "Returning")
    assert not scenario.pod("phantom")["spec"].get("nodeName")
    # A pod that can run is still served: the returner was not idle.
    print(f"figures: {kind} pod, then a pod free to run on home: served in {served(scenario, b, home):.1f} s")
