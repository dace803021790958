"""Journal entries are believed only when migchain signed them and they name one pod; a put-back original is signed.

Issue 18: journal ConfigMaps were trusted whole, so anyone who could create a
ConfigMap in migchain-system could make the extender create any pod in any
namespace. And every pod migchain creates must carry a record the API
server's admission policy recognises, the original put back after a failed
borrow included.
"""

from __future__ import annotations

import copy
import json
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st

from extender.core.cluster import REPLACED_UID_ANNOTATION
from extender.core.decide import Grant, Placement
from extender.core.journal import BORROW, RETURN, entry_name, entry_signature, read_entry
from extender.core.loan import (
    LOAN_ANNOTATIONS,
    LOAN_SIGNATURE_ANNOTATION,
    RESTARTS_ANNOTATION,
    plan_borrow,
    put_back,
    restored_pod,
    signed_by_migchain,
)
from extender.kube.api import ApiError, KubeApi
from extender.kube.executor import JOURNAL_LABEL, Executor
from tests.unit.objects import LOAN_KEY

G1, G2 = "nvidia.com/mig-1g.5gb", "nvidia.com/mig-2g.10gb"
NAMESPACE = "migchain-system"


def bare_pod(name: str = "train", uid: str = "uid-1", annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "ml",
            "uid": uid,
            "resourceVersion": "7",
            "annotations": dict(annotations or {"team": "vision"}),
        },
        "spec": {"containers": [{"name": "main", "image": "cuda", "resources": {"limits": {G1: "1"}}}]},
        "status": {"phase": "Pending"},
    }


def borrow_plan(pod: dict[str, Any]) -> Any:
    return plan_borrow(pod, Placement("gpu-1", (Grant(G1, G2, 1, 2, "a100"),), 2), LOAN_KEY)


