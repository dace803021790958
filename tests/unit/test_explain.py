"""`migchain explain` without a cluster: hand-built objects and snapshots, and a property tying it to the filter."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extender import cli
from extender.config import load_rules
from extender.core.cluster import NodeState, PodRecord, Snapshot, pod_record
from extender.core.decide import Placement, filter_nodes, place, score_nodes
from extender.core.explain import (
    Answer,
    Explanation,
    Fit,
    candidate_nodes,
    explain,
    explain_document,
    explain_text,
)
from extender.core.loan import LOAN_SIGNATURE_ANNOTATION, loan_signature, plan_borrow
from extender.core.rules import ReturnMode
from extender.kube.explain import default_chain_files, load_chains, render
from extender.kube.snapshot import ClusterObjects
from extender.ledger import Ledger
from tests.strategies import chain_rules, pods, snapshots
from tests.unit.objects import LOAN_KEY

ROOT = Path(__file__).resolve().parents[2]
A100_CHAIN = ROOT / "chains" / "a100-40gb.yaml"
EAGER_CHAIN = ROOT / "tests" / "fixtures" / "chains" / "e2e-eager.yaml"
OPT_OUTS_CHAIN = ROOT / "tests" / "fixtures" / "chains" / "e2e-opt-outs.yaml"  # podOptOuts honoured
BROKEN = ROOT / "tests" / "fixtures" / "chains" / "negative-max-steps.yaml"
RULES = load_rules([A100_CHAIN, EAGER_CHAIN, OPT_OUTS_CHAIN])
A100 = "NVIDIA-A100-SXM4-40GB"
EAGER_GPU = "TEST-EAGER-GPU"
OPT_OUT_GPU = "TEST-OPT-OUT-GPU"
G1, G2, G7 = "nvidia.com/mig-1g.5gb", "nvidia.com/mig-2g.10gb", "nvidia.com/mig-7g.40gb"


# -- objects as the API server lists them -------------------------------------


def node(name: str, slices: dict[str, int], product: str = A100, state: str = "success") -> dict[str, Any]:
    labels = {"nvidia.com/gpu.product": product, "nvidia.com/mig.config.state": state, "pool": "gpu"}
    allocatable = {"cpu": "64", **{resource: str(count) for resource, count in slices.items()}}
    return {"kind": "Node", "metadata": {"name": name, "labels": labels}, "status": {"allocatable": allocatable}}


def pod(
    name: str,
    requests: dict[str, int],
    node_name: str = "",
    *,
    namespace: str = "ml",
    annotations: dict[str, str] | None = None,
    owner: str = "",
    created: str = "2026-11-25T10:00:00Z",
) -> dict[str, Any]:
    limits = {resource: str(count) for resource, count in requests.items()}
    spec: dict[str, Any] = {
        "schedulerName": "migchain-scheduler",
        "nodeSelector": {"pool": "gpu"},
        "containers": [{"name": "main", "image": "cuda", "resources": {"limits": limits}}],
    }
    if node_name:
        spec["nodeName"] = node_name
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": f"uid-{name}",
        "creationTimestamp": created,
        "annotations": dict(annotations or {}),
    }
    if owner:
        metadata["ownerReferences"] = [
            {
                "apiVersion": "batch/v1" if owner == "Job" else "apps/v1",
                "kind": owner,
                "name": "owner",
                "uid": "uid-owner",
                "controller": True,
            }
        ]
    phase = "Running" if node_name else "Pending"
    return {"kind": "Pod", "metadata": metadata, "spec": spec, "status": {"phase": phase}}


def borrower(
    name: str,
    requests: dict[str, int],
    node_name: str,
    free: dict[str, int],
    *,
    product: str = A100,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The pod a borrow on `node_name` (with `free` slices) puts in place of pending pod `name`, as listed later."""
    original = pod(name, requests, annotations=annotations)
    verdict = place(pod_record(original).request, NodeState(node_name, product, "success", free), node_name, RULES)
    assert isinstance(verdict, Placement) and verdict.borrows
    replacement: dict[str, Any] = dict(plan_borrow(original, verdict, LOAN_KEY).replacement)
    replacement["metadata"]["uid"] = f"uid-{name}-borrower"
    replacement["metadata"]["creationTimestamp"] = "2026-11-25T10:05:00Z"
    replacement["status"] = {"phase": "Running"}
    return replacement


