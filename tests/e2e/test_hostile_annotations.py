"""Hostile annotations on running pods, on the real control plane: returns go on, /metrics stays small and quick.

Issue 17, findings 2 and 3: a tenant's pod, on any node, with a forged or
edited loan record (`migchain.io/restarts: "²"`, a broken original-resources
JSON, counts of 5x10^7) stopped every return round or made /metrics allocate
without bound; a borrower with many steps behind a PodDisruptionBudget was
chosen first for every freed slice and blocked the other returns forever.
"""

from __future__ import annotations

import time

import pytest

from extender.kube.api import path
from tests.e2e.conftest import Cluster, Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import create_node
from tests.e2e.test_return import EAGER_GPU, G1, borrowing, limits, returned

pytestmark = pytest.mark.e2e

G2, G3 = "nvidia.com/mig-2g.10gb", "nvidia.com/mig-3g.20gb"


def forged_loan(original: str, borrowed: str, steps: str) -> dict[str, str]:
    return {
        "migchain.io/original-requests": original,
        "migchain.io/borrowed-requests": borrowed,
        "migchain.io/chain": "e2e-eager",
        "migchain.io/steps": steps,
        "migchain.io/replaced-uid": "6b1f8f5e-0000-4000-8000-000000000000",
    }


# Pods that ask for no MIG slice, bound straight to the node, carrying a loan record that cannot be read.
HOSTILE = {
    "squared": {**forged_loan(f"{G1}=1", f"{G2}=1", "1"), "migchain.io/restarts": "²"},
    "broken-json": {**forged_loan(f"{G1}=1", f"{G2}=1", "1"), "migchain.io/original-resources": "{"},
    "huge-counts": forged_loan(f"{G1}=50000000", f"{G2}=50000000", "50000000"),
}


def rejected_counted(cluster: Cluster) -> tuple[float, float]:
    """migchain_unreadable_loans_total (all reasons) of the extender and of the returner."""
    return (
        cluster.metric("migchain_unreadable_loans_total"),
        cluster.returner_metric("migchain_unreadable_loans_total"),
    )


def run_hostile_pods(scenario: Scenario, node: str) -> None:
    for name, loan in HOSTILE.items():
        scenario.create_pod(name, {}, annotations=loan, spec={"nodeName": node})
    wait_until(
        lambda: all(scenario.pod(name)["status"].get("phase") == "Running" for name in HOSTILE),
        30,
        "the hostile pods to run",
    )


def test_hostile_loans_on_running_pods_stop_no_return(scenario: Scenario):
    cluster, api = scenario.cluster, scenario.api
    counted = rejected_counted(cluster)
    node = f"gpu-{scenario.test}-a"
    create_node(api, node, EAGER_GPU, {"1g.5gb": 1, "2g.10gb": 1, "3g.20gb": 1}, scenario.test)
    scenario.create_pod("filler", {"1g.5gb": 1})
    scenario.wait_bound("filler")
    scenario.create_pod("genuine", {"1g.5gb": 1})
    wait_until(lambda: borrowing(scenario.pod("genuine")), 30, "genuine to borrow the 2g.10gb")
    genuine = scenario.pod("genuine")
    assert limits(genuine) == {G2: "1"}
    # A genuine borrower two steps up (so returned first, eager), which its owner keeps with a
    # PodDisruptionBudget: its return is refused, for as long as the budget stands.
    scenario.create_pod("protected", {"1g.5gb": 1}, labels={"app": "protected"})
    wait_until(lambda: borrowing(scenario.pod("protected")), 30, "protected to borrow the 3g.20gb")
    assert limits(scenario.pod("protected")) == {G3: "1"}
    api.create(
        path("apis", "policy", "v1", "namespaces", scenario.namespace, "poddisruptionbudgets"),
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": "keep-protected"},
            "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "protected"}}},
        },
    )
    run_hostile_pods(scenario, node)

    # The 1g.5gb frees: the protected loan goes first and its eviction is refused; the genuine one goes back.
    scenario.set_phase("filler", "Succeeded")
    back = wait_until(lambda: returned(scenario, "genuine", genuine), 60, "genuine to be returned")
    assert limits(back) == {G1: "1"}
    assert scenario.events("protected", "ReturnBlocked")
    assert limits(scenario.pod("protected")) == {G3: "1"}  # refused, never forced

    # Each hostile pod is reported once, with an Event, and counted once by each process; nothing else is.
    time.sleep(4)  # two more return rounds
    for name in HOSTILE:
        [message] = scenario.events(name, "LoanRejected")
        assert message.isprintable() and len(message) < 400, message
    assert not scenario.events("genuine", "LoanRejected") and not scenario.events("protected", "LoanRejected")
    extender, returner = rejected_counted(cluster)
    assert (extender - counted[0], returner - counted[1]) == (len(HOSTILE), len(HOSTILE))


def test_hostile_counts_on_running_pods_keep_metrics_small_and_quick(scenario: Scenario):
    cluster, api = scenario.cluster, scenario.api
    counted = rejected_counted(cluster)
    node = f"gpu-{scenario.test}-a"
    create_node(api, node, EAGER_GPU, {"1g.5gb": 1, "2g.10gb": 2}, scenario.test)
    scenario.create_pod("filler", {"1g.5gb": 1})
    scenario.wait_bound("filler")
    for name in ("genuine", "edited"):
        scenario.create_pod(name, {"1g.5gb": 1})
        wait_until(lambda name=name: borrowing(scenario.pod(name)), 30, f"{name} to borrow a 2g.10gb")
    # The owner of a running borrower edits its loan record: 5x10^7 slices on loan.
    api.patch(
        path("api", "v1", "namespaces", scenario.namespace, "pods", "edited"),
        {"metadata": {"annotations": forged_loan(f"{G1}=50000000", f"{G2}=50000000", "50000000")}},
    )
    run_hostile_pods(scenario, node)
    time.sleep(2)  # the extender's watch shows them within milliseconds

    # 5x10^7 slices on loan took 6 s and 800 MiB to spell out, holding the GIL of the process that answers
    # kube-scheduler. Not believed, they cost nothing; several scrapes, the slowest must be quick.
    slowest, largest = 0.0, 0
    for _ in range(5):
        started = time.monotonic()
        status, body = cluster.probe("/metrics")
        slowest, largest = max(slowest, time.monotonic() - started), max(largest, len(body))
        assert status == 200
    assert slowest < 2.0 and largest < 64 * 1024, (slowest, largest)
    assert cluster.metric("migchain_loans", requested="1g.5gb", granted="2g.10gb") >= 1  # the genuine loan
    extender, _ = rejected_counted(cluster)
    assert extender - counted[0] == 1 + len(HOSTILE)
