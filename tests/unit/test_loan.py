"""Borrow plans: the replacement asks for exactly what was granted, keeps the pod's identity, and records the loan."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extender.core.cluster import NodeState, ObjectError, pod_mig_requests, pod_record, pod_request
from extender.core.decide import Grant, Placement, place
from extender.core.loan import loan_of, plan_borrow, replacement_name, restored_pod
from extender.core.rules import Chain, ChainRules
from tests.strategies import A100
from tests.unit.objects import LOAN_KEY

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
    }
    if owned:  # a bare pod with finalizers never borrows
        metadata["finalizers"] = ["batch.kubernetes.io/job-tracking"]
        metadata["generateName"] = "worker-"
        metadata["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "worker", "uid": "rs-1", "controller": True}
        ]
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
    plan = plan_borrow(pod, placement, LOAN_KEY)
    replacement = plan.replacement
    assert pod_request(replacement).mig == placement.slices
    record = pod_record({**replacement, "metadata": {**replacement["metadata"], "uid": "new"}})
    assert record.node == "gpu-1"
    assert record.replaces == pod["metadata"]["uid"]
    metadata = replacement["metadata"]
    assert metadata["labels"] == pod["metadata"]["labels"]
    assert metadata.get("ownerReferences") == pod["metadata"].get("ownerReferences")
    assert metadata.get("finalizers") == pod["metadata"].get("finalizers")
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
    annotations = plan_borrow(pod, placement, LOAN_KEY).replacement["metadata"]["annotations"]
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
    plan = plan_borrow(pod, borrow_on(pod, {G2: 1}), LOAN_KEY)
    assert plan.replacement["spec"]["initContainers"][0]["resources"]["limits"] == {G2: "1"}
    assert plan.replacement["spec"]["containers"][0]["resources"]["limits"] == {G2: "1"}


def test_the_replacement_name_is_stable_for_one_original_and_differs_between_originals():
    assert replacement_name("web-7d9f-x", "uid-1") == replacement_name("web-7d9f-x", "uid-1")
    assert replacement_name("web-7d9f-x", "uid-1") != replacement_name("web-7d9f-x", "uid-2")
    assert len(replacement_name("a" * 80, "uid")) <= 63


def test_a_pod_without_a_loan_record_has_no_loan():
    assert loan_of({"team": "vision"}) is None
    assert loan_of({"migchain.io/replaced-uid": "x", "migchain.io/original-requests": "garbage"}) is None


# -- any pod, any grant: the replacement asks for what the loan says ----------

GRANTABLE = (G1, G1_10, G2, G3)


@st.composite
def mig_maps(draw: st.DrawFn, min_size: int = 0) -> dict[str, str]:
    """MIG limits of one container in any key order (the API server sorts them; a client may not), maybe with CPU."""
    counts = draw(st.dictionaries(st.sampled_from(GRANTABLE), st.integers(1, 3), min_size=min_size, max_size=3))
    order = draw(st.permutations(sorted(counts)))
    values = {resource: str(counts[resource]) for resource in order}
    if draw(st.booleans()):
        values = {"cpu": "1", **values} if draw(st.booleans()) else {**values, "cpu": "1"}
    return values


@st.composite
def any_pods(draw: st.DrawFn) -> dict[str, Any]:
    """A pending pod with several containers and init containers (sidecars or not), each asking for MIG or not."""

    def container(name: str, limits: dict[str, str]) -> dict[str, Any]:
        return {"name": name, "image": "cuda", "resources": {"limits": limits, "requests": dict(limits)}}

    pod = pod_json([{}], owned=draw(st.booleans()))
    apps = draw(st.lists(mig_maps(), min_size=1, max_size=3))
    pod["spec"]["containers"] = [container(f"c{index}", limits) for index, limits in enumerate(apps)]
    inits = []
    for index, limits in enumerate(draw(st.lists(mig_maps(), max_size=2))):
        init = container(f"i{index}", limits)
        if draw(st.booleans()):
            init["restartPolicy"] = "Always"  # a sidecar: its slices add up with the app containers'
        inits.append(init)
    if inits:
        pod["spec"]["initContainers"] = inits
    # Containers without any MIG request are not asked for: make one ask.
    if not pod_mig_requests(pod["spec"]):
        pod["spec"]["containers"][0]["resources"] = {"limits": {G1: "1"}, "requests": {G1: "1"}}
    return pod


@st.composite
def any_placements(draw: st.DrawFn, pod: dict[str, Any]) -> Placement:
    """Any grant of each requested type: as itself, or as any type (even one the pod also asks for)."""
    grants = []
    for requested, count in pod_mig_requests(pod["spec"]):
        granted = draw(st.sampled_from(GRANTABLE))
        steps = 0 if granted == requested else draw(st.integers(1, 3))
        grants.append(Grant(requested, granted, count, steps, "a100" if steps else None))
    return Placement("gpu-1", tuple(grants), 0)


def ordinary_init_asks_mig(pod: dict[str, Any]) -> bool:
    return any(
        init.get("restartPolicy") != "Always" and pod_mig_requests({"containers": [init]})
        for init in pod["spec"].get("initContainers") or []
    )


def resources_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{section}/{container['name']}": container.get("resources")
        for section in ("initContainers", "containers")
        for container in pod["spec"].get(section) or []
    }


@given(data=st.data())
def test_any_pod_any_grant_the_replacement_asks_for_the_loan_and_restores_to_the_original(data):
    pod = data.draw(any_pods())
    placement = data.draw(any_placements(pod))
    replacement = plan_borrow(pod, placement, LOAN_KEY).replacement
    loan = loan_of(replacement["metadata"]["annotations"])
    assert loan is not None
    held = pod_mig_requests(replacement["spec"])
    assert held == loan.borrowed
    assert loan.original == pod_mig_requests(pod["spec"])
    # What the pod holds is what was granted. Only an ordinary init container can make
    # it less: its slices are reused by the app containers once it has run, so two
    # requested types granted as one type may need fewer slices than the two did.
    granted = dict(placement.slices)
    assert all(count <= granted.get(resource, 0) for resource, count in held)
    if not ordinary_init_asks_mig(pod) or len({g.granted for g in placement.grants}) == len(placement.grants):
        assert held == placement.slices
    restored = restored_pod(replacement, 1, LOAN_KEY)
    assert resources_of(restored) == resources_of(pod)
    assert pod_mig_requests(restored["spec"]) == loan.original


def test_a_container_asking_for_two_types_keeps_both_slices_when_one_is_granted_as_the_other():
    # Issue 16, item 1: the API server returns keys sorted, so 1g.5gb comes first.
    pod = pod_json([{G1: "1", G2: "1"}], owned=True)
    placement = Placement("gpu-1", (Grant(G1, G2, 1, 2, "a100"), Grant(G2, G2, 1)), 0)
    replacement = plan_borrow(pod, placement, LOAN_KEY).replacement
    assert replacement["spec"]["containers"][0]["resources"] == {"limits": {G2: "2"}, "requests": {G2: "2"}}
    assert replacement["metadata"]["annotations"]["migchain.io/borrowed-requests"] == f"{G2}=2"


def test_two_types_each_moving_up_one_place_keep_both_slices():
    # 1g.5gb -> 2g.10gb and 2g.10gb -> 3g.20gb: each new map comes from the original map.
    pod = pod_json([{G1: "1", G2: "1"}], owned=True)
    placement = Placement("gpu-1", (Grant(G1, G2, 1, 2, "a100"), Grant(G2, G3, 1, 1, "a100")), 0)
    replacement = plan_borrow(pod, placement, LOAN_KEY).replacement
    assert replacement["spec"]["containers"][0]["resources"]["limits"] == {G2: "1", G3: "1"}
    restored = restored_pod(replacement, 1, LOAN_KEY)
    assert restored["spec"]["containers"][0]["resources"] == pod["spec"]["containers"][0]["resources"]


def test_an_init_containers_slice_granted_as_the_apps_type_is_reused_and_the_loan_says_so():
    # The init container runs first, alone; its 2g.10gb is the app container's afterwards.
    pod = pod_json([{G2: "1"}], owned=True, init={G1: "1"})
    placement = Placement("gpu-1", (Grant(G1, G2, 1, 2, "a100"), Grant(G2, G2, 1)), 0)
    replacement = plan_borrow(pod, placement, LOAN_KEY).replacement
    assert pod_mig_requests(replacement["spec"]) == ((G2, 1),)
    assert replacement["metadata"]["annotations"]["migchain.io/borrowed-requests"] == f"{G2}=1"


@pytest.mark.parametrize(
    "record",
    [
        "not json",
        "[1]",
        '{"containers/c0": 3}',
        '{"containers/c0": {"limits": [1]}}',
        '{"containers/c0": {"x": {}}}',
        "[" * 100_000,  # deeper than the JSON parser recurses
        '{"containers/c0": {"limits": {"nvidia.com/mig-1g.5gb": "\u00b2"}}}',  # "²" passes str.isdigit()
    ],
)
def test_a_forged_record_of_the_original_resources_is_refused_not_a_crash(record):
    pod = pod_json([{G1: "1"}], owned=False)
    replacement = plan_borrow(pod, borrow_on(pod, {G2: 1}), LOAN_KEY).replacement
    replacement["metadata"]["annotations"]["migchain.io/original-resources"] = record
    with pytest.raises(ObjectError, match=r"migchain\.io/original-resources"):
        restored_pod(replacement, 1, LOAN_KEY)


@pytest.mark.parametrize(
    ("own_cost", "borrower_cost"),
    [
        (None, "-1"),  # exact fits carry the default 0
        ("100", "99"),  # a template's own cost: one less than the siblings'
        ("-2147483648", "-1"),  # the mark a borrow puts on the pending original, read back on a retry
        ("not a number", "-1"),
    ],
)
def test_a_replicasets_borrower_costs_less_to_delete_than_its_exact_fit_siblings(own_cost, borrower_cost):
    pod = pod_json([{G1: "1"}], owned=True)
    if own_cost is not None:
        pod["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"] = own_cost
    replacement = plan_borrow(pod, borrow_on(pod, {G2: 1}), LOAN_KEY).replacement
    assert replacement["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"] == borrower_cost


def test_only_a_replicasets_borrower_gets_a_deletion_cost():
    bare = pod_json([{G1: "1"}], owned=False)
    job = pod_json([{G1: "1"}], owned=True)
    job["metadata"]["ownerReferences"][0].update(apiVersion="batch/v1", kind="Job")
    for pod in (bare, job):
        annotations = plan_borrow(pod, borrow_on(pod, {G2: 1}), LOAN_KEY).replacement["metadata"]["annotations"]
        assert "controller.kubernetes.io/pod-deletion-cost" not in annotations
