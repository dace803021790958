"""Returning a Job's pod: its tracking finalizer goes before the eviction, and comes back if there is none."""

from __future__ import annotations

import copy
from typing import Any, cast

import pytest

from extender.kube.api import ApiError, KubeApi
from extender.kube.executor import JOB_TRACKING_FINALIZER, EvictionBlocked, Executor
from tests.unit.objects import LOAN_KEY

POD = "/api/v1/namespaces/ml/pods/train-abc12"
OWNER = {"apiVersion": "batch/v1", "kind": "Job", "name": "train", "uid": "job-1", "controller": True}


class OnePodApi:
    """The API server as one Job pod sees it: JSON patches with tests, evictions with preconditions and a PDB."""

    def __init__(self) -> None:
        self.pod: dict[str, Any] | None = {
            "metadata": {
                "name": "train-abc12",
                "namespace": "ml",
                "uid": "uid-1",
                "resourceVersion": "10",
                "ownerReferences": [OWNER],
                "finalizers": ["example.com/audit", JOB_TRACKING_FINALIZER],
            },
            "status": {"phase": "Running"},
        }
        self.budget_allows = True  # what the PodDisruptionBudget says
        self.evictions: list[Exception | None] = []  # the outcomes of the next real evictions (None: as usual)
        self.calls: list[str] = []

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.pod) if self.pod else {}

    def get(self, resource: str, **_: Any) -> dict[str, Any]:
        self.calls.append("get")
        if self.pod is None:
            raise ApiError(404, "NotFound", resource)
        return self.snapshot()

    def patch(self, resource: str, body: Any, content_type: str = "") -> dict[str, Any]:
        assert self.pod is not None and resource == POD
        self.calls.append("patch")
        for op in body:
            where = op["path"].strip("/").split("/")
            parent: Any = self.pod
            for step in where[:-1]:
                parent = parent[int(step)] if isinstance(parent, list) else parent[step]
            last = int(where[-1]) if isinstance(parent, list) else where[-1]
            if op["op"] == "test" and (parent[last] if isinstance(parent, list) else parent.get(last)) != op["value"]:
                raise ApiError(422, "Invalid", f"test failed at {op['path']}")
            if op["op"] == "remove":
                del parent[last]
            if op["op"] == "add":
                parent[last] = op["value"]
        self.pod["metadata"]["resourceVersion"] = str(int(self.pod["metadata"]["resourceVersion"]) + 1)
        return self.snapshot()

    def create(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        assert resource == POD + "/eviction"
        options = body["deleteOptions"]
        dry_run = options.get("dryRun") == ["All"]
        self.calls.append("dry-run eviction" if dry_run else "eviction")
        if self.pod is None:
            raise ApiError(404, "NotFound", resource)
        preconditions = options.get("preconditions") or {}
        for field in ("uid", "resourceVersion"):
            if field in preconditions and preconditions[field] != self.pod["metadata"][field]:
                raise ApiError(409, "Conflict", f"precondition failed: {field}")
        if not self.budget_allows:
            raise ApiError(429, "TooManyRequests", "Cannot evict pod as it would violate the pod's disruption budget.")
        if not dry_run:
            outcome = self.evictions.pop(0) if self.evictions else None
            if outcome is not None:
                raise outcome
            self.pod["metadata"]["deletionTimestamp"] = "2026-11-30T00:00:00Z"
        return {}


def restore(api: OnePodApi) -> str:
    return Executor(cast(KubeApi, api), "migchain-system", LOAN_KEY).restore(api.snapshot(), {}, owned=True)


def finalizers(api: OnePodApi) -> list[str]:
    assert api.pod is not None
    return list(api.pod["metadata"]["finalizers"])


def test_the_finalizer_goes_before_the_eviction_and_the_pdb_is_asked_first():
    api = OnePodApi()
    assert "not counted as a failure" in restore(api)
    assert api.calls == ["dry-run eviction", "patch", "eviction"]
    assert finalizers(api) == ["example.com/audit"]
    assert api.pod is not None and api.pod["metadata"]["deletionTimestamp"]


def test_a_pdb_that_refuses_leaves_the_pod_untouched():
    api = OnePodApi()
    api.budget_allows = False
    with pytest.raises(EvictionBlocked):
        restore(api)
    assert api.calls == ["dry-run eviction"]
    assert finalizers(api) == ["example.com/audit", JOB_TRACKING_FINALIZER]


@pytest.mark.parametrize(
    "refusal",
    [
        ApiError(429, "TooManyRequests", "a PDB changed its mind"),
        ApiError(403, "Forbidden", "an admission webhook says no"),
        ApiError(500, "InternalError", "etcd timeout"),
        ApiError(0, "NoAnswer", "connection reset"),  # and it did not happen
    ],
)
def test_an_eviction_that_does_not_happen_puts_the_finalizer_back(refusal):
    api = OnePodApi()
    api.evictions = [refusal]
    with pytest.raises((EvictionBlocked, ApiError)):
        restore(api)
    assert finalizers(api) == ["example.com/audit", JOB_TRACKING_FINALIZER]
    assert api.pod is not None and "deletionTimestamp" not in api.pod["metadata"]


def test_a_pod_that_ends_before_its_finalizer_goes_keeps_it_for_the_job_to_count():
    api = OnePodApi()
    stale = api.snapshot()
    assert api.pod is not None
    api.pod["status"]["phase"] = "Succeeded"
    with pytest.raises(ApiError):
        Executor(cast(KubeApi, api), "migchain-system", LOAN_KEY).restore(stale, {}, owned=True)
    assert finalizers(api) == ["example.com/audit", JOB_TRACKING_FINALIZER]
    assert "deletionTimestamp" not in api.pod["metadata"]


def test_a_pod_that_changes_between_its_finalizer_going_and_the_eviction_is_not_evicted():
    api = OnePodApi()
    original_patch = api.patch

    def patch_then_the_pod_ends(resource: str, body: Any, content_type: str = "") -> dict[str, Any]:
        patched = original_patch(resource, body, content_type)
        assert api.pod is not None
        api.pod["status"]["phase"] = "Succeeded"  # as the kubelet reports it, a moment later
        api.pod["metadata"]["resourceVersion"] = str(int(api.pod["metadata"]["resourceVersion"]) + 1)
        api.patch = original_patch  # type: ignore[method-assign]
        return patched

    api.patch = patch_then_the_pod_ends  # type: ignore[method-assign]
    with pytest.raises(ApiError):
        restore(api)
    assert api.pod is not None and "deletionTimestamp" not in api.pod["metadata"]
    assert finalizers(api) == ["example.com/audit", JOB_TRACKING_FINALIZER]


def test_an_eviction_without_an_answer_that_did_happen_leaves_the_finalizer_off():
    api = OnePodApi()

    original_create = api.create

    def evict_then_lose_the_answer(resource: str, body: dict[str, Any]) -> dict[str, Any]:
        original_create(resource, body)
        if body["deleteOptions"].get("dryRun"):
            return {}
        raise ApiError(0, "NoAnswer", "read timed out")

    api.create = evict_then_lose_the_answer  # type: ignore[method-assign]
    with pytest.raises(ApiError):
        restore(api)
    assert api.pod is not None and api.pod["metadata"]["deletionTimestamp"]
    assert finalizers(api) == ["example.com/audit"]  # a pod being deleted takes no new finalizer: none is tried
