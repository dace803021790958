"""Priority preemption of MIG slices on the real control plane: the returner evicts for a higher-priority pod."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from extender.kube.api import ApiError, path
from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import create_node, mig_pod

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"
LOW, HIGH = 10, 1_000_000
CLASSES = path("apis", "scheduling.k8s.io", "v1", "priorityclasses")


@pytest.fixture
def classes(scenario: Scenario) -> Iterator[dict[str, str]]:
    """PriorityClasses of this test: low (10), high (1,000,000), never (1,000,000, preemptionPolicy Never)
    and waiter (100, preemptionPolicy Never)."""
    made = {"low": (LOW, None), "high": (HIGH, None), "never": (HIGH, "Never"), "waiter": (100, "Never")}
    names = {key: f"{scenario.test}-{key}"[:63] for key in made}
    for key, (value, policy) in made.items():
        body: dict[str, Any] = {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": names[key]},
            "value": value,
        }
        if policy:
            body["preemptionPolicy"] = policy
        scenario.api.create(CLASSES, body)
    yield names
    for name in names.values():
        with contextlib.suppress(ApiError):
            scenario.api.delete(f"{CLASSES}/{name}")


def create(scenario: Scenario, name: str, profile: str, priority_class: str, **labels: str) -> dict[str, Any]:
    pod = mig_pod(name, scenario.test, {profile: 1}, labels=labels)
    pod["spec"]["priorityClassName"] = priority_class
    return scenario.api.create(path("api", "v1", "namespaces", scenario.namespace, "pods"), pod)


def alive(scenario: Scenario, pod: dict[str, Any]) -> bool:
    """The very pod (same UID) still exists and is not being deleted."""
    try:
        now = scenario.pod(pod["metadata"]["name"])
    except ApiError:
        return False
    return now["metadata"]["uid"] == pod["metadata"]["uid"] and not now["metadata"].get("deletionTimestamp")


def limits(pod: dict[str, Any]) -> dict[str, str]:
    return dict(pod["spec"]["containers"][0]["resources"]["limits"])


def test_a_high_priority_pod_preempts_the_low_priority_holder_of_the_only_slice(scenario: Scenario, classes):
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"1g.5gb": 1}, scenario.test)
    holder = create(scenario, "holder", "1g.5gb", classes["low"])
    scenario.wait_bound("holder")
    started = time.monotonic()
    create(scenario, "urgent", "1g.5gb", classes["high"])
    assert scenario.wait_bound("urgent", timeout=60) == node
    print(f"urgent bound {time.monotonic() - started:.1f} s after it was created")
    assert not alive(scenario, holder)
    assert any("urgent" in message for message in scenario.events("holder", "Preempted"))
    assert scenario.events("urgent", "Preempting")


def test_a_pdb_spares_its_pod_and_the_preemption_takes_another_node(scenario: Scenario, classes):
    guarded, other = f"gpu-{scenario.test}-a", f"gpu-{scenario.test}-b"
    create_node(scenario.api, other, A100, {"1g.5gb": 1}, scenario.test)
    free = create(scenario, "free", "1g.5gb", classes["low"])
    assert scenario.wait_bound("free") == other
    # The later victim on the first node by name: every tie-break would pick it, were it not for its PDB.
    create_node(scenario.api, guarded, A100, {"1g.5gb": 1}, scenario.test)
    kept = create(scenario, "kept", "1g.5gb", classes["low"], app="kept")
    assert scenario.wait_bound("kept") == guarded
    scenario.api.create(
        path("apis", "policy", "v1", "namespaces", scenario.namespace, "poddisruptionbudgets"),
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": "keep"},
            "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "kept"}}},
        },
    )
    wait_until(lambda: _budget_observed(scenario, "keep"), 30, "the PDB controller to count the budget")
    started = time.monotonic()
    create(scenario, "urgent", "1g.5gb", classes["high"])
    assert scenario.wait_bound("urgent", timeout=60) == other
    print(f"urgent bound {time.monotonic() - started:.1f} s after it was created (one victim behind a PDB)")
    assert alive(scenario, kept)
    assert not alive(scenario, free)


def _budget_observed(scenario: Scenario, name: str) -> bool:
    budget = scenario.api.get(
        path("apis", "policy", "v1", "namespaces", scenario.namespace, "poddisruptionbudgets", name)
    )
    status = budget.get("status") or {}
    return status.get("observedGeneration") == budget["metadata"].get("generation") and "disruptionsAllowed" in status


def test_a_pod_with_preemption_policy_never_preempts_nothing(scenario: Scenario, classes):
    create_node(scenario.api, f"gpu-{scenario.test}-a", A100, {"1g.5gb": 1}, scenario.test)
    holder = create(scenario, "holder", "1g.5gb", classes["low"])
    scenario.wait_bound("holder")
    create(scenario, "polite", "1g.5gb", classes["never"])
    time.sleep(6)  # three returner rounds
    assert alive(scenario, holder)
    assert not scenario.pod("polite")["spec"].get("nodeName")
    assert not scenario.events("polite", "Preempting")


def _borrowing(scenario: Scenario) -> dict[str, Any] | None:
    pod = scenario.pod("borrower")
    return pod if limits(pod) == {"nvidia.com/mig-2g.10gb": "1"} and pod["spec"].get("nodeName") else None


def test_a_low_priority_borrower_is_returned_rather_than_an_exact_fit_evicted(scenario: Scenario, classes):
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"1g.5gb": 1, "2g.10gb": 1}, scenario.test)
    exact = create(scenario, "exact", "1g.5gb", classes["low"])
    scenario.wait_bound("exact")
    create(scenario, "borrower", "1g.5gb", classes["low"])
    borrower = wait_until(lambda: _borrowing(scenario), 30, "the borrower to borrow the 2g.10gb")
    # Waiting too, at a priority between the two, and not allowed to preempt: first in kube-scheduler's
    # queue when the 2g.10gb frees, which it would borrow. Only the preemptor's nomination keeps it off that
    # slice. (A 1g.5gb: a pod waiting for a 2g.10gb would take it back from the borrower at once, a reclaim.)
    create(scenario, "waiter", "1g.5gb", classes["waiter"])
    wait_until(lambda: _unschedulable(scenario, "waiter"), 30, "the waiter to be found unschedulable")
    started = time.monotonic()
    create(scenario, "urgent", "1g.5gb", classes["high"])
    assert scenario.wait_bound("urgent", timeout=60) == node
    print(f"urgent bound {time.monotonic() - started:.1f} s after it was created")
    urgent = scenario.pod("urgent")
    assert limits(urgent) == {"nvidia.com/mig-2g.10gb": "1"}  # it borrows the slice the borrower gave back
    assert alive(scenario, exact)
    back = wait_until(lambda: not alive(scenario, borrower) and scenario.pod("borrower"), 30, "the borrower back")
    assert limits(back) == {"nvidia.com/mig-1g.5gb": "1"}  # its own request, pending
    assert not back["spec"].get("nodeName") and not scenario.pod("waiter")["spec"].get("nodeName")
    assert scenario.events("borrower", "Preempted")


def _unschedulable(scenario: Scenario, name: str) -> bool:
    conditions = scenario.pod(name).get("status", {}).get("conditions") or []
    return any(c.get("type") == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conditions)
