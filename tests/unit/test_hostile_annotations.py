"""Hostile annotations on running pods (issue 17): each costs its own pod, never a round, a scrape or an answer.

A pod's owner can edit any annotation of a running pod, the loan record
migchain wrote on a borrower included, and can write a forged one on any pod.
Every case here runs the real core and the real returner round, metrics and
Flask app around them; only the API server is scripted.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import tracemalloc
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from extender.config import load_rules
from extender.core.cluster import NodeState, PodRecord, PodRequest, Snapshot, pod_record, pod_request
from extender.core.decide import MAX_REASON_CHARS, Placement, place
from extender.core.explain import candidate_nodes, explain, explain_document, explain_text
from extender.core.loan import FORGED, Loan, plan_borrow
from extender.core.loan import UNREADABLE as UNREADABLE_LOAN
from extender.core.returns import borrowers_of, pending_requests, plan_returns
from extender.core.status import loan_pairs, status_text
from extender.kube.api import ApiError, KubeApi
from extender.kube.cache import ClusterCache
from extender.kube.events import EventRecorder
from extender.kube.executor import EvictionBlocked, Executor
from extender.kube.lease import LeaderElection
from extender.kube.returner import Returner
from extender.kube.status import status_of_objects
from extender.ledger import Ledger
from extender.loan_guard import LoanGuard
from extender.metrics import Metrics, ReturnerMetrics
from extender.probes import health_routes
from extender.reload import RulesInForce
from extender.store import SnapshotStore
from extender.web.app import WebSettings, create_app
from tests.unit import objects
from tests.unit.objects import LOAN_KEY

ROOT = Path(__file__).resolve().parents[2]
RULES = load_rules([ROOT / "chains" / "a100-40gb.yaml", ROOT / "tests" / "fixtures" / "chains" / "e2e-eager.yaml"])
A100 = "NVIDIA-A100-SXM4-40GB"
EAGER_GPU = "TEST-EAGER-GPU"  # chain e2e-eager: 1g.5gb -> 2g.10gb -> 3g.20gb, returnMode eager
G1, G2, G3, G4 = (f"nvidia.com/mig-{p}" for p in ("1g.5gb", "2g.10gb", "3g.20gb", "4g.20gb"))

ORIGINAL = "migchain.io/original-requests"
BORROWED = "migchain.io/borrowed-requests"
STEPS = "migchain.io/steps"
RESOURCES = "migchain.io/original-resources"

# What a pod's owner writes on a running borrower: (annotation, value). Each makes the loan record unreadable.
UNREADABLE = {
    "restarts-superscript-two": ("migchain.io/restarts", "²"),
    "restarts-arabic-three": ("migchain.io/restarts", "٣"),
    "restarts-huge": ("migchain.io/restarts", "9" * 40),
    "steps-superscript-two": (STEPS, "²"),
    "steps-huge": (STEPS, "9" * 5000),
    "count-5e7": (ORIGINAL, f"{G1}=50000000"),
    "count-1e12": (ORIGINAL, f"{G1}=1000000000000"),
    "count-superscript-two": (ORIGINAL, f"{G1}=²"),
    "count-negative": (ORIGINAL, f"{G1}=-1"),
    "borrowed-count-5e7": (BORROWED, f"{G2}=50000000"),
    "type-with-escapes": (ORIGINAL, "nvidia.com/mig-1g.5gb\x1b[2J=1"),
    "json-cut": (RESOURCES, "{"),
    "json-deep": (RESOURCES, "[" * 5000),
    "json-huge": (RESOURCES, json.dumps({"containers/main": {"limits": {G1: "1"}}, "pad": "x" * 200_000})),
    "json-not-a-record": (RESOURCES, '{"containers/main": "<script>"}'),
    "chain-escape": ("migchain.io/chain", "e2e-eager\x1b]0;pwned\x07"),
    "uid-newlines": ("migchain.io/replaced-uid", "a\nb"),
}


def pod(
    name: str, requests: dict[str, int], node_name: str = "", *, created: str = "2026-11-25T10:00:00Z"
) -> dict[str, Any]:
    """tests/unit/objects.py's pod, Running when bound, Pending otherwise, with its kind (Ledger.of_objects)."""
    phase = "Running" if node_name else "Pending"
    return {"kind": "Pod", **objects.pod(name, requests, node_name, phase=phase, created=created)}


