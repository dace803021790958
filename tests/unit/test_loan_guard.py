"""The adapters around signed loans: the cache's guard, the returner's reports, the executor, the key and its flags."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from extender import cli, serve
from extender.core.cluster import NodeState, Snapshot, node_state, pod_record, pod_request
from extender.core.decide import Placement, place
from extender.core.loan import (
    FORGED,
    LOAN_SIGNATURE_ANNOTATION,
    SIGNED_ANNOTATIONS,
    UNSIGNED,
    loan_of,
    plan_borrow,
)
from extender.core.returns import borrowers_of, plan_returns
from extender.core.status import loan_rows
from extender.kube.api import ApiError, KubeApi
from extender.kube.cache import ClusterCache
from extender.kube.events import EventRecorder
from extender.kube.executor import BorrowError, Executor
from extender.kube.lease import LeaderElection
from extender.kube.loan_key import admin_key, create_secret, read_secret
from extender.kube.returner import Returner
from extender.loan_guard import MAX_QUEUED_REPORTS, LoanGuard
from extender.metrics import ReturnerMetrics, UnreadableLoans
from extender.reload import RulesInForce
from extender.store import SnapshotStore
from tests.unit.objects import A100, G1, G2, LOAN_KEY, RULES, borrower, node, pod
from tests.unit.test_metrics import FakeApi, sample

ROOT = Path(__file__).resolve().parents[2]


def forged(name: str, node_name: str = "gpu-a") -> dict[str, Any]:
    """A genuine borrower whose owner rewrote its steps."""
    loaned = borrower(name, {G1: 1}, node_name, free={G2: 1})
    loaned["metadata"]["annotations"]["migchain.io/steps"] = "1000"
    return loaned


def test_the_guard_drops_a_forged_loan_counts_it_once_and_queues_one_report():
    registry = CollectorRegistry()
    guard = LoanGuard(LOAN_KEY, UnreadableLoans(registry), reports=True)
    record = pod_record(forged("b1"))
    for _ in range(3):  # every watch event of the pod
        believed = guard.vouch(record)
    assert loan_of(believed.migchain) is None and believed.replaces == ""
    assert sample(registry, "migchain_unreadable_loans_total", reason=FORGED) == 1
    [report] = guard.take_reports(10)
    assert (report.namespace, report.name, report.reason) == ("ml", "b1", FORGED)
    assert "not treated as a borrower" in report.message
    assert guard.take_reports(10) == []
    # Fixed by its owner, then broken again: a new report. Gone and back (another pod of that UID cannot be): none.
    guard.vouch(pod_record(borrower("b1", {G1: 1}, "gpu-a", free={G2: 1})))
    guard.vouch(record)
    assert sample(registry, "migchain_unreadable_loans_total", reason=FORGED) == 2
    guard.forget(record.request.uid)
    unsigned = pod_record(borrower("b2", {G1: 1}, "gpu-a", free={G2: 1}))
    unsigned.migchain.pop("migchain.io/loan-signature")  # type: ignore[attr-defined]
    guard.vouch(unsigned)
    assert sample(registry, "migchain_unreadable_loans_total", reason=UNSIGNED) == 1
    assert [r.reason for r in guard.take_reports(10)] == [FORGED, UNSIGNED]


def test_the_guards_queue_is_bounded_and_only_the_returner_queues():
    guard = LoanGuard(LOAN_KEY, reports=True)
    for index in range(MAX_QUEUED_REPORTS + 50):
        guard.vouch(pod_record(forged(f"b{index}")))
    assert len(guard.take_reports(10_000)) == MAX_QUEUED_REPORTS
    counting = LoanGuard(LOAN_KEY)  # the extender's: counts, reports nothing
    counting.vouch(pod_record(forged("b")))
    assert counting.take_reports(10) == []


def test_the_cache_keeps_a_forged_loan_out_of_the_loans_it_shows():
    registry = CollectorRegistry()
    cache = ClusterCache(
        cast(KubeApi, FakeApi()), SnapshotStore(), loans=LoanGuard(LOAN_KEY, UnreadableLoans(registry))
    )
    cache._list_nodes([node("gpu-a", {G1: 1, G2: 2})])
    cache._list_pods([borrower("genuine", {G1: 1}, "gpu-a", free={G2: 1}), forged("forger")])
    _, records = cache.view()
    assert [row.pod for row in loan_rows(records)] == ["genuine"]
    # A later change of the genuine one (its owner edits its chain) makes it an ordinary pod too.
    edited = borrower("genuine", {G1: 1}, "gpu-a", free={G2: 1})
    edited["metadata"]["annotations"]["migchain.io/chain"] = "something-else"
    cache._pod_event("MODIFIED", edited)
    assert loan_rows(cache.view()[1]) == []
    assert sample(registry, "migchain_unreadable_loans_total", reason=FORGED) == 2
    # Still counted as what it asks for: the slices are used either way.
    assert cache.view()[0].nodes["gpu-a"].used == {G2: 2}


class Leading:
    def __init__(self, leading: bool) -> None:
        self.value = leading

    def leading(self) -> bool:
        return self.value


def test_the_leading_returner_reports_each_rejected_loan_once_with_an_event_and_the_round_goes_on():
    api = FakeApi()
    guard = LoanGuard(LOAN_KEY, reports=True)
    cache = ClusterCache(cast(KubeApi, api), SnapshotStore(), loans=guard)
    cache._list_nodes([node("gpu-a", {G1: 1, G2: 2})])
    cache._list_pods([forged("forger"), pod("waiting", {G2: 1}, phase="Pending")])

    class Executor_:
        loan_key = LOAN_KEY

        def __init__(self) -> None:
            self.api = api

        def journal(self, kind: str, rejected: Any = None) -> list[Any]:
            return []

    returner = Returner(
        cache,
        RulesInForce.fixed(RULES),
        cast(Executor, Executor_()),
        EventRecorder(cast(KubeApi, api)),
        cast(LeaderElection, Leading(True)),
        metrics=ReturnerMetrics(),
    )
    returner.round()
    returner.round()
    events = [body for resource, body in api.created if resource.endswith("/events")]
    assert [(e["involvedObject"]["name"], e["reason"], e["type"]) for e in events] == [
        ("forger", "LoanRejected", "Warning")
    ]
    assert not [body for resource, body in api.created if "eviction" in resource]  # not a borrower: never evicted


def test_a_pod_named_like_the_replacement_is_migchains_only_if_its_loan_verifies():
    original = pod("notebook", {G1: 1}, phase="Pending")
    original["metadata"]["ownerReferences"] = [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": "uid-j", "controller": True}
    ]
    verdict = place(pod_request(original), NodeState("gpu-a", A100, "success", {G2: 1}, {}), "gpu-a", RULES)
    assert isinstance(verdict, Placement)
    plan = plan_borrow(original, verdict, LOAN_KEY)

    class Taken(FakeApi):
        def create(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
            raise ApiError(409, "AlreadyExists", "pods exists")

    ours = dict(plan.replacement)
    executor = Executor(
        cast(KubeApi, Taken({f"/api/v1/namespaces/ml/pods/{plan.replacement_name}": ours})), "ns", LOAN_KEY
    )
    assert executor._create_replacement(plan) == ours  # a retried borrow finds the one it made
    squatter = {**ours, "metadata": {**ours["metadata"], "annotations": {"migchain.io/replaced-uid": "uid-notebook"}}}
    executor.api = cast(KubeApi, Taken({f"/api/v1/namespaces/ml/pods/{plan.replacement_name}": squatter}))
    with pytest.raises(BorrowError, match="not ours"):
        executor._create_replacement(plan)


# -- the key ----------------------------------------------------------------------------------------------------------


def test_loan_key_out_writes_a_new_key_readable_by_its_owner_only_and_never_overwrites(tmp_path, capsys):
    target = tmp_path / "key"
    assert cli.main(["loan-key", "--out", str(target)]) == 0
    key = target.read_bytes()
    assert len(key) == 32 and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert cli.main(["loan-key", "--out", str(target)]) == 1
    assert target.read_bytes() == key
    assert "cannot write" in capsys.readouterr().err


def test_the_secret_is_made_once_and_read_back():
    api = FakeApi()
    assert read_secret(cast(KubeApi, api), "migchain-system") is None
    assert create_secret(cast(KubeApi, api), "migchain-system")
    [(resource, body)] = api.created
    assert resource == "/api/v1/namespaces/migchain-system/secrets"
    assert body["immutable"] is True and body["metadata"]["name"] == "migchain-loan-key"
    api.objects[f"{resource}/migchain-loan-key"] = body
    key = read_secret(cast(KubeApi, api), "migchain-system")
    assert key is not None and len(key) == 32
    assert not create_secret(cast(KubeApi, api), "migchain-system")  # never a second key
    assert len(api.created) == 1


def test_an_admins_command_uses_the_key_file_else_the_secret_else_warns(tmp_path):
    warnings: list[str] = []
    (tmp_path / "key").write_bytes(LOAN_KEY)
    assert admin_key(cast(KubeApi, FakeApi()), str(tmp_path / "key"), warnings.append) == LOAN_KEY
    assert admin_key(cast(KubeApi, FakeApi(fail=ApiError(403, "Forbidden", "secrets"))), None, warnings.append) is None
    assert "not verified" in warnings[0] and "403 Forbidden" in warnings[0]
    (tmp_path / "short").write_bytes(b"short")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        admin_key(cast(KubeApi, FakeApi()), str(tmp_path / "short"), warnings.append)


def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "KUBECONFIG": ""},
    )


def test_neither_process_starts_against_a_cluster_without_a_usable_loan_key(tmp_path):
    chains = str(ROOT / "chains" / "a100-40gb.yaml")
    kubeconfig = f"--kubeconfig={tmp_path / 'kubeconfig'}"
    extender = run("extender.serve", kubeconfig, "--chains", chains)
    assert extender.returncode == 2 and "--loan-key-file is required" in extender.stderr
    returner = run("extender.returner_cli", kubeconfig, "--chains", chains)
    assert returner.returncode == 2 and "--loan-key-file is required" in returner.stderr
    (tmp_path / "short").write_bytes(b"x" * 8)
    short = run("extender.serve", kubeconfig, f"--loan-key-file={tmp_path / 'short'}", "--chains", chains)
    assert short.returncode == 2 and "needs at least 32 bytes" in short.stderr
    assert serve.parser().parse_args(["--chains", chains]).loan_key_file is None  # standalone: no key needed


hostile_values = st.one_of(
    st.text(max_size=40),
    st.sampled_from(("²", "1" * 400, "{", "-1", "nvidia.com/mig-1g.5gb=99999999999", "v1:" + "0" * 64)),
)
hostile_annotations = st.dictionaries(
    st.sampled_from((*SIGNED_ANNOTATIONS, LOAN_SIGNATURE_ANNOTATION, "migchain.io/return", "migchain.io/max-restarts")),
    hostile_values,
    max_size=9,
)


@given(annotations=st.lists(hostile_annotations, min_size=1, max_size=4))
def test_whatever_a_tenant_writes_on_running_pods_makes_no_borrower_and_stops_no_round(annotations):
    """Running pods that never borrowed, their owners writing any migchain.io/ annotations at all: through the
    cache's guard none is a borrower, and the return round, status and metrics read them without an exception."""
    guard = LoanGuard(LOAN_KEY)
    pods = []
    for index, written in enumerate(annotations):
        running = pod(f"p{index}", {G2: 1}, "gpu-a")
        running["metadata"]["annotations"] = dict(written)
        pods.append(running)
    records = [guard.vouch(pod_record(p)) for p in pods]
    assert borrowers_of(records, RULES) == []
    assert loan_rows(records) == []
    snapshot = Snapshot.of([node_state(node("gpu-a", {G1: 1, G2: len(pods)}))])
    assert plan_returns(snapshot, borrowers_of(records, RULES), [], RULES) == ()
