"""`migchain simulate --from-cluster` on the real control plane: the running pods are the replay's starting state."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import ROOT, wait_until
from tests.e2e.fleet import create_node

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"


def test_a_trace_replays_on_the_cluster_with_its_running_pods_and_loans(scenario: Scenario, tmp_path):
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"1g.5gb": 1, "2g.10gb": 1, "3g.20gb": 1}, scenario.test)
    scenario.create_pod("filler", {"1g.5gb": 1})
    assert scenario.wait_bound("filler") == node
    scenario.create_pod("notebook", {"1g.5gb": 1})  # borrows the 2g.10gb
    wait_until(
        lambda: "migchain.io/replaced-uid" in (scenario.pod("notebook")["metadata"].get("annotations") or {}),
        30,
        "notebook to borrow",
    )
    trace = tmp_path / "trace.csv"
    trace.write_text("name,arrival_s,type,runtime_s\np0,0,1g.5gb,600\np1,60,1g.5gb,600\n")
    argv = [sys.executable, "-m", "extender.cli", "simulate", "--from-cluster"]
    argv += [
        "--kubeconfig",
        str(scenario.cluster.plane.kubeconfig),
        "--chains",
        str(ROOT / "chains" / "a100-40gb.yaml"),
    ]
    argv += ["--workload", str(trace), "--policy", "static", "on-demand", "-o", "json"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # Other tests' pods may be on their way out with their nodes (left out); this test's two are held.
    assert report["start"]["running"] >= 2 and report["start"]["borrowers"] >= 1
    assert f"{scenario.namespace}/filler" not in report["start"]["left_out"]
    assert report["pods"] == 2  # the counts are the trace's
    assert set(report["runs"]) == {"static", "on-demand"}