def node(name: str, slices: dict[str, int], product: str = EAGER_GPU) -> dict[str, Any]:
    labels = {"nvidia.com/gpu.product": product, "nvidia.com/mig.config.state": "success"}
    allocatable = {"cpu": "64", **{resource: str(count) for resource, count in slices.items()}}
    return {"kind": "Node", "metadata": {"name": name, "labels": labels}, "status": {"allocatable": allocatable}}


def borrower(
    name: str, free: dict[str, int], node_name: str = "n0", *, created: str = "2026-11-25T10:05:00Z"
) -> dict[str, Any]:
    """A bare 1g.5gb pod as the real borrow planner replaces it on `node_name` with `free` slices (eager chain)."""
    original = pod(name, {G1: 1})
    verdict = place(pod_request(original), NodeState(node_name, EAGER_GPU, "success", free), node_name, RULES)
    assert isinstance(verdict, Placement) and verdict.borrows
    replacement: dict[str, Any] = copy.deepcopy(dict(plan_borrow(original, verdict, LOAN_KEY).replacement))
    replacement["metadata"] |= {"uid": f"uid-{name}-borrower", "creationTimestamp": created}
    replacement["status"] = {"phase": "Running"}
    return replacement


def edited(obj: dict[str, Any], annotation: str, value: str) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"]["annotations"][annotation] = value
    return obj


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# -- the pure core: borrowers_of and plan_returns ------------------------------


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_an_unreadable_loan_makes_its_pod_no_borrower_and_the_genuine_one_is_still_returned(case):
    """Finding 3: "²" passed str.isdigit and int() raised, ending every round; huge counts were taken as read."""
    annotation, value = UNREADABLE[case]
    # The hostile pod is the older loan: a tie on steps would pick it first.
    hostile = edited(borrower("hostile", {G2: 2}, created="2026-11-25T10:01:00Z"), annotation, value)
    genuine = borrower("genuine", {G2: 2})
    ledger = Ledger.of_objects([node("n0", {G1: 1, G2: 2}), hostile, genuine])
    records = list(ledger.pods())
    borrowers = borrowers_of(records, RULES)
    assert [b.key for b in borrowers] == ["ml/genuine"]
    [restore] = plan_returns(ledger.snapshot(), borrowers, pending_requests(records), RULES)
    assert (restore.borrower.key, restore.target) == ("ml/genuine", "n0")


@pytest.mark.parametrize("cap", ["²", "٣", "9" * 40, "-1", " 1e3", "\x1b[2J"])
def test_a_restart_cap_that_is_no_ascii_count_caps_nothing_and_raises_nothing(cap):
    capped = edited(borrower("capped", {G2: 1}), "migchain.io/max-restarts", cap)
    [found] = borrowers_of([pod_record(capped)], RULES)
    assert found.held_back == ""


def test_a_loan_must_match_what_its_pod_holds():
    """Finding 3: "the pod needs no MIG request and can sit on any node"; a forged loan on it is no loan."""
    genuine = borrower("genuine", {G2: 1})
    no_mig = copy.deepcopy(genuine)
    no_mig["metadata"] |= {"name": "no-mig", "uid": "uid-no-mig"}
    no_mig["spec"]["containers"][0]["resources"] = {}
    other = copy.deepcopy(genuine)
    other["metadata"] |= {"name": "other", "uid": "uid-other"}
    other["spec"]["containers"][0]["resources"] = {"limits": {G3: "1"}}  # holds a 3g.20gb, says 2g.10gb
    records = [pod_record(p) for p in (no_mig, other, genuine)]
    assert [b.key for b in borrowers_of(records, RULES)] == ["ml/genuine"]


