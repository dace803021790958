"""Loans tenants cannot forge or edit, on the real control plane (issue 17, finding 5).

A pod's owner can write every annotation of a running pod. These tests play
that tenant: opting a borrower out of its return, forging a loan on a pod that
never borrowed, editing a genuine loan, and forging `migchain.io/replaced-uid`
to cancel another pod's reservation. The admin's policy and migchain's own
record must win each time.
"""

from __future__ import annotations

import json
import time
from typing import Any

import orjson
import pytest

from extender.kube.api import ApiError, path
from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import PAUSE, create_node, mig_pod
from tests.e2e.invariants import check_invariants, over_commits
from tests.e2e.test_faults import failing_webhook, report

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"
EAGER_GPU = "TEST-EAGER-GPU"  # tests/fixtures/chains/e2e-eager.yaml: returnMode eager, pod opt-outs not honoured
OPT_OUT_GPU = "TEST-OPT-OUT-GPU"  # tests/fixtures/chains/e2e-opt-outs.yaml: returnMode eager, opt-outs honoured
G1, G2 = "nvidia.com/mig-1g.5gb", "nvidia.com/mig-2g.10gb"
LOAN = "migchain.io/replaced-uid"


def borrowing(pod: dict[str, Any]) -> bool:
    return LOAN in (pod["metadata"].get("annotations") or {})


def limits(pod: dict[str, Any]) -> dict[str, str]:
    return dict(pod["spec"]["containers"][0]["resources"]["limits"])


def annotate(scenario: Scenario, name: str, annotations: dict[str, str | None]) -> None:
    """What the pod's owner may do to a running pod: a merge patch of its annotations (None removes one)."""
    scenario.api.patch(
        path("api", "v1", "namespaces", scenario.namespace, "pods", name), {"metadata": {"annotations": annotations}}
    )


def returned(scenario: Scenario, name: str, old: dict[str, Any]) -> dict[str, Any] | None:
    """The pod back under its name with its original request, bound, no loan; None until then."""
    try:
        pod = scenario.pod(name)
    except ApiError:
        return None
    if pod["metadata"]["uid"] == old["metadata"]["uid"] or borrowing(pod) or not pod["spec"].get("nodeName"):
        return None
    return pod


def a_borrower(scenario: Scenario, product: str, name: str = "b") -> tuple[str, dict[str, Any]]:
    """One node: its 1g.5gb held by `filler`, `name` (asking for a 1g.5gb) borrowing its 2g.10gb."""
    node = f"gpu-{scenario.test}-{product.lower()[:8]}"
    create_node(scenario.api, node, product, {"1g.5gb": 1, "2g.10gb": 1}, scenario.test)
    scenario.create_pod("filler", {"1g.5gb": 1})
    scenario.wait_bound("filler")
    scenario.create_pod(name, {"1g.5gb": 1}, labels={"app": name})
    wait_until(lambda: borrowing(scenario.pod(name)), 30, f"{name} to borrow")
    return node, scenario.pod(name)


def test_a_tenant_opt_out_does_not_hold_a_borrower_the_policy_returns(scenario: Scenario):
    # The e2e-eager chain leaves podOptOuts at its default: the returnMode decides, not the pod.
    node, borrower = a_borrower(scenario, EAGER_GPU)
    annotate(scenario, "b", {"migchain.io/return": "false", "migchain.io/max-restarts": "0"})
    scenario.set_phase("filler", "Succeeded")
    back = wait_until(lambda: returned(scenario, "b", borrower), 30, "b to be returned despite its opt-out")
    assert back["spec"]["nodeName"] == node
    assert limits(back) == {G1: "1"}


def test_a_tenant_opt_out_holds_a_borrower_where_the_policy_honours_it(scenario: Scenario):
    _, borrower = a_borrower(scenario, OPT_OUT_GPU)
    annotate(scenario, "b", {"migchain.io/return": "false"})
    scenario.set_phase("filler", "Succeeded")
    time.sleep(6)  # three return rounds: the policy honours the opt-out, so nothing moves
    assert scenario.pod("b")["metadata"]["uid"] == borrower["metadata"]["uid"]
    annotate(scenario, "b", {"migchain.io/return": None})
    back = wait_until(lambda: returned(scenario, "b", borrower), 30, "b to be returned once it opts back in")
    assert limits(back) == {G1: "1"}


def forged_loan(steps: str = "1000") -> dict[str, str]:
    """A loan record written by a tenant on a pod that asked for a 2g.10gb itself: it never borrowed."""
    return {
        "migchain.io/original-requests": f"{G1}=1",
        "migchain.io/borrowed-requests": f"{G2}=1",
        "migchain.io/chain": "a100-40gb",
        "migchain.io/steps": steps,
        "migchain.io/original-resources": json.dumps({"containers/main": {"limits": {G1: "1"}}}),
        LOAN: "made-up",
        "migchain.io/loan-signature": "v1:" + "0" * 64,
    }


