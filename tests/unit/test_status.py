"""`migchain status` over Node and Pod objects (no cluster): the rows, the tables, the JSON, and the command loop."""

from __future__ import annotations

import datetime
import io
import json
from typing import Any, cast

import pytest

from extender import cli
from extender.core.loan import Loan
from extender.core.status import Slices, human_age, loan_pairs, on_loan, status_text
from extender.kube.api import ApiError, KubeApi
from extender.kube.status import kubeconfig_path, render, run, status_of_objects
from tests.unit.objects import G1, G2, G3, borrower, node, pod

G4 = "nvidia.com/mig-4g.20gb"
NOW = datetime.datetime(2026, 11, 25, 10, 3, 12, tzinfo=datetime.UTC)


def fleet() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """gpu-a: both 1g.5gb taken exactly, one 2g.10gb lent to b1 (asked 1g.5gb); gpu-b is being repartitioned."""
    nodes = [
        node("gpu-a", {G1: 2, G2: 2, G3: 1}),
        node("gpu-b", {G1: 1}, state="pending"),
        {"metadata": {"name": "cpu-0"}, "status": {"allocatable": {"cpu": "8"}}},
    ]
    pods = [
        pod("f1", {G1: 1}, "gpu-a"),
        pod("f2", {G1: 1}, "gpu-a"),
        borrower("b1", {G1: 1}, "gpu-a", free={G2: 2, G3: 1}),
        # A finished borrower holds nothing and lends nothing; a pending pod holds nothing either.
        borrower("done", {G1: 1}, "gpu-a", free={G2: 2}) | {"status": {"phase": "Succeeded"}},
        pod("waiting", {G2: 1}),
    ]
    return nodes, pods


def test_nodes_show_allocatable_used_borrowed_and_free_per_type():
    status, skipped = status_of_objects(*fleet())
    assert skipped == 0
    assert [row.name for row in status.nodes] == ["gpu-a", "gpu-b"]  # no MIG, no row
    gpu_a, gpu_b = status.nodes
    assert gpu_a.slices == {
        G1: Slices(allocatable=2, used=2, borrowed=0, free=0),
        G2: Slices(allocatable=2, used=1, borrowed=1, free=1),
        G3: Slices(allocatable=1, used=0, borrowed=0, free=1),
    }
    # A node being repartitioned offers nothing, whatever it advertises.
    assert not gpu_b.offers_slices
    assert gpu_b.slices == {G1: Slices(allocatable=1, used=0, borrowed=0, free=0)}
    assert status.totals() == {
        G1: Slices(3, 2, 0, 0),
        G2: Slices(2, 1, 1, 1),
        G3: Slices(1, 0, 0, 1),
    }


def test_loans_are_read_from_the_borrowers_annotations():
    status, _ = status_of_objects(*fleet())
    [loan] = status.loans
    assert (loan.namespace, loan.pod, loan.node) == ("ml", "b1", "gpu-a")
    assert loan.loan.original == ((G1, 1),)
    assert loan.loan.borrowed == ((G2, 1),)
    assert loan.loan.chains == ("a100-40gb",)
    assert on_loan(status.loans) == {(G1, G2): 1}


def test_the_table_shows_nodes_by_types_and_the_loans():
    status, _ = status_of_objects(*fleet())
    assert status_text(status, NOW).splitlines() == [
        "NODE   GPU                    MIG STATE  1g.5gb  2g.10gb  3g.20gb",
        "gpu-a  NVIDIA-A100-SXM4-40GB  success    2/2     1/2 b1   0/1",
        "gpu-b  NVIDIA-A100-SXM4-40GB  pending    0/1     -        -",
        "TOTAL                                    2/3     1/2 b1   0/1",
        "(used/allocatable slices; bN: N of them held by borrowers)",
        "",
        "NAMESPACE  POD  ORIGINAL  BORROWED  NODE   CHAIN      AGE",
        "ml         b1   1g.5gb    2g.10gb   gpu-a  a100-40gb  3m12s",
    ]


def test_an_empty_cluster_says_so():
    status, _ = status_of_objects([], [])
    assert status_text(status, NOW) == "no node has MIG slices\n\nno active loans"


def test_json_names_full_resources_for_tools():
    status, _ = status_of_objects(*fleet())
    document = json.loads(render(status, "json", NOW, watching=False))
    assert document["nodes"][0]["name"] == "gpu-a"
    assert document["nodes"][0]["slices"][G2] == {"allocatable": 2, "used": 1, "borrowed": 1, "free": 1}
    assert document["nodes"][1]["offers_slices"] is False
    assert document["totals"][G1] == {"allocatable": 3, "used": 2, "borrowed": 0, "free": 0}
    [loan] = document["loans"]
    assert loan | {"replaced_uid": "-"} == {
        "namespace": "ml",
        "pod": "b1",
        "node": "gpu-a",
        "original": {G1: 1},
        "borrowed": {G2: 1},
        "chains": ["a100-40gb"],
        "steps": 2,
        "replaced_uid": "-",
        "created": "2026-11-25T10:00:00Z",
        "age_seconds": 192,
    }
    assert loan["replaced_uid"] == "uid-b1"
    # Watching, each document is one line.
    assert "\n" not in render(status, "json", NOW, watching=True)