def cluster(*items: dict[str, Any]) -> ClusterObjects:
    ledger = Ledger.of_objects(items)
    nodes = [item for item in items if item["kind"] == "Node"]
    pods_ = [item for item in items if item["kind"] == "Pod"]
    return ClusterObjects(nodes, pods_, ledger.snapshot(), list(ledger.pods()), 0)


def explained(objects: ClusterObjects, name: str, namespace: str = "ml", **kwargs: Any) -> Explanation:
    [target] = [r for r in objects.records if r.request.key == f"{namespace}/{name}"]
    candidates = candidate_nodes(target.request, objects.snapshot)
    return explain(target, objects.snapshot, RULES, candidates, objects.records, **kwargs)


def verdict(explanation: Explanation, name: str) -> Any:
    [found] = [n for n in explanation.nodes if n.name == name]
    return found


# -- scenarios ----------------------------------------------------------------


def test_an_exact_fit_passes_and_every_other_node_says_why_not():
    objects = cluster(
        node("exact", {G1: 2}),
        node("larger", {G2: 1}),
        node("full", {G1: 1}),
        node("whole-gpu", {G7: 1}),
        node("repartitioning", {G1: 1}, state="pending"),
        pod("filler", {G1: 1}, "full"),
        pod("train", {G1: 1}),
    )
    e = explained(objects, "train")
    assert e.state == "pending"
    assert e.passed == ("exact",)
    assert (verdict(e, "exact").fit, verdict(e, "exact").score) == (Fit.EXACT, 9)  # one 1g.5gb left: close
    larger = verdict(e, "larger")
    assert (larger.fit, larger.answer) == (Fit.COSTLIER, Answer.FAILED)
    assert larger.reason.endswith("; 1 other node(s) offer an exact fit")
    assert larger.score == 5  # what /prioritize says of it all the same: a 2-step borrow, tight
    assert verdict(e, "full").fit is Fit.NO_FIT
    assert verdict(e, "full").reason.startswith("no free 1g.5gb (larger: ")
    assert (verdict(e, "whole-gpu").fit, verdict(e, "whole-gpu").answer) == (Fit.UNRESOLVABLE, Answer.UNRESOLVABLE)
    assert "7g.40gb denied: 5 steps exceed maxSteps 3 of chain a100-40gb" in verdict(e, "whole-gpu").reason
    assert "MIG is being reconfigured" in verdict(e, "repartitioning").reason
    assert [n.name for n in e.nodes][:2] == ["exact", "larger"]  # passed first, then the near miss


def test_a_borrow_names_the_granted_type_the_steps_and_the_chain():
    objects = cluster(node("a", {G2: 1}), pod("train", {G1: 1}))
    e = explained(objects, "train")
    a = verdict(e, "a")
    assert (a.fit, a.answer, a.score) == (Fit.BORROW, Answer.PASSED, 5)
    assert a.placement is not None
    [grant] = a.placement.grants
    assert (grant.requested, grant.granted, grant.steps, grant.chain) == (G1, G2, 2, "a100-40gb")
    assert a.reason == "borrows: 1x 2g.10gb for 1g.5gb (2 steps up chain a100-40gb)"
    document = explain_document(e)
    assert document["nodes"][0]["grants"] == [
        {"requested": G1, "granted": G2, "count": 1, "steps": 2, "chain": "a100-40gb"}
    ]


def test_the_policy_lines_show_every_larger_type_allowed_or_denied_and_the_chains_policy():
    objects = cluster(node("a", {G7: 1}), pod("big", {"nvidia.com/mig-3g.20gb": 1}))
    e = explained(objects, "big")
    [line] = e.requests
    assert (line.gpu_product, line.chains) == (A100, ("a100-40gb",))
    denied = {o.granted: o.denied for o in line.options}
    assert denied[G7] == "7g.40gb is not in allowedTypes of chain a100-40gb"
    assert denied["nvidia.com/mig-4g.20gb"] is None
    text = explain_text(e)
    assert "7g.40gb   2 steps up a100-40gb        denied: 7g.40gb is not in allowedTypes of chain a100-40gb" in text
    assert "maxSteps 3; allowedTypes 1g.10gb 2g.10gb 3g.20gb 4g.20gb; namespaces all except kube-system" in text
    assert "(ml covered); returnMode on-demand; reclaimAfterSeconds 120; headroomSeconds 300; dryRun off for ml" in text