def test_a_forged_loan_cannot_claim_more_steps_than_its_chain_allows():
    """Finding 3: a forged loan with huge `steps` was chosen first for every freed slice."""
    genuine = borrower("genuine", {G3: 1})  # 1g.5gb -> 3g.20gb: 2 steps up e2e-eager
    forged = edited(borrower("forged", {G2: 1}), STEPS, "60")  # 1g.5gb -> 2g.10gb is 1 step, whatever it says
    ledger = Ledger.of_objects([node("n0", {G1: 1, G2: 1, G3: 1}), forged, genuine])
    borrowers = borrowers_of(list(ledger.pods()), RULES)
    assert {b.key: b.loan.steps for b in borrowers} == {"ml/genuine": 2, "ml/forged": 1}
    [restore] = plan_returns(ledger.snapshot(), borrowers, [], RULES)
    assert restore.borrower.key == "ml/genuine"


def test_a_loan_between_types_no_chain_links_counts_one_step_a_slice():
    odd = "nvidia.com/mig-7g.80gb"  # on no loaded chain, and the loan's chain is gone
    loan = {ORIGINAL: f"{G1}=2", BORROWED: f"{odd}=2", "migchain.io/chain": "gone", STEPS: "100"}
    request = PodRequest("ml", "odd", "uid-odd", ((odd, 2),))
    record = PodRecord(request, "n0", False, "old", migchain={**loan, "migchain.io/replaced-uid": "old"})
    [found] = borrowers_of([record], RULES)
    assert found.loan.steps == 2


# -- the returner round ---------------------------------------------------------


class Leading:
    def leading(self) -> bool:
        return True