def test_unreadable_objects_are_skipped_and_counted():
    nodes, pods = fleet()
    broken = pod("broken", {G1: 1}, "gpu-a")
    broken["spec"]["containers"][0]["resources"]["limits"][G1] = "half"
    status, skipped = status_of_objects(nodes, [*pods, broken])
    assert skipped == 1
    assert status == status_of_objects(nodes, pods)[0]


@pytest.mark.parametrize(
    ("original", "borrowed", "pairs"),
    [
        (((G1, 1),), ((G2, 1),), ((G1, G2, 1),)),
        # A type both asked for and held is held for itself; only the rest is on loan.
        (((G1, 1), (G2, 1)), ((G2, 2),), ((G1, G2, 1),)),
        (((G1, 2), (G2, 1)), ((G2, 1), (G3, 2)), ((G1, G3, 2),)),
        # Several requests borrowed at once pair up in size order.
        (((G1, 1), (G2, 1)), ((G4, 1), (G3, 1)), ((G1, G3, 1), (G2, G4, 1))),
        (((G1, 1),), ((G1, 1),), ()),
    ],
)
def test_loan_pairs(original, borrowed, pairs):
    assert loan_pairs(Loan(original, borrowed, ("a100-40gb",), 2, "uid")) == pairs


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (119, "119s"),
        (192, "3m12s"),
        (300, "5m"),
        (3600, "60m"),
        (4 * 3600 + 60 * 5, "4h5m"),
        (30 * 3600, "30h"),
        (3 * 86400 + 4 * 3600, "3d4h"),
        (12 * 86400, "12d"),
        (800 * 86400, "2y70d"),
        (9 * 365 * 86400, "9y"),
    ],
)
def test_ages_read_like_kubectl(seconds, text):
    assert human_age(seconds) == text


class FakeApi:
    """Answers the two lists `migchain status` makes, one cluster state per round."""

    def __init__(self, *rounds: tuple[list[dict[str, Any]], list[dict[str, Any]]] | Exception) -> None:
        self.rounds = list(rounds)
        self.queries: list[tuple[str, dict[str, Any]]] = []

    def list_all(self, resource: str, **query: Any) -> tuple[list[dict[str, Any]], str]:
        self.queries.append((resource, query))
        current = self.rounds[0]
        if isinstance(current, Exception):
            self.rounds.pop(0)
            raise current
        nodes, pods = current
        if resource.endswith("/pods"):
            if len(self.rounds) > 1:
                self.rounds.pop(0)
            return pods, "1"
        return nodes, "1"


def run_with(api: FakeApi, output: str, watch: bool, rounds: int = 10) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    slept = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) >= rounds:
            raise KeyboardInterrupt

    code = run(cast(KubeApi, api), output, watch, out=out, err=err, clock=lambda: NOW, sleep=sleep)
    return code, out.getvalue(), err.getvalue()


def test_status_prints_once_and_lists_only_pods_that_hold_slices():
    api = FakeApi(fleet())
    code, out, err = run_with(api, "table", watch=False)
    assert code == 0 and err == ""
    assert "ml         b1   1g.5gb    2g.10gb   gpu-a  a100-40gb  3m12s" in out
    assert ("/api/v1/pods", {"fieldSelector": "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"}) in (
        api.queries
    )


def test_status_exits_1_when_the_cluster_cannot_be_read():
    code, out, err = run_with(FakeApi(ApiError(403, "Forbidden", "nodes is forbidden")), "table", watch=False)
    assert code == 1 and out == ""
    assert "migchain status: cannot read nodes and pods: 403 Forbidden: nodes is forbidden" in err


def test_watch_prints_again_only_on_change_survives_errors_and_ctrl_c_exits_0():
    nodes, pods = fleet()
    calmer = [p for p in pods if p["metadata"]["name"] != "b1"]  # the borrower leaves
    api = FakeApi((nodes, pods), (nodes, pods), ApiError(500, "InternalError", "etcd"), (nodes, calmer))
    code, out, err = run_with(api, "json", watch=True, rounds=5)
    assert code == 0
    documents = [json.loads(line) for line in out.splitlines()]
    assert [len(document["loans"]) for document in documents] == [1, 0]
    assert "500 InternalError" in err


def test_kubeconfig_comes_from_the_flag_then_the_environment_then_home(tmp_path):
    assert kubeconfig_path("given", {"KUBECONFIG": "env", "HOME": str(tmp_path)}) == "given"
    assert kubeconfig_path(None, {"KUBECONFIG": "env", "HOME": str(tmp_path)}) == "env"
    assert kubeconfig_path(None, {"HOME": str(tmp_path)}) is None  # then in-cluster
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text("apiVersion: v1\n")
    assert kubeconfig_path(None, {"HOME": str(tmp_path)}) == str(tmp_path / ".kube" / "config")


def test_the_command_says_why_it_cannot_connect(tmp_path, capsys):
    assert cli.main(["status", "--kubeconfig", str(tmp_path / "missing")]) == 1
    assert f"migchain status: cannot load the kubeconfig {tmp_path / 'missing'}" in capsys.readouterr().err


def test_kubectl_runs_it_as_a_plugin(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["kubectl-migchain", "status", "--help"])
    with pytest.raises(SystemExit) as exit_:
        cli.kubectl_plugin()
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: kubectl migchain status")
