"""`migchain simulate --from-cluster` without a cluster: the starting state from listed objects, the replay on it."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from extender import cli
from extender.config import load_rules
from extender.core.cluster import MigCounts, NodeState, Snapshot, pod_record
from extender.core.decide import Placement, place
from extender.core.loan import plan_borrow
from extender.ledger import Ledger
from extender.sim.engine import Job, Running, SimPolicy, simulate
from extender.sim.from_cluster import StartingState, run_from_cluster, starting_bounds, starting_state
from tests.unit.objects import LOAN_KEY

ROOT = Path(__file__).resolve().parents[2]
RULES = load_rules([ROOT / "chains" / "a100-40gb.yaml"])
A100 = "NVIDIA-A100-SXM4-40GB"
G1, G2 = "nvidia.com/mig-1g.5gb", "nvidia.com/mig-2g.10gb"


def node(name: str, slices: dict[str, int]) -> dict[str, Any]:
    labels = {"nvidia.com/gpu.product": A100, "nvidia.com/mig.config.state": "success"}
    allocatable = {"cpu": "64", **{resource: str(count) for resource, count in slices.items()}}
    return {"kind": "Node", "metadata": {"name": name, "labels": labels}, "status": {"allocatable": allocatable}}


def pod(name: str, requests: dict[str, int], node_name: str = "", phase: str = "Running") -> dict[str, Any]:
    limits = {resource: str(count) for resource, count in requests.items()}
    spec: dict[str, Any] = {"containers": [{"name": "main", "resources": {"limits": limits}}]}
    if node_name:
        spec["nodeName"] = node_name
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "ml", "uid": f"uid-{name}", "creationTimestamp": f"2026-11-25T{name}"},
        "spec": spec,
        "status": {"phase": phase if node_name else "Pending"},
    }


def borrower(name: str, node_name: str, free: dict[str, int]) -> dict[str, Any]:
    original = pod(name, {G1: 1})
    verdict = place(pod_record(original).request, NodeState(node_name, A100, "success", free), node_name, RULES)
    assert isinstance(verdict, Placement) and verdict.borrows
    replacement: dict[str, Any] = dict(plan_borrow(original, verdict, LOAN_KEY).replacement)
    replacement["metadata"]["uid"] = f"uid-{name}-borrower"
    replacement["status"] = {"phase": "Running"}
    return replacement


def start_of(*items: dict[str, Any]) -> StartingState:
    ledger = Ledger.of_objects(items)
    return starting_state(ledger.snapshot(), ledger.pods())


def test_running_pods_hold_their_slices_and_borrowers_count_what_they_asked_for():
    start = start_of(
        node("a", {G1: 2, G2: 1}),
        pod("1", {G1: 1}, "a"),
        pod("2", {G1: 1}, "a", phase="Succeeded"),  # finished: holds nothing
        pod("3", {G1: 1}),  # pending: not replayed
        borrower("4", "a", {G2: 1}),
    )
    assert [n.name for n in start.nodes] == ["a"]
    assert all(not n.used for n in start.nodes)  # the engine counts the running pods itself
    assert {r.name: (r.node, r.slices, r.asked) for r in start.running} == {
        "ml/1": ("a", ((G1, 1),), ((G1, 1),)),
        "ml/4": ("a", ((G2, 1),), ((G1, 1),)),  # holds the 2g.10gb, does the work of a 1g.5gb
    }
    assert (start.borrowers, start.left_out) == (1, ())


def test_pods_that_cannot_be_counted_where_they_are_are_left_out_and_named():
    start = start_of(
        node("a", {G1: 1}),
        pod("1", {G1: 1}, "a"),
        pod("2", {G1: 1}, "a"),  # the node has one 1g.5gb: it was repartitioned under this pod
        pod("3", {G1: 1}, "gone"),  # its node is not listed
        node("cpu", {}),  # no MIG slice: not a node of the simulation
    )
    assert [r.name for r in start.running] == ["ml/1"]
    assert start.left_out == ("ml/2", "ml/3")
    assert [n.name for n in start.nodes] == ["a"]


def test_a_running_pods_slices_are_not_free_in_the_simulation():
    start = start_of(node("a", {G1: 1}), pod("1", {G1: 1}, "a"))
    jobs = [Job("new", 0, ((G1, 1),), 100)]
    empty = simulate(start.nodes, RULES, jobs, SimPolicy.STATIC, horizon=100)
    assert empty.never_placed == 0  # from an empty cluster the new pod runs at once
    held = simulate(start.nodes, RULES, jobs, SimPolicy.STATIC, horizon=100, initial=start.running)
    assert held.never_placed == 1  # the running pod keeps the only 1g.5gb for the whole replay
    assert held.useful_utilisation == pytest.approx(1.0)  # and does its work all along
    assert (held.pods, held.pending_at_end, held.running_at_end) == (1, 1, 0)  # the counts are the trace's


def test_a_pod_arriving_next_to_a_running_borrower_borrows_further_up_or_waits():
    start = start_of(node("a", {G1: 1, G2: 1}), pod("1", {G1: 1}, "a"), borrower("2", "a", {G2: 1}))
    seen: list[Mapping[str, tuple[str, MigCounts]]] = []

    def observe(snapshot: Snapshot, running: Mapping[str, tuple[str, MigCounts]]) -> None:
        used: Counter[str] = Counter()
        for _, slices in running.values():
            for resource, count in slices:
                used[resource] += count
        assert dict(snapshot.nodes["a"].used) == {r: used[r] for r in snapshot.nodes["a"].used}
        seen.append(dict(running))

    metrics = simulate(
        start.nodes,
        RULES,
        [Job("new", 0, ((G1, 1),), 50)],
        SimPolicy.ON_DEMAND,
        horizon=60,
        observe=observe,
        initial=start.running,
    )
    assert metrics.never_placed == 1 and metrics.restarts == 0  # the initial borrower is never returned
    assert seen and all({"ml/1", "ml/2"} <= set(running) for running in seen)


def test_the_bounds_count_the_running_pods_work_on_the_slices_they_hold():
    nodes = (NodeState("a", A100, "success", {G1: 2, G2: 1}),)  # 1 + 1 + 2 = 4 compute slices
    start = StartingState(nodes, (Running("ml/b", "a", ((G2, 1),), ((G1, 1),)),), 1, ())
    jobs = [Job("x", 0, ((G1, 1),), 100), Job("y", 0, ((G1, 1),), 100)]
    b = starting_bounds(start, RULES, jobs, 100)
    # The borrower does 1 slice of work on the 2g.10gb; the trace can use the two 1g.5gb: (1 + 2) / 4.
    assert b.fluid == pytest.approx(3 / 4)
    assert b.static == pytest.approx(3 / 4)
    assert b.borrowing == pytest.approx(3 / 4)
    assert b.timed == pytest.approx(3 / 4)
    assert starting_bounds(StartingState((), (), 0, ()), RULES, jobs, 100).fluid == 0


def test_the_report_says_what_it_started_from(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("name,arrival_s,type,runtime_s\np0,0,1g.5gb,100\np1,10,1g.5gb,100\n")
    start = start_of(node("a", {G1: 2, G2: 1}), pod("1", {G1: 1}, "a"), pod("2", {G1: 1}, "nowhere"))
    report = run_from_cluster(start, RULES, str(trace), None, list(SimPolicy), skipped=3)
    table = report.table()
    assert table.startswith("starting from the cluster: 1 node(s) with MIG slices, 1 running pod(s) (0 on a loan)")
    assert "left out 1 bound pod(s) that do not fit where they are: ml/2" in table
    assert "skipped 3 unreadable node or pod object(s)" in table
    document = json.loads(report.json())
    assert document["start"] == {"nodes": 1, "running": 1, "borrowers": 0, "left_out": ["ml/2"], "skipped": 3}
    # One 1g.5gb is held all along: without borrowing p1 waits for p0 (from 10 s to 100 s) ...
    assert document["runs"]["static"]["mean_pending_s"] == pytest.approx(90 / 2)
    assert document["runs"]["on-demand"]["borrows"] == 1  # ... unless it may borrow the 2g.10gb


def test_the_command_line_wants_a_fleet_or_the_cluster_and_says_when_the_cluster_cannot_be_read(tmp_path, capsys):
    chains = str(ROOT / "chains" / "a100-40gb.yaml")
    trace = tmp_path / "trace.csv"
    trace.write_text("name,arrival_s,type,runtime_s\np0,0,1g.5gb,100\n")
    with pytest.raises(SystemExit):
        cli.main(["simulate", "--chains", chains, "--workload", str(trace)])
    assert "one of the arguments --fleet --from-cluster is required" in capsys.readouterr().err
    missing = tmp_path / "no-such-kubeconfig"
    args = ["simulate", "--from-cluster", "--kubeconfig", str(missing), "--chains", chains, "--workload", str(trace)]
    assert cli.main(args) == 1
    assert f"migchain simulate: cannot load the kubeconfig {missing}" in capsys.readouterr().err
