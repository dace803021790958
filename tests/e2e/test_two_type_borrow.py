"""A container asking for two MIG types borrows on the real control plane and holds both slices (issue 16, item 1)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import create_node

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"
G1 = "nvidia.com/mig-1g.5gb"
G2 = "nvidia.com/mig-2g.10gb"


def borrowed(scenario: Scenario, name: str) -> dict[str, Any] | None:
    """The pod once it borrows (bound, with a loan record); None until then."""
    pod = scenario.pod(name)
    loaned = "migchain.io/replaced-uid" in (pod["metadata"].get("annotations") or {})
    return pod if loaned and pod["spec"].get("nodeName") else None


def test_a_container_asking_for_two_types_holds_both_slices_after_it_borrows(scenario: Scenario):
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"1g.5gb": 1, "2g.10gb": 3}, scenario.test)
    scenario.create_pod("filler", {"1g.5gb": 1})
    assert scenario.wait_bound("filler") == node
    scenario.create_pod("both", {"1g.5gb": 1, "2g.10gb": 1})  # the API server sorts the keys: 1g.5gb first
    pod = wait_until(lambda: borrowed(scenario, "both"), 30, "both to borrow")
    annotations = pod["metadata"]["annotations"]
    assert annotations["migchain.io/original-requests"] == f"{G1}=1,{G2}=1"
    assert annotations["migchain.io/borrowed-requests"] == f"{G2}=2"
    assert pod["spec"]["containers"][0]["resources"] == {"limits": {G2: "2"}, "requests": {G2: "2"}}
    # The node has one 2g.10gb left: of two more pods asking for one, exactly one runs.
    scenario.create_pod("next-0", {"2g.10gb": 1})
    scenario.create_pod("next-1", {"2g.10gb": 1})
    wait_until(
        lambda: any(scenario.events(name, "FailedScheduling") for name in ("next-0", "next-1")),
        30,
        "one of the next pods to find no slice",
    )
    bound = [name for name in ("next-0", "next-1") if scenario.pod(name)["spec"].get("nodeName")]
    assert len(bound) == 1, bound
