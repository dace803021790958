"""Bare pods through every answer an API write can get: never only in the journal, never back after their user's delete.

A small API server in memory keeps one namespace's pods and the journal's
ConfigMaps. Each write can be answered as usual, refused for good, refused
for now (503, nothing done), or not answered (done or not). An admission
rule refuses copies, as a quota, PodSecurity or an admission policy would.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
from collections.abc import Callable
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extender.core.cluster import NodeState, pod_request
from extender.core.decide import Placement, place
from extender.core.loan import BorrowPlan, plan_borrow, recreatable, restored_pod
from extender.kube.api import ApiError, KubeApi
from extender.kube.executor import Abandoned, CopyRefused, Executor, FellBack, StillTerminating
from extender.kube.overdue import OverdueJournal
from extender.metrics import JournalGauges
from tests.unit.objects import A100, LOAN_KEY, RULES, pod

G1, G2 = "nvidia.com/mig-1g.5gb", "nvidia.com/mig-2g.10gb"
PODS = "/api/v1/namespaces/ml/pods"
JOURNAL = "/api/v1/namespaces/migchain-system/configmaps"
# What a write gets: done and answered, refused for good, refused for now, done but not answered, neither.
ANSWERS = ("ok", "refused", "unavailable", "lost-answer", "lost-request")

Admission = Callable[[dict[str, Any]], str]  # a pod to create -> why it is refused ("" if admitted)


def admit_all(_: dict[str, Any]) -> str:
    return ""


def refuse_borrowers(pod: dict[str, Any]) -> str:
    return "no borrowers here" if "migchain.io/replaced-uid" in (pod["metadata"].get("annotations") or {}) else ""


def refuse_restored(pod: dict[str, Any]) -> str:
    return "" if "migchain.io/replaced-uid" in (pod["metadata"].get("annotations") or {}) else "restricted"


class MemoryApi:
    def __init__(self, admission: Admission = admit_all) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.configmaps: dict[str, dict[str, Any]] = {}
        self.admission = admission
        self.real_admission_only: Admission = admit_all  # refuses real creates only: the dry run passes
        self.answers: dict[str, list[str]] = {}  # write kind -> the next answers (else "ok")
        self.writes: list[str] = []
        self._uids = 0

    def add_pod(self, pod: dict[str, Any]) -> dict[str, Any]:
        self._uids += 1
        stored = copy.deepcopy(pod)
        stored["metadata"] |= {"uid": f"uid-{self._uids}", "resourceVersion": str(self._uids)}
        self.pods[stored["metadata"]["name"]] = stored
        return copy.deepcopy(stored)

    def _write(self, kind: str, do: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        self.writes.append(kind)
        queue = self.answers.get(kind) or []
        answer = queue.pop(0) if queue else "ok"
        if answer == "refused":
            raise ApiError(403, "Forbidden", f"{kind} refused")
        if answer == "unavailable":
            raise ApiError(503, "ServiceUnavailable", "etcd leader changed")
        if answer == "lost-request":
            raise ApiError(0, "NoAnswer", "connection reset")
        result = do()
        if answer == "lost-answer":
            raise ApiError(0, "NoAnswer", "read timed out")
        return result

    # -- KubeApi --------------------------------------------------------------

    def get(self, resource: str, **_: Any) -> dict[str, Any]:
        name = resource.rsplit("/", 1)[1]
        if name not in self.pods:
            raise ApiError(404, "NotFound", f'pods "{name}" not found')
        return copy.deepcopy(self.pods[name])

    def request(self, method: str, resource: str, body: Any = None, *, query: Any = None, **_: Any) -> dict[str, Any]:
        assert method == "POST" and resource == PODS and query == {"dryRun": "All"}
        why = self.admission(body)
        if why:
            raise ApiError(403, "Forbidden", why)
        if body["metadata"]["name"] in self.pods:
            raise ApiError(409, "AlreadyExists", "already exists")
        return cast(dict[str, Any], copy.deepcopy(body))

    def create(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        if resource == JOURNAL:

            def journal() -> dict[str, Any]:
                stored = copy.deepcopy(body)
                stored["metadata"]["creationTimestamp"] = "2026-11-30T10:00:00Z"
                self.configmaps[body["metadata"]["name"]] = stored
                return stored

            return self._write("journal", journal)
        if resource.endswith("/eviction"):
            name = resource.rsplit("/", 2)[1]

            def evict() -> dict[str, Any]:
                if name not in self.pods:
                    raise ApiError(404, "NotFound", "gone")
                del self.pods[name]  # the kubelet is quick
                return {}

            return self._write("evict", evict)
        assert resource == PODS
        assert "ephemeralContainers" not in body["spec"], "the API server refuses ephemeral containers on create"

        def create() -> dict[str, Any]:
            why = self.admission(body) or self.real_admission_only(body)
            if why:
                raise ApiError(403, "Forbidden", why)
            if body["metadata"]["name"] in self.pods:
                raise ApiError(409, "AlreadyExists", "already exists")
            return self.add_pod(body)

        return self._write("create", create)

    def delete(self, resource: str, options: Any = None) -> dict[str, Any]:
        name = resource.rsplit("/", 1)[1]
        if resource.startswith(JOURNAL):
            self.configmaps.pop(name, None)
            return {}

        def delete() -> dict[str, Any]:
            current = self.pods.get(name)
            if current is None:
                raise ApiError(404, "NotFound", "gone")
            if current["metadata"]["uid"] != options["preconditions"]["uid"]:
                raise ApiError(409, "Conflict", "uid precondition")
            del self.pods[name]
            return {}

        return self._write("delete", delete)

    def list_all(self, resource: str, **query: Any) -> tuple[list[dict[str, Any]], str]:
        assert resource == JOURNAL
        kind = query["labelSelector"].split("=")[1]
        items = [item for item in self.configmaps.values() if item["metadata"]["labels"]["migchain.io/journal"] == kind]
        return copy.deepcopy(items), "1"


def executor(api: MemoryApi) -> Executor:
    return Executor(cast(KubeApi, api), "migchain-system", LOAN_KEY)


def pending(api: MemoryApi) -> BorrowPlan:
    original = api.add_pod(pod("p", {G1: 1}, phase="Pending"))
    verdict = place(pod_request(original), NodeState("n1", A100, "success", {G2: 1}, {}), "n1", RULES)
    assert isinstance(verdict, Placement) and verdict.borrows
    return plan_borrow(original, verdict, LOAN_KEY)


def a_borrower(api: MemoryApi) -> tuple[dict[str, Any], dict[str, Any]]:
    plan = pending(api)
    api.pods.clear()
    borrower = api.add_pod(dict(plan.replacement))
    return borrower, restored_pod(borrower, 1, LOAN_KEY)


def recover(run: Executor, api: MemoryApi) -> None:
    for original, replacement in run.journal("borrow"):
        run.finish(original, replacement, lambda: True)
    for borrower, restored in run.journal("return"):
        run.finish_return(borrower, restored)


# -- item 2: a dry run before anything is deleted, a fallback after a refusal -----


def test_a_borrow_whose_replacement_is_refused_deletes_nothing():
    api = MemoryApi(refuse_borrowers)
    plan = pending(api)
    with pytest.raises(CopyRefused, match="no borrowers here"):
        executor(api).borrow(plan)
    assert api.pods["p"]["metadata"]["uid"] == plan.original_uid
    assert api.writes == [] and api.configmaps == {}


def test_a_replacement_refused_only_for_real_brings_the_original_back_not_to_borrow_again():
    api = MemoryApi()
    api.real_admission_only = refuse_borrowers
    plan = pending(api)
    with pytest.raises(FellBack, match="recreated the original"):
        executor(api).borrow(plan)
    back = api.pods["p"]
    assert back["metadata"]["uid"] != plan.original_uid
    assert back["spec"] == recreatable(plan.original)["spec"]
    assert back["metadata"]["annotations"]["migchain.io/borrow"] == "false"
    assert api.configmaps == {}


def test_a_return_whose_restored_pod_is_refused_evicts_nothing():
    api = MemoryApi(refuse_restored)
    borrower, restored = a_borrower(api)
    with pytest.raises(CopyRefused, match="restricted"):
        executor(api).restore(borrower, restored, owned=False)
    assert api.pods["p"]["metadata"]["uid"] == borrower["metadata"]["uid"]
    assert api.writes == []


def test_a_restored_pod_refused_only_for_real_brings_the_borrower_back_unbound():
    api = MemoryApi()
    api.real_admission_only = refuse_restored
    borrower, restored = a_borrower(api)
    with pytest.raises(FellBack, match="recreated the borrower as it was"):
        executor(api).restore(borrower, restored, owned=False)
    back = api.pods["p"]
    assert back["metadata"]["annotations"] == borrower["metadata"]["annotations"]
    assert back["spec"]["containers"] == borrower["spec"]["containers"]
    assert "nodeName" not in back["spec"]  # its slice may be another pod's by now
    assert api.configmaps == {}


def test_a_copy_drops_what_the_api_server_refuses_or_sets_again_on_create():
    original = pod("p", {G1: 1}, "n1")
    original["metadata"] |= {"resourceVersion": "7", "deletionTimestamp": "2026-11-30T10:00:00Z"}
    original["spec"] |= {
        "ephemeralContainers": [{"name": "debugger", "image": "busybox"}],
        "overhead": {"cpu": "250m"},
        "runtimeClassName": "kata",
    }
    copy_ = recreatable(original)
    assert "status" not in copy_
    assert not {"uid", "resourceVersion", "creationTimestamp", "deletionTimestamp"} & set(copy_["metadata"])
    assert not {"ephemeralContainers", "overhead"} & set(copy_["spec"])
    assert copy_["spec"]["runtimeClassName"] == "kata" and copy_["spec"]["nodeName"] == "n1"
    assert "ephemeralContainers" in original["spec"]  # a copy: the pod read is left as it is


def test_ephemeral_containers_are_not_copied():
    api = MemoryApi()
    borrower, _ = a_borrower(api)
    borrower["spec"]["ephemeralContainers"] = [{"name": "debugger", "image": "busybox"}]
    api.pods["p"] = copy.deepcopy(borrower)
    restored = restored_pod(borrower, 1, LOAN_KEY)
    assert "ephemeralContainers" not in restored["spec"]
    assert "ephemeralContainers" not in recreatable(borrower)["spec"]
    executor(api).restore(borrower, restored, owned=False)
    assert "ephemeralContainers" not in api.pods["p"]["spec"]


# -- item 1: an eviction with no answer ------------------------------------------


@pytest.mark.parametrize("answer", ["lost-answer", "lost-request", "unavailable"])
def test_an_eviction_without_a_clear_answer_keeps_the_entry_and_recovery_settles_it(answer):
    api = MemoryApi()
    borrower, restored = a_borrower(api)
    api.answers["evict"] = [answer]
    run = executor(api)
    with pytest.raises(ApiError):
        run.restore(borrower, restored, owned=False)
    assert len(api.configmaps) == 1  # it may have been evicted: the journal holds it
    recover(run, api)
    assert api.configmaps == {}
    now = api.pods["p"]
    if answer == "lost-answer":  # it was evicted: recreated with its original request
        assert now["spec"]["containers"][0]["resources"]["limits"] == {G1: "1"}
    else:  # it was not: it keeps running as it was
        assert now["metadata"]["uid"] == borrower["metadata"]["uid"]


# -- item 5: pods their user deleted ---------------------------------------------


def test_an_original_its_user_deleted_before_migchain_did_is_not_replaced():
    api = MemoryApi()
    plan = pending(api)
    api.answers["journal"] = ["ok"]
    real_create = api.create

    def user_deletes_after_journal(resource: str, body: dict[str, Any]) -> dict[str, Any]:
        result = real_create(resource, body)
        if resource == JOURNAL:
            api.pods.pop("p")  # its user, between migchain's journal and its delete
        return result

    api.create = user_deletes_after_journal  # type: ignore[method-assign]
    with pytest.raises(Abandoned):
        executor(api).borrow(plan)
    assert "p" not in api.pods and api.configmaps == {}


def test_a_borrower_its_user_deleted_before_its_eviction_is_not_restored():
    api = MemoryApi()
    borrower, restored = a_borrower(api)
    api.pods.pop("p")
    with pytest.raises(Abandoned):
        executor(api).restore(borrower, restored, owned=False)
    assert api.pods == {} and api.configmaps == {}


def test_recovery_leaves_a_borrower_its_user_deleted_rather_than_evicted():
    api = MemoryApi()
    borrower, restored = a_borrower(api)
    run = executor(api)
    run._journal_entry("return", borrower["metadata"]["uid"], borrower, restored)
    api.pods["p"]["metadata"]["deletionTimestamp"] = "2026-11-30T10:00:00Z"  # `kubectl delete`, a finalizer holds it
    assert run.finish_return(borrower, restored) == "it was deleted by someone else, not evicted: not recreated"
    assert api.configmaps == {}
    # Evicted (the Eviction API marks the pod so before deleting it): recreated once gone.
    api.pods["p"]["status"] = {
        "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]
    }
    run._journal_entry("return", borrower["metadata"]["uid"], borrower, restored)

    with pytest.raises(StillTerminating):  # not gone yet: nothing waits for it, the entry stays
        run.finish_return(borrower, restored)
    api.pods.pop("p", None)
    run.finish_return(borrower, restored)
    assert api.pods["p"]["spec"]["containers"][0]["resources"]["limits"] == {G1: "1"}
    assert api.configmaps == {}


# -- the property: whatever the answers, the pod is somewhere ----------------------

answers = st.lists(st.sampled_from(ANSWERS), max_size=4)


@given(journal=answers, delete=answers, create=answers, real_refuses=st.booleans())
def test_a_bare_borrow_never_leaves_the_pod_only_in_the_journal(journal, delete, create, real_refuses):
    api = MemoryApi()
    if real_refuses:
        api.real_admission_only = refuse_borrowers
    plan = pending(api)
    api.answers = {"journal": list(journal), "delete": list(delete), "create": list(create)}
    run = executor(api)
    with contextlib.suppress(ApiError, CopyRefused, FellBack, Abandoned):
        run.borrow(plan)
    for _ in range(12):  # recovery passes, the API server answering again
        try:
            recover(run, api)
        except (ApiError, CopyRefused, FellBack):
            continue
        if not api.configmaps:
            break
    assert "p" in api.pods, f"pod lost; writes {api.writes}"
    assert api.configmaps == {}


@given(journal=answers, evict=answers, create=answers, real_refuses=st.booleans())
def test_a_bare_return_never_leaves_the_pod_only_in_the_journal(journal, evict, create, real_refuses):
    api = MemoryApi()
    if real_refuses:
        api.real_admission_only = refuse_restored
    borrower, restored = a_borrower(api)
    api.answers = {"journal": list(journal), "evict": list(evict), "create": list(create)}
    run = executor(api)
    with contextlib.suppress(ApiError, CopyRefused, FellBack, Abandoned):
        run.restore(borrower, restored, owned=False)
    for _ in range(12):
        try:
            recover(run, api)
        except (ApiError, FellBack):
            continue
        if not api.configmaps:
            break
    assert "p" in api.pods, f"pod lost; writes {api.writes}"
    assert api.configmaps == {}


# -- an entry nothing can finish -----------------------------------------------------


class Events:
    def __init__(self) -> None:
        self.recorded: list[tuple[str, str, str]] = []

    def record(self, pod: dict[str, Any], reason: str, message: str, kind: str = "Normal") -> None:
        self.recorded.append((pod["metadata"]["namespace"], reason, kind))


def test_an_overdue_entry_gets_one_event_in_its_pods_namespace_and_sets_the_gauges():
    from prometheus_client import CollectorRegistry

    api = MemoryApi()
    borrower, restored = a_borrower(api)
    run = executor(api)
    run._journal_entry("return", borrower["metadata"]["uid"], borrower, restored)
    registry = CollectorRegistry()
    events = Events()
    written = datetime.datetime.fromisoformat("2026-11-30T10:00:00Z")
    age = (datetime.datetime.now(datetime.UTC) - written).total_seconds()
    overdue = OverdueJournal(run, events, JournalGauges(registry), "return", after=age - 60)  # type: ignore[arg-type]
    overdue.check(clean=False)
    overdue.check(clean=False)
    assert events.recorded == [("ml", "JournalOverdue", "Warning")]
    assert registry.get_sample_value("migchain_journal_overdue_entries", {"kind": "return"}) == 1
    assert (registry.get_sample_value("migchain_journal_oldest_entry_seconds", {"kind": "return"}) or 0) >= age - 1
    overdue.check(clean=True)
    assert registry.get_sample_value("migchain_journal_overdue_entries", {"kind": "return"}) == 0