class FakeApi:
    """Pods read from `objects`; events recorded."""

    def __init__(self, objects: list[dict[str, Any]]) -> None:
        self.pods = {f"/api/v1/namespaces/ml/pods/{o['metadata']['name']}": o for o in objects if o["kind"] == "Pod"}
        self.events: list[dict[str, Any]] = []

    def get(self, resource: str, **_: Any) -> dict[str, Any]:
        if resource not in self.pods:
            raise ApiError(404, "NotFound", resource)
        return self.pods[resource]

    def create(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        self.events.append(body)
        return body


class FakeExecutor:
    """Restores recorded by pod name; those in `budgets` refused as a PodDisruptionBudget would."""

    def __init__(self, api: FakeApi, budgets: tuple[str, ...] = ()) -> None:
        self.api = api
        self.budgets = budgets
        self.restores: list[str] = []

    loan_key = LOAN_KEY

    def journal(self, kind: str, rejected: Any = None) -> list[Any]:
        return []

    def restore(self, borrower: dict[str, Any], restored: dict[str, Any], owned: bool) -> str:
        name = borrower["metadata"]["name"]
        self.restores.append(name)
        if name in self.budgets:
            raise EvictionBlocked("Cannot evict pod as it would violate the pod's disruption budget.")
        return "evicted and recreated"


def returner_on(
    objects: list[dict[str, Any]], budgets: tuple[str, ...] = (), key: bytes | None = LOAN_KEY
) -> tuple[Returner, FakeExecutor]:
    """The real returner on the real cache, its loan guard keyed with `key` (None: records taken as written,
    as an admin's command without the key does)."""
    api = FakeApi(objects)
    executor = FakeExecutor(api, budgets)
    metrics = ReturnerMetrics()
    cache = ClusterCache(
        cast(KubeApi, api), SnapshotStore(), loans=LoanGuard(key, metrics.unreadable_loans, reports=True)
    )
    cache._list_nodes([o for o in objects if o["kind"] == "Node"])
    cache._list_pods([o for o in objects if o["kind"] == "Pod"])
    returner = Returner(
        cache,
        RulesInForce.fixed(RULES),
        cast(Executor, executor),
        EventRecorder(cast(KubeApi, api)),
        cast(LeaderElection, Leading()),
        metrics=metrics,
    )
    return returner, executor


def test_a_borrower_a_pdb_protects_lets_the_next_one_return_in_the_same_round():
    """Finding 3: a forged loan chosen first and protected by a PDB blocked the genuine return forever."""
    # Both look genuine and agree with what they hold; the forged one is the youngest loan, so it goes first.
    forged = borrower("forged", {G3: 1}, created="2026-11-25T10:09:00Z")
    genuine = borrower("genuine", {G2: 1})
    returner, executor = returner_on([node("n0", {G1: 1, G2: 1, G3: 1}), forged, genuine], budgets=("forged",))
    returner.round()
    assert executor.restores == ["forged", "genuine"]
    returner.round()  # the forged one waits out its PDB pause; the genuine one's slice is claimed
    assert executor.restores == ["forged", "genuine"]


@pytest.mark.parametrize("key", [LOAN_KEY, None], ids=["signed", "taken-as-written"])
@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_a_round_survives_any_unreadable_loan_and_reports_its_pod_once(case, key, caplog):
    """Finding 3 and 9: the round goes on, the genuine borrower returns, the hostile pod gets one Event.

    With migchain's key the edit breaks the signature (forged); taken as
    written, the record is read and found unreadable: either way that pod alone
    pays."""
    annotation, value = UNREADABLE[case]
    hostile = edited(borrower("hostile", {G2: 2}, created="2026-11-25T10:01:00Z"), annotation, value)
    genuine = borrower("genuine", {G2: 2})
    returner, executor = returner_on([node("n0", {G1: 1, G2: 2}), hostile, genuine], key=key)
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            returner.round()
    assert executor.restores == ["genuine"]
    reports = [e for e in executor.api.events if e["reason"] == "LoanRejected"]
    assert [e["involvedObject"]["name"] for e in reports] == ["hostile"]
    reason = FORGED if key else UNREADABLE_LOAN
    assert sample(returner.metrics.registry, "migchain_unreadable_loans_total", reason=reason) == 1
    if key is None:
        assert annotation in reports[0]["message"]  # names what cannot be read
    shown = [reports[0]["message"], *(r.getMessage() for r in caplog.records)]
    for text in shown:
        assert text.isprintable() and len(text) < 400, text
        assert "x" * 100 not in text and "[[[[[[[[[[" * 10 not in text


# -- metrics -------------------------------------------------------------------

HOSTILE_COUNTS = ["50000000", "1000000000000", "²", "-1", "99999999999999999999999999"]


@pytest.mark.parametrize("value", HOSTILE_COUNTS)
def test_a_hostile_count_on_a_running_pod_costs_a_metrics_scrape_nothing(value):
    """Finding 2: a count of 5e7 cost 800 MiB and 6 s holding the GIL; 1e12 raised MemoryError."""
    hostile = edited(edited(borrower("hostile", {G2: 1}), ORIGINAL, f"{G1}={value}"), BORROWED, f"{G2}={value}")
    genuine = borrower("genuine", {G2: 1}, "n1")
    ledger = Ledger.of_objects([node("n0", {G1: 1, G2: 1}), node("n1", {G1: 1, G2: 1}), hostile, genuine])
    metrics = Metrics(CollectorRegistry())
    metrics.watch_cluster(lambda: (ledger.snapshot(), list(ledger.pods())))
    scrape = health_routes(SnapshotStore(ledger.snapshot()), RulesInForce.fixed(RULES), metrics.registry)["/metrics"]
    tracemalloc.start()
    answer = scrape()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert answer.status == 200
    assert peak < 4 * 1024 * 1024, peak
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.body.decode())
        for s in family.samples
    }
    assert samples[("migchain_loans", (("granted", "2g.10gb"), ("requested", "1g.5gb")))] == 1  # the genuine one


