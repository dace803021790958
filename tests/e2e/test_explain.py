"""`migchain explain` on the real control plane: its verdicts and scores are the running extender's answers."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import orjson
import pytest

from extender.kube.api import path
from tests.e2e.conftest import CHAINS, Scenario
from tests.e2e.controlplane import ROOT, wait_until
from tests.e2e.fleet import create_node, mig_pod

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"
H100 = "NVIDIA-H100-80GB-HBM3"
EAGER_GPU = "TEST-EAGER-GPU"  # covered by tests/fixtures/chains/e2e-eager.yaml, returnMode eager
G1, G2 = "nvidia.com/mig-1g.5gb", "nvidia.com/mig-2g.10gb"


def explain(scenario: Scenario, name: str, output: str = "json") -> str:
    """`migchain explain NAME` as an admin runs it, with the chains the session's extender runs with."""
    argv = [sys.executable, "-m", "extender.cli", "explain", name, "-n", scenario.namespace]
    argv += ["--kubeconfig", str(scenario.cluster.plane.kubeconfig), "--chains", *CHAINS, "-o", output]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def extender(scenario: Scenario, verb: str, pod: dict[str, Any], nodes: list[str]) -> Any:
    """The extender's own answer, asked as kube-scheduler asks it (mutual TLS, node names only)."""
    status, body = scenario.cluster.call(f"/{verb}", orjson.dumps({"Pod": pod, "NodeNames": nodes}))
    assert status == 200, body
    return orjson.loads(body)


def knows_every_node(scenario: Scenario, pod: dict[str, Any], nodes: list[str]) -> bool:
    # One node a call: the filter gives reasons only when no node passes.
    reasons = [reason for node in nodes for reason in extender(scenario, "filter", pod, [node])["FailedNodes"].values()]
    return not any("not in migchain's cluster cache" in reason for reason in reasons)


def assert_same_answers(scenario: Scenario, name: str) -> dict[str, Any]:
    """Explain's verdicts and scores against /filter and /prioritize for the same pod and nodes."""
    pod = scenario.pod(name)
    nodes = sorted(scenario.nodes)
    wait_until(lambda: knows_every_node(scenario, pod, nodes), 30, "the extender's cache to hold every node")
    document: dict[str, Any] = json.loads(explain(scenario, name))
    verdicts = {node["name"]: node for node in document["nodes"]}
    assert sorted(verdicts) == nodes  # the candidates are the nodes its nodeSelector picks: this test's
    filtered = extender(scenario, "filter", pod, nodes)
    assert filtered["Error"] == ""
    assert set(filtered["NodeNames"]) == {n for n, v in verdicts.items() if v["filter"] == "passed"}
    # The reasons go to kube-scheduler only when no node passes (it reads them only then); explain gives them
    # always. So the nodes the pod fits nowhere on are asked about alone, where none passes: the same words.
    if filtered["NodeNames"]:
        assert filtered["FailedNodes"] == {} and filtered["FailedAndUnresolvableNodes"] == {}
    misfits = sorted(n for n, v in verdicts.items() if v["fit"] in ("no fit", "unresolvable"))
    alone = (
        extender(scenario, "filter", pod, misfits) if misfits else {"FailedNodes": {}, "FailedAndUnresolvableNodes": {}}
    )
    assert alone["FailedNodes"] == {n: verdicts[n]["reason"] for n in misfits if verdicts[n]["filter"] == "failed"}
    assert alone["FailedAndUnresolvableNodes"] == {
        n: verdicts[n]["reason"] for n in misfits if verdicts[n]["filter"] == "unresolvable"
    }
    scores = extender(scenario, "prioritize", pod, nodes)
    assert {entry["Host"]: entry["Score"] for entry in scores} == {n: v["score"] for n, v in verdicts.items()}
    return document


