"""Signed loans: migchain's record verifies; any edit, copy or forgery by a pod's owner does not (issue 17, #5)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extender.core.cluster import PodRecord, PodRequest, pod_record
from extender.core.loan import (
    FORGED,
    LOAN_ANNOTATIONS,
    LOAN_SIGNATURE_ANNOTATION,
    RESTARTS_ANNOTATION,
    SIGNED_ANNOTATIONS,
    UNREADABLE,
    UNSIGNED,
    loan_of,
    loan_signature,
    plan_borrow,
    restored_pod,
    signed_by_migchain,
    vouched,
)
from extender.ledger import Ledger
from tests.unit.test_loan import G1, G2, any_placements, any_pods, borrow_on, pod_json

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def running(pod: Mapping[str, Any], uid: str = "uid-new", node: str = "gpu-1") -> dict[str, Any]:
    """A pod object as the API server lists it once created and bound."""
    listed: dict[str, Any] = copy.deepcopy(dict(pod))
    listed["metadata"] |= {"uid": uid, "resourceVersion": "900", "creationTimestamp": "2026-11-25T00:00:01Z"}
    listed["spec"]["nodeName"] = node
    listed["status"] = {"phase": "Running"}
    return listed


def a_borrower(owned: bool = False, key: bytes = KEY) -> dict[str, Any]:
    pod = pod_json([{G1: "1"}], owned=owned)
    return running(plan_borrow(pod, borrow_on(pod, {G2: 1}), key).replacement)


def test_a_loan_migchain_made_verifies_and_is_kept_whole():
    for owned in (False, True):
        record = pod_record(a_borrower(owned))
        assert vouched(record, KEY) == (record, "")
        loan = loan_of(record.migchain)
        assert loan is not None and loan.replaced_uid == "0d4c9b1e"
        assert record.replaces == "0d4c9b1e"


@given(data=st.data())
def test_any_pod_any_grant_the_loan_verifies_and_the_signature_is_deterministic(data):
    pod = data.draw(any_pods())
    placement = data.draw(any_placements(pod))
    replacement = plan_borrow(pod, placement, KEY).replacement
    again = plan_borrow(copy.deepcopy(pod), placement, KEY).replacement
    assert replacement["metadata"]["annotations"] == again["metadata"]["annotations"]
    record = pod_record(running(replacement))
    assert vouched(record, KEY) == (record, "")
    assert vouched(record, OTHER_KEY)[1] == FORGED  # another key signs another record


# What a pod's owner may do to one loan annotation: rewrite it, drop it, or add one migchain did not write.
edits = st.one_of(
    st.tuples(st.just("set"), st.sampled_from((*SIGNED_ANNOTATIONS, LOAN_SIGNATURE_ANNOTATION)), st.text(max_size=12)),
    st.tuples(st.just("drop"), st.sampled_from(LOAN_ANNOTATIONS), st.just("")),
)


@given(edit=edits, owned=st.booleans())
def test_any_edit_of_any_loan_field_breaks_the_loan(edit, owned):
    how, key, value = edit
    borrower = a_borrower(owned)
    annotations = borrower["metadata"]["annotations"]
    if how == "set":
        if annotations.get(key) == value:
            return  # not an edit
        annotations[key] = value
    else:
        del annotations[key]
    record, problem = vouched(pod_record(borrower), KEY)
    assert problem == FORGED
    assert record.replaces == ""
    assert loan_of(record.migchain) is None
    assert not set(record.migchain) & {*SIGNED_ANNOTATIONS, LOAN_SIGNATURE_ANNOTATION}


def test_a_loan_without_its_signature_is_unsigned_and_no_loan():
    borrower = a_borrower()
    del borrower["metadata"]["annotations"][LOAN_SIGNATURE_ANNOTATION]  # as loans made before signing
    record, problem = vouched(pod_record(borrower), KEY)
    assert problem == UNSIGNED
    assert (record.replaces, loan_of(record.migchain)) == ("", None)


@pytest.mark.parametrize(
    "move",
    [
        lambda pod: pod["metadata"].update(name="someone-else"),
        lambda pod: pod["metadata"].update(namespace="other-team"),
        # the same record on a pod asking for more (or other) slices than the borrower
        lambda pod: pod["spec"]["containers"][0]["resources"].update(limits={G2: "2"}, requests={G2: "2"}),
        lambda pod: pod["spec"]["containers"][0]["resources"].update(limits={G1: "1"}, requests={G1: "1"}),
    ],
)
def test_a_loan_copied_onto_another_pod_does_not_verify(move):
    borrower = a_borrower()
    move(borrower)
    assert vouched(pod_record(borrower), KEY)[1] == FORGED


def test_annotations_migchain_does_not_sign_leave_the_loan_valid():
    borrower = a_borrower()
    borrower["metadata"]["annotations"] |= {"migchain.io/return": "false", "team": "x", "migchain.io/requeued": "t"}
    borrower["metadata"]["labels"] = {"app": "other"}
    record = pod_record(borrower)
    assert vouched(record, KEY) == (record, "")


def test_a_pod_with_no_loan_is_left_as_it_is():
    record = pod_record(running(pod_json([{G2: "1"}], owned=False)))
    assert vouched(record, KEY) == (record, "")


def test_without_a_key_a_record_is_taken_as_written_if_it_reads_back():
    """The admin's commands when they cannot read the key: they show what the pods say (and warn), as far as
    it can be read (core/untrusted.py)."""
    borrower = a_borrower()
    borrower["metadata"]["annotations"]["migchain.io/steps"] = "60"
    record = pod_record(borrower)
    assert vouched(record, None) == (record, "")
    borrower["metadata"]["annotations"]["migchain.io/steps"] = "²"
    believed, reason = vouched(pod_record(borrower), None)
    assert reason == UNREADABLE and believed.replaces == "" and "migchain.io/steps" not in believed.migchain


def test_restarts_migchain_counted_survive_a_return_and_a_new_borrow_and_a_tenants_count_does_not():
    restored = restored_pod(a_borrower(), 2, KEY)  # a bare pod back, pending, with its original request
    pending = running(restored, uid="uid-back", node="")
    pending["spec"].pop("nodeName")
    record = pod_record(pending)
    assert vouched(record, KEY) == (record, "")
    assert record.migchain[RESTARTS_ANNOTATION] == "2"
    # It borrows again: the count goes with the new loan, signed.
    again = running(plan_borrow(pending, borrow_on(pending, {G2: 1}), KEY).replacement, uid="uid-again")
    assert again["metadata"]["annotations"][RESTARTS_ANNOTATION] == "2"
    assert vouched(pod_record(again), KEY)[1] == ""
    # A count the pod's owner wrote is not migchain's: it is dropped, when read and when the pod borrows.
    pending["metadata"]["annotations"][RESTARTS_ANNOTATION] = "99"
    assert RESTARTS_ANNOTATION not in vouched(pod_record(pending), KEY)[0].migchain
    assert vouched(pod_record(pending), KEY)[1] == ""  # no loan: nothing to report
    replacement = plan_borrow(pending, borrow_on(pending, {G2: 1}), KEY).replacement
    assert RESTARTS_ANNOTATION not in replacement["metadata"]["annotations"]


def test_a_pod_is_migchains_replacement_only_if_its_loan_verifies():
    borrower = a_borrower(owned=True)
    assert signed_by_migchain(borrower, KEY)
    assert not signed_by_migchain(borrower, OTHER_KEY)
    forged = copy.deepcopy(borrower)
    forged["metadata"]["annotations"]["migchain.io/chain"] = "another"
    assert not signed_by_migchain(forged, KEY)
    assert not signed_by_migchain({"metadata": {"name": "x"}, "spec": {"containers": "not a list"}}, KEY)


def test_the_signature_covers_namespace_name_slices_and_every_signed_field():
    annotations = {key: f"value of {key}" for key in SIGNED_ANNOTATIONS}
    base = loan_signature(KEY, "ml", "p", ((G2, 1),), annotations)
    assert base.startswith("v1:") and base == loan_signature(KEY, "ml", "p", ((G2, 1),), dict(annotations))
    others = {
        loan_signature(KEY, "ml2", "p", ((G2, 1),), annotations),
        loan_signature(KEY, "ml", "p2", ((G2, 1),), annotations),
        loan_signature(KEY, "ml", "p", ((G2, 2),), annotations),
        # a field boundary moved: "ml" + "p" is not "m" + "lp"
        loan_signature(KEY, "m", "lp", ((G2, 1),), annotations),
        *(loan_signature(KEY, "ml", "p", ((G2, 1),), {**annotations, key: "x"}) for key in SIGNED_ANNOTATIONS),
        *(
            loan_signature(KEY, "ml", "p", ((G2, 1),), {k: v for k, v in annotations.items() if k != key})
            for key in SIGNED_ANNOTATIONS
        ),
    }
    assert base not in others
    assert len(others) == 4 + 2 * len(SIGNED_ANNOTATIONS)


def test_a_forged_replaced_uid_confirms_no_reservation():
    """Read as the cache reads it, a tenant's bound pod naming another pod's UID confirms nothing (finding 5)."""
    ledger = Ledger()
    ledger.reserve("uid-victim", "gpu-1", ((G1, 1),), 60.0)
    forger = running(pod_json([{G2: "1"}], owned=False), uid="uid-forger")
    forger["metadata"]["annotations"]["migchain.io/replaced-uid"] = "uid-victim"
    record, problem = vouched(pod_record(forger), KEY)
    assert problem == UNSIGNED
    ledger.put_pod(record)
    assert ledger.reservation("uid-victim") is not None


def test_a_record_the_watch_built_by_hand_keeps_its_fields_when_it_verifies():
    request = PodRequest("ml", "p", "uid-p", ((G2, 1),))
    annotations = {
        "migchain.io/original-requests": f"{G1}=1",
        "migchain.io/borrowed-requests": f"{G2}=1",
        "migchain.io/replaced-uid": "old",
    }
    annotations[LOAN_SIGNATURE_ANNOTATION] = loan_signature(KEY, "ml", "p", ((G2, 1),), annotations)
    record = PodRecord(request, "gpu-1", False, "old", migchain=annotations)
    assert vouched(record, KEY) == (record, "")
    assert vouched(dataclasses.replace(record, request=dataclasses.replace(request, mig=((G2, 2),))), KEY)[1] == FORGED