def test_an_excluded_namespace_is_shown_as_not_covered():
    objects = cluster(node("a", {G2: 1}), pod("sys", {G1: 1}, namespace="kube-system"))
    e = explained(objects, "sys", namespace="kube-system")
    assert e.passed == ()
    assert all(
        o.denied == "namespace kube-system is not covered by the policy of chain a100-40gb"
        for o in e.requests[0].options
    )
    [chain] = explain_document(e)["policy"]["chains"]
    assert chain["namespaces"] == {"include": [], "exclude": ["kube-system"], "covers_pod": False}


@pytest.mark.parametrize(
    ("annotations", "owner", "why"),
    [
        ({"migchain.io/borrow": "false"}, "", "pod annotation migchain.io/borrow=false"),
        ({}, "StatefulSet", "StatefulSet pods never borrow"),
        ({}, "DaemonSet", "DaemonSet pods never borrow"),
        ({}, "Workflow", "pods owned by a Workflow (apps/v1) keep their own type"),  # on no list (issue 18, item 6)
    ],
)
def test_a_pod_that_may_not_borrow_says_why(annotations, owner, why):
    objects = cluster(node("a", {G2: 1}), pod("p", {G1: 1}, annotations=annotations, owner=owner))
    e = explained(objects, "p")
    assert e.passed == ()
    assert any(why in note for note in e.notes)
    assert f"(borrowing off: {why}" in verdict(e, "a").reason
    assert explain_document(e)["pod"]["may_borrow"] is False


def test_looser_fits_and_the_budget_leave_out_fitting_nodes_as_the_extender_does():
    objects = cluster(node("a", {G1: 1}), node("b", {G1: 4}), node("c", {G1: 1}), pod("train", {G1: 1}))
    e = explained(objects, "train")
    assert e.passed == ("a", "c")  # the tighter fits score higher: only they pass
    b = verdict(e, "b")
    assert (b.fit, b.answer) == (Fit.LOOSER, Answer.LEFT_OUT)
    assert "left out: other nodes fit tighter (score 10), and only they pass" in b.reason
    assert explained(objects, "train").budget == 3  # nodes_to_pass of a 3-node cluster: all of them
    c = verdict(explained(objects, "train", budget=1), "c")
    assert (c.fit, c.answer) == (Fit.BUDGET, Answer.LEFT_OUT)
    assert "left out: the filter passes at most 1 fitting nodes" in c.reason


