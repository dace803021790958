"""Borrow plans: the replacement asks for exactly what was granted, keeps the pod's identity, and records the loan."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from extender.core.cluster import NodeState, pod_record, pod_request
from extender.core.decide import Placement, place
from extender.core.loan import loan_of, plan_borrow, replacement_name
from extender.core.rules import Chain, ChainRules
from tests.strategies import A100

G1 = "nvidia.com/mig-1g.5gb"
G1_10 = "nvidia.com/mig-1g.10gb"
G2 = "nvidia.com/mig-2g.10gb"
G3 = "nvidia.com/mig-3g.20gb"
RULES = ChainRules([Chain("a100", frozenset({A100}), (G1, G1_10, G2, G3))])


def pod_json(
    limits_per_container: list[dict[str, str]], owned: bool, init: dict[str, str] | None = None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": "worker-abc12",
        "namespace": "ml",
        "uid": "0d4c9b1e",
        "resourceVersion": "812",
        "creationTimestamp": "2026-11-25T00:00:00Z",
        "labels": {"app": "worker", "pod-template-hash": "abc"},
        "annotations": {"team": "vision"},
        "finalizers": ["batch.kubernetes.io/job-tracking"],
    }
    if owned:
        metadata["generateName"] = "worker-"
        metadata["ownerReferences"] = [{"kind": "ReplicaSet", "name": "worker", "uid": "rs-1", "controller": True}]
    spec: dict[str, Any] = {
        "schedulerName": "migchain-scheduler",
        "containers": [
            {"name": f"c{index}", "image": "cuda", "resources": {"limits": dict(limits), "requests": dict(limits)}}
            for index, limits in enumerate(limits_per_container)
        ],
    }
    if init is not None:
        spec["initContainers"] = [{"name": "setup", "image": "cuda", "resources": {"limits": dict(init)}}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec, "status": {"phase": "Pending"}}


def borrow_on(pod: dict[str, Any], free: dict[str, int]) -> Placement:
    verdict = place(pod_request(pod), NodeState("gpu-1", A100, "success", free, {}), "gpu-1", RULES)
    assert isinstance(verdict, Placement) and verdict.borrows
    return verdict


mig_limits = st.dictionaries(st.sampled_from((G1, G1_10, G2)), st.integers(1, 2).map(str), min_size=1, max_size=2)


@given(containers=st.lists(mig_limits, min_size=1, max_size=3), owned=st.booleans())
def test_the_replacement_asks_exactly_for_the_grants_and_keeps_the_pods_identity(containers, owned):
    pod = pod_json(containers, owned)
    placement = borrow_on(pod, {G3: 20})  # only the largest type free: every request borrows 3g.20gb
    plan = plan_borrow(pod, placement)
    replacement = plan.replacement
    assert pod_request(replacement).mig == placement.slices
    record = pod_record({**replacement, "metadata": {**replacement["metadata"], "uid": "new"}})
    assert record.node == "gpu-1"
    assert record.replaces == pod["metadata"]["uid"]
    metadata = replacement["metadata"]
    assert metadata["labels"] == pod["metadata"]["labels"]
    assert metadata.get("ownerReferences") == pod["metadata"].get("ownerReferences")
    assert metadata["finalizers"] == pod["metadata"]["finalizers"]
    assert "uid" not in metadata and "resourceVersion" not in metadata and "status" not in replacement
    if owned:
        assert not plan.keeps_name
        assert metadata["name"] == replacement_name(pod["metadata"]["name"], pod["metadata"]["uid"])
    else:
        assert plan.keeps_name
        assert metadata["name"] == pod["metadata"]["name"]
    # the original is untouched: a failed borrow leaves it as it was
    assert pod == pod_json(containers, owned)


@given(containers=st.lists(mig_limits, min_size=1, max_size=3))
def test_the_loan_record_reads_back_and_can_restore_every_containers_original_resources(containers):
    pod = pod_json(containers, owned=True)
    placement = borrow_on(pod, {G3: 20})
    annotations = plan_borrow(pod, placement).replacement["metadata"]["annotations"]
    loan = loan_of(annotations)
    assert loan is not None
    assert loan.original == pod_request(pod).mig
    assert loan.borrowed == placement.slices
    assert loan.steps == placement.cost
    assert loan.chains == ("a100",)
    assert loan.replaced_uid == pod["metadata"]["uid"]
    original = json.loads(annotations["migchain.io/original-resources"])
    for index, limits in enumerate(containers):
        assert original[f"containers/c{index}"] == {"limits": limits, "requests": limits}
    assert annotations["team"] == "vision"  # the pod's own annotations stay


def test_init_container_requests_are_rewritten_too():
    pod = pod_json([{G1: "1"}], owned=False, init={G1: "1"})
    plan = plan_borrow(pod, borrow_on(pod, {G2: 1}))
    assert plan.replacement["spec"]["initContainers"][0]["resources"]["limits"] == {G2: "1"}
    assert plan.replacement["spec"]["containers"][0]["resources"]["limits"] == {G2: "1"}


def test_the_replacement_name_is_stable_for_one_original_and_differs_between_originals():
    assert replacement_name("web-7d9f-x", "uid-1") == replacement_name("web-7d9f-x", "uid-1")
    assert replacement_name("web-7d9f-x", "uid-1") != replacement_name("web-7d9f-x", "uid-2")
    assert len(replacement_name("a" * 80, "uid")) <= 63


def test_a_pod_without_a_loan_record_has_no_loan():
    assert loan_of({"team": "vision"}) is None
    assert loan_of({"migchain.io/replaced-uid": "x", "migchain.io/original-requests": "garbage"}) is None