class JournalApi:
    """The API server as the journal sees it: ConfigMaps in migchain-system, pods created and looked up."""

    def __init__(self) -> None:
        self.configmaps: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}  # path -> pod
        self.created: list[dict[str, Any]] = []

    def create(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        if resource.endswith("/configmaps"):
            stored = copy.deepcopy(body)
            stored["metadata"].update(namespace=NAMESPACE, uid=f"cm-{len(self.configmaps)}")
            self.configmaps[body["metadata"]["name"]] = stored
            return stored
        self.created.append(copy.deepcopy(body))
        return body

    def get(self, resource: str, **_: Any) -> dict[str, Any]:
        if resource not in self.pods:
            raise ApiError(404, "NotFound", resource)
        return self.pods[resource]

    def delete(self, resource: str, options: Any = None) -> dict[str, Any]:
        self.configmaps.pop(resource.rsplit("/", 1)[-1], None)
        return {}

    def list_all(self, resource: str, **query: Any) -> tuple[list[dict[str, Any]], str]:
        kind = query["labelSelector"].split("=", 1)[1]
        return [c for c in self.configmaps.values() if c["metadata"]["labels"][JOURNAL_LABEL] == kind], "1"


def executor(api: JournalApi) -> Executor:
    return Executor(cast(KubeApi, api), NAMESPACE, LOAN_KEY)


def read_journal(api: JournalApi, kind: str = BORROW) -> tuple[list[Any], list[tuple[str, str]]]:
    rejected: list[tuple[str, str]] = []
    entries = executor(api).journal(kind, rejected=lambda entry, why: rejected.append((entry["metadata"]["name"], why)))
    return entries, rejected


def test_an_entry_migchain_wrote_is_read_back_as_written():
    api = JournalApi()
    plan = borrow_plan(bare_pod())
    executor(api)._write_journal(plan)
    entries, rejected = read_journal(api)
    assert rejected == []
    assert entries == [(json.loads(json.dumps(plan.original)), json.loads(json.dumps(plan.replacement)))]


def test_a_forged_entry_is_never_acted_on_and_is_reported():
    """Before: any ConfigMap with the journal label was finished, i.e. its pod created."""
    api = JournalApi()
    planted = bare_pod("planted", "uid-9")
    planted["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    api.create(
        f"/api/v1/namespaces/{NAMESPACE}/configmaps",
        {
            "metadata": {"name": entry_name("uid-9"), "labels": {JOURNAL_LABEL: BORROW}},
            "data": {"original": json.dumps(planted), "replacement": json.dumps(planted), "written": "now"},
        },
    )
    entries, rejected = read_journal(api)
    assert entries == []
    assert [(name, "signature" in why) for name, why in rejected] == [(entry_name("uid-9"), True)]
    # And recovery, reading that journal, creates nothing.
    for original, replacement in entries:
        executor(api).finish(original, replacement, lambda: True)
    assert api.created == []


def test_an_entry_edited_after_migchain_wrote_it_is_not_believed():
    api = JournalApi()
    executor(api)._write_journal(borrow_plan(bare_pod()))
    [entry] = api.configmaps.values()
    edited = json.loads(entry["data"]["replacement"])
    edited["spec"]["containers"][0]["image"] = "evil"
    entry["data"]["replacement"] = json.dumps(edited)
    entries, rejected = read_journal(api)
    assert entries == [] and len(rejected) == 1


def test_a_genuine_entry_copied_under_another_name_or_kind_is_not_believed():
    api = JournalApi()
    executor(api)._write_journal(borrow_plan(bare_pod()))
    [entry] = api.configmaps.values()
    copied = copy.deepcopy(entry)
    copied["metadata"]["name"] = entry_name("uid-2")
    del api.configmaps[entry["metadata"]["name"]]
    api.configmaps[copied["metadata"]["name"]] = copied
    assert read_journal(api)[0] == []
    copied["metadata"]["labels"][JOURNAL_LABEL] = RETURN  # a borrow entry read as a return
    assert read_journal(api, RETURN)[0] == []


def signed(name: str, kind: str, before: Any, after: Any) -> dict[str, str]:
    """An entry as migchain would sign it: what the checks of the pods themselves must catch (a bug, a key leak)."""
    data = {"original": json.dumps(before), "replacement": json.dumps(after), "written": "now"}
    return {**data, "signature": entry_signature(LOAN_KEY, name, kind, data)}


def test_a_signed_entry_must_still_name_one_pod():
    pod = bare_pod()
    replacement = borrow_plan(pod).replacement
    assert isinstance(
        read_entry(LOAN_KEY, entry_name("uid-1"), BORROW, signed(entry_name("uid-1"), BORROW, pod, replacement)), tuple
    )
    elsewhere = copy.deepcopy(replacement)
    elsewhere["metadata"]["namespace"] = "kube-system"
    renamed = copy.deepcopy(replacement)
    renamed["metadata"]["name"] = "other"
    unsigned = copy.deepcopy(replacement)
    unsigned["metadata"]["annotations"][LOAN_SIGNATURE_ANNOTATION] = "v1:" + "0" * 64
    other_uid = copy.deepcopy(replacement)
    other_uid["metadata"]["annotations"][REPLACED_UID_ANNOTATION] = "uid-2"
    cases = {
        "another namespace": (entry_name("uid-1"), pod, elsewhere, "namespace"),
        "another name": (entry_name("uid-1"), pod, renamed, "name"),
        "an unsigned replacement": (entry_name("uid-1"), pod, unsigned, "loan"),
        "a loan of another pod": (entry_name("uid-1"), pod, other_uid, "loan"),
        "not named after its UID": (entry_name("uid-2"), pod, replacement, "UID"),
    }
    for case, (name, before, after, word) in cases.items():
        why = read_entry(LOAN_KEY, name, BORROW, signed(name, BORROW, before, after))
        assert isinstance(why, str) and word in why, (case, why)
    # A return: the borrower and its restored pod, both signed by migchain.
    borrower = copy.deepcopy(replacement)
    borrower["metadata"]["uid"] = "uid-5"
    restored = restored_pod(borrower, 1, LOAN_KEY)
    name = entry_name("uid-5")
    assert isinstance(read_entry(LOAN_KEY, name, RETURN, signed(name, RETURN, borrower, restored)), tuple)
    why = read_entry(LOAN_KEY, name, RETURN, signed(name, RETURN, borrower, bare_pod("train", "uid-5")))
    assert isinstance(why, str) and "signed" in why


@given(
    field=st.sampled_from(("original", "replacement", "written", "signature")),
    value=st.one_of(st.text(max_size=40), st.none(), st.integers()),
)
def test_any_change_to_any_field_of_an_entry_makes_it_not_believed(field, value):
    data = signed(entry_name("uid-1"), BORROW, bare_pod(), borrow_plan(bare_pod()).replacement)
    if data[field] == value:
        return
    changed: dict[str, Any] = {**data, field: value}
    if value is None:
        del changed[field]
    assert isinstance(read_entry(LOAN_KEY, entry_name("uid-1"), BORROW, changed), str)


# -- the original put back ---------------------------------------------------------------------------------------


def test_a_borrow_that_cannot_be_finished_puts_the_original_back_with_a_signed_restore_record():
    """Before: the original was created as it was, with no record the admission policy admits from migchain."""
    api = JournalApi()
    pod = bare_pod()
    plan = borrow_plan(pod)
    outcome = executor(api).finish(plan.original, plan.replacement, lambda: False)  # its node is full now
    assert outcome.startswith("its node is full now")
    [created] = api.created
    annotations = created["metadata"]["annotations"]
    assert annotations[RESTARTS_ANNOTATION] == "0"
    assert signed_by_migchain(created, LOAN_KEY)
    assert not set(LOAN_ANNOTATIONS) & set(annotations)
    assert "nodeName" not in created["spec"]
    assert created["spec"] == {k: v for k, v in pod["spec"].items() if k != "nodeName"}
    assert annotations["team"] == "vision"


def test_put_back_keeps_only_the_returns_migchain_signed_and_drops_a_forged_loan():
    once_returned = restored_pod(borrow_plan(bare_pod()).replacement, 2, LOAN_KEY)
    once_returned["metadata"]["uid"] = "uid-3"
    assert put_back(once_returned, LOAN_KEY)["metadata"]["annotations"][RESTARTS_ANNOTATION] == "2"
    forged = bare_pod(annotations={RESTARTS_ANNOTATION: "0", REPLACED_UID_ANNOTATION: "x", "migchain.io/steps": "9"})
    forged["metadata"]["annotations"][RESTARTS_ANNOTATION] = "7"
    back = put_back(forged, LOAN_KEY)
    assert back["metadata"]["annotations"][RESTARTS_ANNOTATION] == "0"
    assert not set(LOAN_ANNOTATIONS) & set(back["metadata"]["annotations"])
    assert signed_by_migchain(back, LOAN_KEY)