def test_loan_pairs_and_the_return_counter_never_expand_counts_into_lists():
    """Finding 2: `loan_pairs` built a list element per slice; count_return and `migchain status` did the same."""
    huge = Loan(original=((G1, 10**12),), borrowed=((G2, 10**12),), chains=("e2e-eager",), steps=1, replaced_uid="u")
    assert loan_pairs(huge) == ((G1, G2, 10**12),)  # a list of 10^12 elements would raise MemoryError
    metrics = ReturnerMetrics()
    metrics.count_return(huge, "returned")
    assert sample(metrics.registry, "migchain_returns_total", requested="1g.5gb", granted="2g.10gb", outcome="returned")


@pytest.mark.parametrize("key", [LOAN_KEY, None], ids=["signed", "taken-as-written"])
def test_migchain_status_names_the_pods_whose_loan_record_is_not_believed_and_counts_no_loan_for_them(key):
    hostile = edited(edited(borrower("hostile", {G2: 1}), ORIGINAL, f"{G1}=50000000"), BORROWED, f"{G2}=50000000")
    genuine = borrower("genuine", {G2: 1}, "n1")
    nodes = [node("n0", {G1: 1, G2: 1}), node("n1", {G1: 1, G2: 1})]
    status, skipped = status_of_objects(nodes, [hostile, genuine], key)
    assert skipped == 0 and [row.pod for row in status.loans] == ["genuine"]
    assert status.totals()[G2].borrowed == 1
    text = status_text(status, datetime.datetime(2026, 11, 25, 11, tzinfo=datetime.UTC))
    assert "1 pod(s) whose loan record is not believed (forged, unsigned or unreadable)" in text
    assert text.endswith("not counted as loans: ml/hostile")


# -- /filter answers -------------------------------------------------------------


