"""Borrowing copies a kubelet refused at admission (issue 19): how the core reads them and what it makes of them."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extender.core.cluster import pod_record
from extender.core.loan import vouched
from extender.core.returns import MAX_RESTARTS_TO_BORROW_AGAIN, turned_away_borrowers
from extender.ledger import Ledger
from tests.unit.objects import G1, G2, LOAN_KEY, RULES, borrower, node, pod

DEVICES_UNAVAILABLE = (
    "Allocate failed due to requested number of devices unavailable for nvidia.com/mig-2g.10gb. "
    "Requested: 1, Available: 0, which is unexpected"
)


def refused(pod_object: dict[str, Any], reason: str = "UnexpectedAdmissionError") -> dict[str, Any]:
    """The pod as its kubelet leaves it when it refuses it at admission."""
    return pod_object | {"status": {"phase": "Failed", "reason": reason, "message": DEVICES_UNAVAILABLE}}


def turned_away_copy(name: str = "notebook", *, owned: bool = False, restarts: int = 0) -> dict[str, Any]:
    copy = borrower(name, {G1: 1}, "n1", {G2: 1}, restarts=restarts)
    if owned:
        copy["metadata"]["ownerReferences"] = [
            {"kind": "ReplicaSet", "name": "rs", "uid": "rs-uid", "controller": True}
        ]
    return refused(copy)


def record_of(pod_object: dict[str, Any]):
    return vouched(pod_record(pod_object), LOAN_KEY)[0]


@pytest.mark.parametrize("reason", ["UnexpectedAdmissionError", "OutOfnvidia.com/mig-2g.10gb"])
def test_a_pod_its_kubelet_refused_for_want_of_mig_slices_reads_as_turned_away(reason):
    assert pod_record(refused(pod("p", {G1: 1}, "n1"), reason)).turned_away == reason


@pytest.mark.parametrize(
    "status",
    [
        {"phase": "Failed", "reason": "OutOfcpu"},  # not for want of MIG slices: not migchain's doing
        {"phase": "Failed", "reason": "Evicted"},  # it ran
        {"phase": "Failed", "reason": "DeadlineExceeded"},
        {"phase": "Failed"},
        {"phase": "Running", "reason": "UnexpectedAdmissionError"},
        {"phase": "Failed", "reason": ["UnexpectedAdmissionError"]},
        {"phase": "Failed", "reason": "OutOfnvidia.com/mig-" + "x" * 5000},
    ],
)
def test_any_other_pod_is_not_turned_away(status):
    assert pod_record(pod("p", {G1: 1}, "n1") | {"status": status}).turned_away == ""


@given(phase=st.sampled_from(["Pending", "Running", "Succeeded", "Failed", "Unknown"]), reason=st.text(max_size=300))
def test_any_status_reads_without_error_and_turned_away_is_only_a_known_kubelet_reason(phase, reason):
    turned_away = pod_record(pod("p", {G1: 1}, "n1") | {"status": {"phase": phase, "reason": reason}}).turned_away
    assert turned_away in ("", reason)
    if turned_away:
        assert phase == "Failed"
        assert reason == "UnexpectedAdmissionError" or reason.startswith("OutOfnvidia.com/mig-")


def test_a_turned_away_bare_borrower_is_brought_back_and_may_borrow_again():
    [found] = turned_away_borrowers([record_of(turned_away_copy())], RULES)
    assert (found.borrower.key, found.owned, found.borrow_again) == ("ml/notebook", False, True)
    assert found.borrower.loan.original == ((G1, 1),)


def test_an_owned_turned_away_borrower_is_its_controllers():
    [found] = turned_away_borrowers([record_of(turned_away_copy(owned=True))], RULES)
    assert found.owned


def test_a_borrower_turned_away_after_its_restarts_comes_back_not_to_borrow_again():
    [spent] = turned_away_borrowers([record_of(turned_away_copy(restarts=MAX_RESTARTS_TO_BORROW_AGAIN))], RULES)
    assert (spent.borrower.restarts, spent.borrow_again) == (MAX_RESTARTS_TO_BORROW_AGAIN, False)
    [again] = turned_away_borrowers([record_of(turned_away_copy(restarts=MAX_RESTARTS_TO_BORROW_AGAIN - 1))], RULES)
    assert again.borrow_again


def test_only_borrowers_and_only_refused_ones_are_turned_away():
    plain = refused(pod("plain", {G1: 1}, "n1"))  # refused, but no borrower: not migchain's to bring back
    running = borrower("runs", {G1: 1}, "n1", {G2: 1})
    unsigned = turned_away_copy("unsigned")
    del unsigned["metadata"]["annotations"]["migchain.io/loan-signature"]
    going = turned_away_copy("going")
    going["metadata"]["deletionTimestamp"] = "2026-11-30T10:00:00Z"
    records = [record_of(item) for item in (plain, running, unsigned, going)]
    assert turned_away_borrowers(records, RULES) == []


def test_a_turned_away_borrower_holds_no_slices():
    ledger, unreadable = Ledger.of_readable([node("n1", {G1: 1, G2: 1})], [turned_away_copy()], LOAN_KEY)
    assert unreadable == 0
    assert ledger.snapshot().nodes["n1"].free[G2] == 1


def test_turned_away_borrowers_are_listed_oldest_first_whatever_order_the_cache_keeps():
    copies = [turned_away_copy(f"p{index}") for index in range(4)]
    for index, copy in enumerate(copies):
        copy["metadata"]["creationTimestamp"] = f"2026-11-30T10:00:0{9 - index}Z"
    records = [record_of(copy) for copy in copies]
    keys = [found.borrower.key for found in turned_away_borrowers(records, RULES)]
    assert keys == ["ml/p3", "ml/p2", "ml/p1", "ml/p0"]
    assert [found.borrower.key for found in turned_away_borrowers(reversed(records), RULES)] == keys
