"""Reading Pod and Node objects: effective MIG requests as kube-scheduler computes them, and clear errors."""

from __future__ import annotations

from typing import Any

import pytest

from extender.core.cluster import ObjectError, node_state, pod_record, pod_request

G1 = "nvidia.com/mig-1g.5gb"
G2 = "nvidia.com/mig-2g.10gb"


def container(limits=None, requests=None, restart_policy=None):
    resources: dict[str, Any] = {}
    c: dict[str, Any] = {"name": "c", "resources": resources}
    if limits is not None:
        resources["limits"] = limits
    if requests is not None:
        resources["requests"] = requests
    if restart_policy:
        c["restartPolicy"] = restart_policy
    return c


def pod(containers=(), init=(), annotations=None):
    return {
        "metadata": {"name": "p", "namespace": "ml", "uid": "u", "annotations": annotations or {}},
        "spec": {"containers": list(containers), "initContainers": list(init)},
    }


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(pod([container({G1: "1", "cpu": "1"})]), ((G1, 1),), id="limits-only"),
        pytest.param(pod([container(requests={G1: 2})]), ((G1, 2),), id="requests-int"),
        pytest.param(pod([container({G1: "1"}), container({G1: "2", G2: "1"})]), ((G1, 3), (G2, 1)), id="sum"),
        # an init container runs alone: the pod needs max(init, sum of app containers)
        pytest.param(pod([container({G1: "1"})], [container({G1: "3"})]), ((G1, 3),), id="init-peak"),
        pytest.param(pod([container({G1: "2"})], [container({G1: "1"})]), ((G1, 2),), id="app-peak"),
        # a sidecar (restartPolicy Always) runs beside everything after it
        pytest.param(
            pod([container({G1: "1"})], [container({G1: "1"}, restart_policy="Always"), container({G1: "2"})]),
            ((G1, 3),),
            id="sidecar",
        ),
        pytest.param(pod([container({"cpu": "1"})]), (), id="no-mig"),
    ],
)
def test_effective_mig_request(spec, expected):
    assert pod_request(spec).mig == expected


def test_namespace_name_uid_and_borrow_opt_out():
    request = pod_request(pod(annotations={"migchain.io/borrow": "false"}))
    assert (request.namespace, request.name, request.uid) == ("ml", "p", "u")
    assert request.no_borrow == "pod annotation migchain.io/borrow=false"
    assert pod_request(pod(annotations={"migchain.io/borrow": "true"})).may_borrow
    assert not pod_request(pod(annotations={"migchain.io/borrow": "nope"})).may_borrow  # a typo must not enable


@pytest.mark.parametrize(("kind", "may_borrow"), [("ReplicaSet", True), ("Job", True), ("StatefulSet", False)])
def test_pods_of_controllers_that_recreate_by_name_never_borrow(kind, may_borrow):
    spec = pod()
    spec["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "batch/v1" if kind == "Job" else "apps/v1",
            "kind": kind,
            "name": "x",
            "uid": "o",
            "controller": True,
        }
    ]
    assert pod_request(spec).may_borrow is may_borrow


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (pod([container({G1: "500m"})]), "spec.containers[0].resources.limits[nvidia.com/mig-1g.5gb]"),
        (pod([container({G1: 1.5})]), "spec.containers[0].resources.limits"),
        (pod([container({G1: True})]), "spec.containers[0].resources.limits"),
        (pod([container(requests={G1: "-1"})]), "requests[nvidia.com/mig-1g.5gb]"),
        ({"metadata": {"name": 5}, "spec": {}}, "Pod.metadata.name"),
        ({"metadata": {}, "spec": {"containers": {}}}, "spec.containers"),
        ({"metadata": {}, "spec": {"containers": [{"resources": []}]}}, "spec.containers[0].resources"),
        ([], "Pod"),
    ],
)
def test_a_malformed_pod_names_the_field(spec, field):
    with pytest.raises(ObjectError, match=field.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        pod_request(spec)


def test_node_state_reads_mig_allocatable_and_gfd_labels():
    node = node_state(
        {
            "metadata": {
                "name": "gpu-1",
                "labels": {"nvidia.com/gpu.product": "NVIDIA-A30", "nvidia.com/mig.config.state": "pending"},
            },
            "status": {"allocatable": {"nvidia.com/mig-1g.6gb": "4", "cpu": "64", "nvidia.com/gpu": "0"}},
        },
        used={"nvidia.com/mig-1g.6gb": 5},
    )
    assert (node.name, node.gpu_product, node.offers_slices) == ("gpu-1", "NVIDIA-A30", False)
    assert node.allocatable == {"nvidia.com/mig-1g.6gb": 4}
    assert node.free == {"nvidia.com/mig-1g.6gb": 0}  # over-used (cache behind) never goes negative


def test_a_node_without_mig_manager_label_offers_its_slices():
    assert node_state({"metadata": {"name": "n"}, "status": {}}).offers_slices


def test_priority_preemption_policy_scheduler_and_nomination_of_a_pod():
    spec = pod()
    spec["spec"].update({"priority": 1000, "preemptionPolicy": "Never", "schedulerName": "migchain-scheduler"})
    spec["status"] = {
        "nominatedNodeName": "gpu-1",
        "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}],
    }
    record = pod_record(spec)
    assert record.request.priority == 1000
    assert (record.preemption_policy, record.nominated) == ("Never", "gpu-1")
    assert record.scheduler_name == "migchain-scheduler"
    assert record.unschedulable
    plain = pod_record(pod())
    assert (plain.request.priority, plain.preemption_policy, plain.nominated, plain.unschedulable) == (0, "", "", False)
    spec["status"]["conditions"] = [{"type": "PodScheduled", "status": "True"}]
    assert not pod_record(spec).unschedulable


@pytest.mark.parametrize("value", ["1000", 1.5, True])
def test_a_priority_that_is_no_whole_number_names_the_field(value):
    spec = pod()
    spec["spec"]["priority"] = value
    with pytest.raises(ObjectError, match=r"Pod\.spec\.priority"):
        pod_request(spec)
