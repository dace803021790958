"""`migchain simulate --from-cluster` on the real control plane: the running pods are the replay's starting state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import ROOT, wait_until
from tests.e2e.fleet import FAIL_AFTER, SUCCEED_AFTER, create_node

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"
RUN_FOR = 20  # seconds the finishing pods run: a replay (a few seconds) fits well within it


def replay(scenario: Scenario, trace: Path) -> dict[str, Any]:
    """The JSON report of `migchain simulate --from-cluster` for `trace`, under the static and on-demand policies."""
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
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def phase(scenario: Scenario, name: str) -> str:
    return str(scenario.pod(name)["status"].get("phase", ""))


def never_placed(report: dict[str, Any]) -> dict[str, int]:
    return {policy: run["never_placed"] for policy, run in report["runs"].items()}


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
    report = replay(scenario, trace)
    # Other tests' pods may be on their way out with their nodes (left out); this test's two are held.
    assert report["start"]["running"] >= 2 and report["start"]["borrowers"] >= 1
    assert f"{scenario.namespace}/filler" not in report["start"]["left_out"]
    assert report["pods"] == 2  # the counts are the trace's
    assert set(report["runs"]) == {"static", "on-demand"}


def test_the_starting_state_follows_the_cluster_as_pods_end(scenario: Scenario, tmp_path):
    """Pods that run for a while (kwok ends them after their annotated duration) hold their slices in a replay
    started while they run, and not in one started after they ended, Succeeded or Failed."""
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"3g.20gb": 2}, scenario.test)
    scenario.create_pod("finishes", {"3g.20gb": 1}, annotations={SUCCEED_AFTER: f"{RUN_FOR}s"})
    scenario.create_pod("crashes", {"3g.20gb": 1}, annotations={FAIL_AFTER: f"{RUN_FOR}s"})
    for name in ("finishes", "crashes"):
        wait_until(lambda name=name: phase(scenario, name) == "Running", 30, f"kwok to run {name}")
    # Two pods of the trace ask for 3g.20gb: they fit only on the slices the two running pods hold (this chain
    # lends no larger type to a 3g.20gb pod here: the node has none).
    trace = tmp_path / "trace.csv"
    trace.write_text("name,arrival_s,type,runtime_s\nq0,0,3g.20gb,600\nq1,30,3g.20gb,600\n")

    running = replay(scenario, trace)
    assert {phase(scenario, "finishes"), phase(scenario, "crashes")} == {"Running"}, "ended during the replay"
    assert never_placed(running) == {"static": 2, "on-demand": 2}

    wait_until(lambda: phase(scenario, "finishes") == "Succeeded", RUN_FOR + 30, "kwok to complete `finishes`")
    wait_until(lambda: phase(scenario, "crashes") == "Failed", RUN_FOR + 30, "kwok to fail `crashes`")
    ended = replay(scenario, trace)
    assert never_placed(ended) == {"static": 0, "on-demand": 0}
    assert running["start"]["running"] - ended["start"]["running"] >= 2