def test_candidates_are_the_nodes_the_pod_may_run_on():
    other = {"kind": "Node", "metadata": {"name": "cpu-only", "labels": {"pool": "cpu"}}, "status": {}}
    tainted = node("tainted", {G1: 1})
    tainted["spec"] = {"taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]}
    objects = cluster(node("a", {G1: 1}), other, tainted, pod("train", {G1: 1}))
    [train] = objects.records
    assert candidate_nodes(train.request, objects.snapshot) == ["a"]
    loose = pod_record(pod("loose", {G1: 1}) | {"spec": {"tolerations": [{"operator": "Exists"}]}}).request
    assert candidate_nodes(loose, objects.snapshot) == ["a", "cpu-only", "tainted"]


# -- borrowers and returns ----------------------------------------------------


def test_an_on_demand_borrower_with_nobody_waiting_stays_and_says_what_would_return_it():
    objects = cluster(
        node("a", {G1: 1, G2: 1}),
        pod("filler", {G1: 1}, "a"),
        borrower("notebook", {G1: 1}, "a", {G2: 1}),
    )
    e = explained(objects, "notebook")
    outlook = e.outlook
    assert outlook is not None
    assert (outlook.mode, outlook.running, outlook.restarts, outlook.restore) == (ReturnMode.ON_DEMAND, True, 0, None)
    assert outlook.loan.original == ((G1, 1),) and outlook.loan.borrowed == ((G2, 1),)
    assert outlook.condition == (
        "when a 1g.5gb is free on a node where it fits exactly and a pending pod that fits nowhere may run on a "
        "and would fit the 2g.10gb it gives back there (on-demand); or, back to Pending, when a pod waiting 120 s "
        "or more for its own 2g.10gb fits nowhere else (reclaimed)"
    )
    assert outlook.why_not == "no free 1g.5gb where it would fit exactly"
    assert "(a borrower: it asked for 1g.5gb)" in explain_text(e)


def test_an_on_demand_borrower_is_returned_now_when_a_free_slice_and_a_waiting_pod_meet():
    objects = cluster(
        node("a", {G1: 1, G2: 1}),
        borrower("notebook", {G1: 1}, "a", {G2: 1}),
        pod("needs-2g", {G2: 1}),
    )
    e = explained(objects, "notebook")
    assert e.outlook is not None and e.outlook.restore is not None
    assert e.outlook.restore.target == "a"
    assert e.outlook.restore.unblocks == "ml/needs-2g"
    document = explain_document(e)["loan"]
    assert document["returned_now"] is True
    assert "of them, allowed on a and fitting the 2g.10gb it would give back there: ml/needs-2g" in document["facts"]
    # The waiting pod's own explanation names the return that makes room for it.
    waiting = explained(objects, "needs-2g")
    assert [plan.borrower.key for plan in waiting.unblocking] == ["ml/notebook"]
    assert "a return is planned now to make room for it: ml/notebook on a goes back to a" in explain_text(waiting)


def test_an_eager_borrower_is_returned_as_soon_as_its_type_is_free():
    objects = cluster(
        node("e", {G1: 1, G2: 1}, product=EAGER_GPU),
        borrower("job", {G1: 1}, "e", {G2: 1}, product=EAGER_GPU),
    )
    outlook = explained(objects, "job").outlook
    assert outlook is not None
    assert outlook.mode is ReturnMode.EAGER
    assert outlook.chain_modes == (("e2e-eager", ReturnMode.EAGER),)
    assert outlook.restore is not None and outlook.restore.target == "e"
    assert outlook.condition.startswith("as soon as a 1g.5gb is free on a node where it fits exactly (eager)")


@pytest.mark.parametrize(
    ("annotations", "restarts", "held_back"),
    [
        ({"migchain.io/return": "false"}, 0, "pod annotation migchain.io/return=false"),
        ({"migchain.io/max-restarts": "2"}, 2, "restarted 2 time(s), migchain.io/max-restarts=2"),
    ],
)
def test_a_borrower_held_back_where_the_policy_honours_opt_outs_is_never_returned_and_says_why(
    annotations, restarts, held_back
):
    job = borrower("job", {G1: 1}, "e", {G2: 1}, product=OPT_OUT_GPU, annotations=annotations)
    objects = cluster(node("e", {G1: 1, G2: 1}, product=OPT_OUT_GPU), returned_before(job, restarts))
    outlook = explained(objects, "job").outlook
    assert outlook is not None
    assert outlook.held_back == held_back
    assert outlook.restore is None
    assert outlook.why_not == f"never while {held_back}"
    assert outlook.ignored_opt_outs == ()


def test_an_opt_out_the_policy_does_not_honour_is_shown_ignored_and_the_borrower_returned():
    annotations = {"migchain.io/return": "false", "migchain.io/max-restarts": "0"}
    objects = cluster(
        node("e", {G1: 1, G2: 1}, product=EAGER_GPU),
        borrower("job", {G1: 1}, "e", {G2: 1}, product=EAGER_GPU, annotations=annotations),
    )
    e = explained(objects, "job")
    assert e.outlook is not None
    assert (e.outlook.held_back, e.outlook.ignored_opt_outs) == (
        "",
        ("migchain.io/return=false", "migchain.io/max-restarts=0"),
    )
    assert e.outlook.restore is not None
    text = explain_text(e)
    assert "pod opt-out not honoured by its chain's policy (podOptOuts): migchain.io/return=false" in text
    assert "pod opt-outs honoured for ml: none" in text
    assert explain_document(e)["loan"]["ignored_opt_outs"] == ["migchain.io/return=false", "migchain.io/max-restarts=0"]


def returned_before(pod: dict[str, Any], restarts: int) -> dict[str, Any]:
    """A borrower whose pod migchain returned `restarts` times before: the count it carries, signed as the
    returner signs it."""
    if restarts:
        annotations = pod["metadata"]["annotations"]
        annotations["migchain.io/restarts"] = str(restarts)
        mig = pod_record(pod).request.mig
        name = pod["metadata"]["name"]
        annotations[LOAN_SIGNATURE_ANNOTATION] = loan_signature(LOAN_KEY, "ml", name, mig, annotations)
    return pod


def test_a_loan_whose_chain_is_gone_returns_on_demand():
    objects = cluster(node("a", {G2: 1}), borrower("notebook", {G1: 1}, "a", {G2: 1}))
    [record] = [r for r in objects.records if r.request.name == "notebook"]
    e = explain(record, objects.snapshot, load_rules([EAGER_CHAIN]), ["a"], objects.records)
    assert e.outlook is not None
    assert e.outlook.chain_modes == (("a100-40gb", None),)
    assert e.outlook.mode is ReturnMode.ON_DEMAND
    assert "chain a100-40gb: no longer loaded, on-demand by default" in explain_text(e)


# -- property: explain says what the filter and the scores say ------------------


@given(
    rules=chain_rules(),
    snapshot=snapshots(),
    request=pods(),
    ghost=st.booleans(),
    budget=st.none() | st.integers(1, 6),
)
def test_explains_verdicts_are_the_filters_and_its_scores_the_prioritizes(rules, snapshot, request, ghost, budget):
    candidates = [*snapshot.nodes, *(["ghost"] if ghost else [])]  # a node migchain does not know, too
    e = explain(PodRecord(request, "", False), snapshot, rules, candidates, budget=budget)
    keep = len(snapshot.nodes) if budget is None else budget  # nodes_to_pass of a small cluster: all of them
    decision = filter_nodes(request, candidates, snapshot, rules, keep)
    scores = score_nodes(request, candidates, snapshot, rules)
    assert sorted(n.name for n in e.nodes) == sorted(candidates)
    assert set(e.passed) == set(decision.passed)
    assert {n.name: n.reason for n in e.nodes if n.answer is Answer.FAILED} == dict(decision.failed)
    assert {n.name: n.reason for n in e.nodes if n.answer is Answer.UNRESOLVABLE} == dict(decision.unresolvable)
    assert {n.name: n.score for n in e.nodes} == scores
    for n in e.nodes:
        fits = isinstance(place(request, snapshot.nodes.get(n.name), n.name, rules), Placement)
        assert (n.placement is not None) == fits
        if n.answer is Answer.PASSED:
            assert n.fit is (Fit.BORROW if n.placement and n.placement.borrows else Fit.EXACT)
        if n.answer is Answer.LEFT_OUT:  # a looser fit, or the budget full
            best = max(scores[name] for name in decision.passed)
            assert fits and (n.score < best or len(decision.passed) == keep)
            assert (n.fit is Fit.LOOSER) == (n.score < best)
        assert (n.fit is Fit.COSTLIER) == (n.answer is Answer.FAILED and fits)
    json.dumps(explain_document(e))  # always JSON-ready


# -- the command's own layer, without a cluster --------------------------------


def test_render_finds_the_pod_and_prints_json_or_says_it_is_missing():
    objects = cluster(node("a", {G2: 1}), pod("train", {G1: 1}))
    document = json.loads(render(objects, RULES, "ml", "train", nodes=None, output="json"))
    assert document["pod"]["state"] == "pending"
    assert document["candidates_from"] == "the nodes it may run on: its nodeSelector against node labels and taints"
    assert [(n["name"], n["fit"], n["filter"], n["score"]) for n in document["nodes"]] == [("a", "borrow", "passed", 5)]
    assert json.loads(render(objects, RULES, "ml", "train", nodes=["a", "b"], output="json"))["nodes"][1] == {
        "name": "b",
        "gpu_product": "",
        "fit": "no fit",
        "filter": "failed",
        "reason": "node b is not in migchain's cluster cache yet",
        "score": 0,
        "cost": None,
        "grants": [],
    }
    with pytest.raises(ValueError, match="pod ml/nothing not found"):
        render(objects, RULES, "ml", "nothing", nodes=None, output="table")


def test_chain_files_default_to_the_current_directorys_chains_folder(tmp_path, monkeypatch):
    assert default_chain_files(tmp_path) == []
    (tmp_path / "chains").mkdir()
    (tmp_path / "chains" / "a.yaml").write_text(A100_CHAIN.read_text())
    assert default_chain_files(tmp_path) == [str(tmp_path / "chains" / "a.yaml")]
    monkeypatch.chdir(tmp_path)
    rules = load_chains(None, io.StringIO())
    assert rules is not None and [chain.name for chain in rules.chains] == ["a100-40gb"]


def test_explain_prints_chain_problems_as_the_loader_words_them_and_exits_1(capsys):
    assert cli.main(["explain", "train", "-n", "ml", "--chains", str(BROKEN)]) == 1
    err = capsys.readouterr().err
    assert f"{BROKEN}:8: policy.maxSteps: must be 0 or more" in err
    assert "1 problem(s) found" in err


def test_explain_without_chain_files_says_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["explain", "train"]) == 1
    assert "no chain files: give --chains FILE..., or run where chains/*.yaml is" in capsys.readouterr().err


def test_a_snapshot_with_no_candidates_explains_an_empty_table():
    e = explain(PodRecord(pod_record(pod("p", {G1: 1})).request, "", False), Snapshot(), RULES, [])
    assert e.nodes == () and "no candidate node" in explain_text(e)
