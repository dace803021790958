"""`migchain status` (and `kubectl migchain status`) against the real control plane, after a real borrow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import create_node

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"
G1 = "nvidia.com/mig-1g.5gb"
G2 = "nvidia.com/mig-2g.10gb"
BIN = Path(sys.executable).parent  # the console scripts installed beside this interpreter


def status(scenario: Scenario, *args: str, script: str = "migchain") -> str:
    result = subprocess.run(
        [str(BIN / script), "status", "--kubeconfig", str(scenario.cluster.plane.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def borrowed(scenario: Scenario, name: str) -> dict[str, Any] | None:
    pod = scenario.pod(name)  # a bare pod is deleted and recreated under its name: a 404 just means "not yet"
    annotations = pod["metadata"].get("annotations") or {}
    return pod if pod["spec"].get("nodeName") and "migchain.io/replaced-uid" in annotations else None


def test_status_shows_the_loan_and_the_slices_of_the_node(scenario: Scenario):
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"1g.5gb": 1, "2g.10gb": 2}, scenario.test)
    scenario.create_pod("filler", {"1g.5gb": 1})
    assert scenario.wait_bound("filler") == node
    borrows = scenario.cluster.metric("migchain_borrows_total", requested="1g.5gb", granted="2g.10gb")

    scenario.create_pod("infer", {"1g.5gb": 1})  # no 1g.5gb left: it borrows a 2g.10gb
    wait_until(lambda: borrowed(scenario, "infer"), 60, "infer to borrow")

    document = json.loads(status(scenario, "-o", "json"))
    [row] = [row for row in document["nodes"] if row["name"] == node]
    assert row["gpu_product"] == A100
    assert row["offers_slices"] is True
    assert row["slices"] == {
        G1: {"allocatable": 1, "used": 1, "borrowed": 0, "free": 0},
        G2: {"allocatable": 2, "used": 1, "borrowed": 1, "free": 1},
    }
    [loan] = [loan for loan in document["loans"] if loan["namespace"] == scenario.namespace]
    assert {key: loan[key] for key in ("pod", "node", "original", "borrowed", "chains", "steps")} == {
        "pod": "infer",
        "node": node,
        "original": {G1: 1},
        "borrowed": {G2: 1},
        "chains": ["a100-40gb"],
        "steps": 2,
    }
    assert 0 <= loan["age_seconds"] < 300

    # What the borrow also left behind: an event on the pod and the counters.
    assert scenario.events("infer", "Borrowed")
    assert scenario.cluster.metric("migchain_borrows_total", requested="1g.5gb", granted="2g.10gb") == borrows + 1
    assert scenario.cluster.metric("migchain_loans", requested="1g.5gb", granted="2g.10gb") >= 1

    # The kubectl plugin prints the same as tables.
    table = status(scenario, script="kubectl-migchain").splitlines()
    assert any(line.split()[:5] == [scenario.namespace, "infer", "1g.5gb", "2g.10gb", node] for line in table)
    assert any(line.split()[:2] == [node, A100] and "1/2 b1" in line for line in table)