def test_a_forged_loan_is_no_borrower_and_blocks_no_genuine_return(scenario: Scenario):
    """A tenant's pod holding the 2g.10gb it asked for claims to be a borrower of 1,000 steps, behind a PDB that
    allows no eviction. Believed, it would be chosen first for every return and block the genuine one forever."""
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"1g.5gb": 1, "2g.10gb": 2}, scenario.test)
    forged_before = scenario.cluster.metric("migchain_unreadable_loans_total", reason="forged")
    budgets = path("apis", "policy", "v1", "namespaces", scenario.namespace, "poddisruptionbudgets")
    scenario.api.create(
        budgets,
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": "keep-forger"},
            "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "forger"}}},
        },
    )
    # b borrows before the forger asks for its 2g.10gb: after that, the last free 2g.10gb is kept for the
    # pods that ask for it (headroomSeconds), and b would not borrow it.
    scenario.create_pod("filler", {"1g.5gb": 1})
    scenario.wait_bound("filler")
    scenario.create_pod("b", {"1g.5gb": 1})
    wait_until(lambda: borrowing(scenario.pod("b")) and scenario.pod("b")["spec"].get("nodeName"), 30, "b to borrow")
    scenario.create_pod("forger", {"2g.10gb": 1}, labels={"app": "forger"}, annotations=forged_loan())
    scenario.wait_bound("forger")
    borrower, forger = scenario.pod("b"), scenario.pod("forger")
    scenario.set_phase("filler", "Succeeded")
    scenario.create_pod("needs-2g", {"2g.10gb": 1})
    started = time.monotonic()
    back = wait_until(lambda: returned(scenario, "b", borrower), 30, "the genuine borrower to be returned")
    report("forged loan behind a PDB", genuine_returned_after_s=round(time.monotonic() - started, 2))
    assert limits(back) == {G1: "1"}
    assert scenario.wait_bound("needs-2g", timeout=30) == node
    assert scenario.pod("forger")["metadata"]["uid"] == forger["metadata"]["uid"]  # an ordinary pod: left alone
    assert not scenario.events("forger", "ReturnBlocked")
    [message] = wait_until(lambda: scenario.events("forger", "LoanRejected"), 30, "the forged loan to be reported")
    assert "not treated as a borrower" in message
    # Counted once by the extender, however often the pod changes.
    annotate(scenario, "forger", {"team": "still-forging"})
    time.sleep(2)
    assert scenario.cluster.metric("migchain_unreadable_loans_total", reason="forged") == forged_before + 1
    assert len(scenario.events("forger", "LoanRejected")) == 1
    check_invariants(scenario.api, scenario.namespace, ["forger", "b", "needs-2g"])


def test_an_edited_loan_is_no_longer_a_loan_and_is_reported_once(scenario: Scenario):
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"2g.10gb": 1}, scenario.test)
    scenario.create_pod("b", {"1g.5gb": 1})
    wait_until(lambda: borrowing(scenario.pod("b")) and scenario.pod("b")["spec"].get("nodeName"), 30, "b to borrow")
    loans = ("migchain_loans", {"requested": "1g.5gb", "granted": "2g.10gb"})
    wait_until(lambda: scenario.cluster.metric(loans[0], **loans[1]) >= 1, 15, "the extender to count the loan")
    before = scenario.cluster.metric(loans[0], **loans[1])
    annotate(scenario, "b", {"migchain.io/steps": "0", "migchain.io/chain": "e2e-eager"})
    wait_until(lambda: scenario.cluster.metric(loans[0], **loans[1]) == before - 1, 15, "the loan to be dropped")
    [message] = wait_until(lambda: scenario.events("b", "LoanRejected"), 30, "the edited loan to be reported")
    assert "does not match" in message
    annotate(scenario, "b", {"migchain.io/steps": "7"})
    time.sleep(2)
    assert len(scenario.events("b", "LoanRejected")) == 1


def test_a_forged_replaced_uid_does_not_cancel_another_pods_reservation(scenario: Scenario):
    """A bind of unknown outcome keeps its pod's slices reserved. A tenant's pod bound (by nodeName) to any node,
    claiming to replace that pod, would cancel the reservation: the slice would then look free to other pods."""
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"1g.5gb": 1}, scenario.test)
    other = mig_pod("second", scenario.test, {"1g.5gb": 1})
    other["metadata"] |= {"namespace": scenario.namespace, "uid": "uid-of-second"}

    def free_for_another_pod() -> bool:
        status, body = scenario.cluster.call("/filter", orjson.dumps({"Pod": other, "NodeNames": [node]}))
        assert status == 200, body
        return node in (orjson.loads(body)["NodeNames"] or [])

    with failing_webhook(scenario, "pods/binding"):
        first = scenario.create_pod("first", {"1g.5gb": 1})
        wait_until(
            lambda: [m for m in scenario.events("first", "FailedScheduling") if "webhook" in m], 30, "a bind to fail"
        )
        assert not free_for_another_pod()  # held for `first`: its bind may have happened
        scenario.api.create(
            path("api", "v1", "namespaces", scenario.namespace, "pods"),
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "forger", "annotations": {LOAN: first["metadata"]["uid"]}},
                "spec": {
                    "nodeName": node,
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "main", "image": PAUSE, "resources": {"requests": {"cpu": "10m"}}}],
                },
            },
        )
        given_twice: list[int] = []
        deadline = time.monotonic() + 8
        touch = 0
        while time.monotonic() < deadline and not given_twice:
            touch += 1  # every change of the forger is one more claim, between `first`'s own retries
            annotate(scenario, "forger", {"touch": str(touch)})
            if free_for_another_pod():
                given_twice.append(touch)
            time.sleep(0.2)
        assert not given_twice, "the forged replaced-uid freed a slice reserved for another pod's bind"
        assert touch >= 5, f"only {touch} probes in 8 s: too few to show anything"
        report("forged replaced-uid", probes=touch, slice_given_twice=len(given_twice))
    assert scenario.wait_bound("first", timeout=30) == node
    # (check_invariants would take the forger, which names `first` as the pod it replaced, for a second copy of
    # a loan: it reads annotations as written. Its slice count is the point here.)
    nodes, _ = scenario.api.list_all("/api/v1/nodes")
    assert not over_commits(nodes, scenario.pods())