def test_explain_gives_the_extenders_verdicts_and_scores_for_pending_pods(scenario: Scenario):
    t = scenario.test
    fleet = {
        f"gpu-{t}-exact": (A100, {"1g.5gb": 2, "2g.10gb": 1}),
        f"gpu-{t}-borrow": (A100, {"2g.10gb": 2}),
        f"gpu-{t}-whole": (A100, {"7g.40gb": 1}),
        f"gpu-{t}-h100": (H100, {"1g.10gb": 1}),
    }
    for node, (product, slices) in fleet.items():
        create_node(scenario.api, node, product, slices, t)
        scenario.nodes.append(node)
    # MIG-wise it fits, but no node has 1000 CPUs: kube-scheduler's own filter keeps it pending.
    hungry = mig_pod("hungry", t, {"1g.5gb": 1})
    hungry["spec"]["containers"][0]["resources"]["requests"] = {"cpu": "1000"}
    scenario.api.create(path("api", "v1", "namespaces", scenario.namespace, "pods"), hungry)
    # No node has a 3g.20gb or a larger type the policy lends: it fits nowhere.
    scenario.create_pod("big", {"3g.20gb": 1})
    for name in ("hungry", "big"):
        wait_until(lambda name=name: scenario.events(name, "FailedScheduling"), 30, f"FailedScheduling for {name}")
        assert not scenario.pod(name)["spec"].get("nodeName")

    document = assert_same_answers(scenario, "hungry")
    verdicts = {node["name"]: node for node in document["nodes"]}
    assert document["pod"]["state"] == "pending"
    assert verdicts[f"gpu-{t}-exact"]["fit"] == "exact"
    assert verdicts[f"gpu-{t}-borrow"]["fit"] == "costlier"  # it could borrow, but an exact fit exists
    assert verdicts[f"gpu-{t}-borrow"]["grants"][0]["granted"] == G2
    assert verdicts[f"gpu-{t}-whole"]["fit"] == "unresolvable"
    assert verdicts[f"gpu-{t}-h100"]["fit"] == "unresolvable"
    [a100_line] = [line for line in document["policy"]["requests"] if line["gpu_product"] == A100]
    assert a100_line["chains"] == ["a100-40gb"]

    print(explain(scenario, "hungry", output="table"))  # for the closing note: what an admin sees

    document = assert_same_answers(scenario, "big")
    assert {node["fit"] for node in document["nodes"]} <= {"no fit", "unresolvable"}
    whole = next(node for node in document["nodes"] if node["name"] == f"gpu-{t}-whole")
    assert "7g.40gb denied: 7g.40gb is not in allowedTypes of chain a100-40gb" in whole["reason"]


@pytest.mark.parametrize(
    ("product", "chain", "steps", "mode"),
    [(A100, "a100-40gb", 2, "on-demand"), (EAGER_GPU, "e2e-eager", 1, "eager")],
)
def test_explain_reports_a_borrowers_loan_and_its_return_mode(scenario: Scenario, product, chain, steps, mode):
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, product, {"2g.10gb": 1}, scenario.test)
    scenario.nodes.append(node)
    scenario.create_pod("notebook", {"1g.5gb": 1})
    wait_until(
        lambda: "migchain.io/replaced-uid" in (scenario.pod("notebook")["metadata"].get("annotations") or {}),
        30,
        "notebook to borrow",
    )
    document = json.loads(explain(scenario, "notebook"))
    assert document["pod"]["state"] == f"bound to {node}"
    loan = document["loan"]
    assert (loan["original"], loan["borrowed"], loan["chains"], loan["steps"]) == ({G1: 1}, {G2: 1}, [chain], steps)
    assert (loan["node"], loan["running"], loan["return_mode"], loan["restarts"]) == (node, True, mode, 0)
    assert loan["chain_return_modes"] == {chain: mode}
    # The only 1g.5gb it could go back to does not exist: the returner leaves it, and explain says so.
    assert loan["returned_now"] is False
    assert loan["why_not"] == "no free 1g.5gb where it would fit exactly"
    text = explain(scenario, "notebook", output="table")
    assert f"loan: 1g.5gb -> 2g.10gb on {node}, {steps} step{'s' if steps > 1 else ''} up {chain}" in text
    assert f"return mode: {mode} (chain {chain}: {mode})" in text
    print(text)