def filter_answer(nodes: int, hostile: dict[str, Any]) -> bytes:
    limits = dict.fromkeys((G1, G2, G3, G4), 1)
    fleet = [NodeState(f"gpu-{i:05d}", A100, "success", limits, limits) for i in range(nodes)]  # all full
    client = create_app(
        WebSettings(max_body_bytes=1024 * 1024), RulesInForce.fixed(RULES), SnapshotStore(Snapshot.of(fleet))
    ).test_client()
    body = {"Pod": hostile, "NodeNames": [n.name for n in fleet], "Nodes": None}
    response = client.post("/filter", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 200
    answer = response.get_json()
    assert len(answer["FailedNodes"]) + len(answer["FailedAndUnresolvableNodes"]) == nodes
    return response.get_data()


@pytest.mark.parametrize("nodes", [1000, 5000])
def test_a_hostile_borrow_annotation_cannot_amplify_the_filter_answer(nodes):
    """Finding 4: the raw migchain.io/borrow value went into every failed node's reason, once per MIG type:
    a 72 KiB pod made a 235 MiB answer at 1,000 nodes."""
    hostile = pod("hostile", {G1: 1, G2: 1, G3: 1, G4: 1})
    hostile["metadata"]["annotations"] = {"migchain.io/borrow": "\x1b[2J\nno" + "x" * (72 * 1024)}
    answer = filter_answer(nodes, hostile)
    assert len(answer) < 300 * nodes, len(answer) / nodes
    assert b"x" * 100 not in answer and b"\\u001b" not in answer and b"\\n" not in answer


def test_a_pod_asking_for_many_made_up_types_cannot_amplify_the_filter_answer():
    many = {f"nvidia.com/mig-{i}g.{i}gb-{'y' * 40}": 1 for i in range(1, 90)}
    answer = filter_answer(1000, pod("many", many))
    assert len(answer) < 300 * 1000, len(answer) / 1000


@given(text=st.text(min_size=1, max_size=2000) | st.sampled_from(["²", "\x1b[2J", "\u202e", "\n" * 500]))
def test_any_borrow_annotation_shows_in_reasons_as_a_short_printable_excerpt(text):
    hostile = pod("hostile", {G1: 1, G2: 1})
    hostile["metadata"]["annotations"] = {"migchain.io/borrow": text}
    answer = json.loads(filter_answer(3, hostile))
    for reason in [*answer["FailedNodes"].values(), *answer["FailedAndUnresolvableNodes"].values()]:
        # Cut at MAX_REASON_CHARS characters, a backslash shown doubled, and a note of what was cut.
        assert reason.isprintable() and len(reason) < 2 * MAX_REASON_CHARS + 32, reason


# -- what the caches keep -----------------------------------------------------


def test_the_cache_keeps_only_known_migchain_annotations_each_capped():
    """Finding 7: up to 256 KiB of migchain.io/* annotations per pod were kept in both caches."""
    loaded = borrower("loaded", {G2: 1})
    annotations = loaded["metadata"]["annotations"]
    annotations.update({f"migchain.io/pad-{i}": "p" * 4096 for i in range(40)})  # 160 KiB under made-up keys
    annotations[RESOURCES] = json.dumps({"containers/main": {"limits": {G1: "1"}}, "pad": "x" * 90_000})
    record = pod_record(loaded)
    assert not any(key.startswith("migchain.io/pad-") for key in record.migchain)
    assert sum(len(key) + len(value) for key, value in record.migchain.items()) < 16 * 1024
    assert borrowers_of([record], RULES) == []  # the over-long record is unreadable, not kept whole


# -- what a human is shown ------------------------------------------------------

PAYLOAD = "\x1b]0;pwned\x07\x1b[2J\nFAKE: line\r\u202e" + "A" * 10_000


def test_explain_shows_pod_written_text_only_as_a_short_escaped_excerpt():
    """Finding 9: `migchain explain` printed raw annotation values, newlines and terminal escapes included."""
    pinned = borrower("pinned", {G2: 1})
    pinned["metadata"]["annotations"] |= {
        "migchain.io/return": PAYLOAD,
        "migchain.io/max-restarts": PAYLOAD,
        "migchain.io/borrow": PAYLOAD,
    }
    ledger = Ledger.of_objects([node("n0", {G1: 1, G2: 1}), pinned])
    records = list(ledger.pods())
    [target] = records
    e = explain(target, ledger.snapshot(), RULES, candidate_nodes(target.request, ledger.snapshot()), records)
    text = explain_text(e)
    document = json.dumps(explain_document(e), ensure_ascii=False)
    for shown in (text, document):
        assert "\x1b" not in shown and "\r" not in shown and "\u202e" not in shown and "A" * 100 not in shown
    assert not any(line.startswith("FAKE") for line in text.splitlines())
    assert len(text) < 4000


# -- fuzz: any annotations on a running pod --------------------------------------

KEYS = [
    ORIGINAL,
    BORROWED,
    STEPS,
    RESOURCES,
    "migchain.io/chain",
    "migchain.io/replaced-uid",
    "migchain.io/restarts",
    "migchain.io/max-restarts",
    "migchain.io/return",
    "migchain.io/borrow",
]
VALUES = (
    st.sampled_from(
        ["²", "٣", "-1", "1e3", "{", "[" * 3000, f"{G1}=50000000", f"{G1}=²", f"{G2}=1", f"{G1}=1", "1", "2", "60", ""]
    )
    | st.text(max_size=40)
    | st.from_regex(r"(nvidia\.com/mig-[0-9a-z.]{1,8}=[0-9²٣-]{1,14},?){1,3}", fullmatch=True)
)


@given(edits=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5))
def test_any_edit_of_a_running_borrowers_annotations_never_aborts_a_round(edits):
    hostile = borrower("hostile", {G3: 1}, created="2026-11-25T10:01:00Z")
    hostile["metadata"]["annotations"].update(edits)
    genuine = borrower("genuine", {G2: 1})
    returner, executor = returner_on([node("n0", {G1: 1, G2: 1, G3: 1}), hostile, genuine], budgets=("hostile",))
    returner.round()
    assert "genuine" in executor.restores  # returned in the first round, whatever the other pod carries
    for event in executor.api.events:
        assert event["message"].isprintable() and len(event["message"]) < 400
