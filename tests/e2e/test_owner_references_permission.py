"""Owned borrows under OwnerReferencesPermissionEnforcement, as migchain's own ServiceAccount (issue 18, item 7).

A ReplicaSet's or a Job's pod carries an ownerReference with blockOwnerDeletion:
true, and the replacement copies it. With the admission plugin on (OpenShift
turns it on; tests/e2e/controlplane.py does too) the API server admits a create
that sets it only if the creator may update the owner's `finalizers`
subresource (k8s.io/kubernetes plugin/pkg/admission/gc). The borrow runs the
extender's own executor with a token of a ServiceAccount bound to the
ClusterRole manifests/ ship, and again to that role without its finalizers
rules.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from extender.core.cluster import pod_request
from extender.core.decide import Grant, Placement
from extender.core.loan import plan_borrow
from extender.kube.api import ApiError, Connection, KubeApi, path
from extender.kube.executor import Executor
from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import create_node, pod_template, replica_set
from tests.unit.test_manifests import render

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"
G1 = "nvidia.com/mig-1g.5gb"
G2 = "nvidia.com/mig-2g.10gb"
NOBODY = "e2e-no-scheduler"  # no scheduler places these pods: only the borrow under test binds them
FINALIZERS = {("apps", "replicasets/finalizers"), ("batch", "jobs/finalizers")}


def shipped_rules() -> list[dict[str, Any]]:
    [role] = [o for o in render() if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "migchain-extender"]
    return copy.deepcopy(role["rules"])


def without_finalizers(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    kept = []
    for rule in rules:
        resources = [r for r in rule["resources"] if not any((g, r) in FINALIZERS for g in rule["apiGroups"])]
        if resources:
            kept.append({**rule, "resources": resources})
    return kept


def api_as(scenario: Scenario, tmp_path: Path, name: str, rules: list[dict[str, Any]]) -> KubeApi:
    """A client with the token of a new ServiceAccount of the scenario's namespace, bound there to `rules`."""
    api, namespace = scenario.api, scenario.namespace
    role = f"{namespace}-{name}"
    api.create(path("api", "v1", "namespaces", namespace, "serviceaccounts"), {"metadata": {"name": name}})
    api.create(
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": role},
            "rules": rules,
        },
    )
    api.create(
        path("apis", "rbac.authorization.k8s.io", "v1", "namespaces", namespace, "rolebindings"),
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        },
    )
    token = api.create(
        path("api", "v1", "namespaces", namespace, "serviceaccounts", name, "token"),
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}},
    )["status"]["token"]
    kubeconfig = tmp_path / f"{name}.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(scenario.cluster.plane.kubeconfig_document(token)))
    return KubeApi(Connection.load(str(kubeconfig)))


def pending_pod_of(scenario: Scenario, owner_uid: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for pod in scenario.pods():
            refs = pod["metadata"].get("ownerReferences") or []
            if any(ref.get("uid") == owner_uid and ref.get("blockOwnerDeletion") for ref in refs):
                return pod
        return None

    found: dict[str, Any] = wait_until(find, 30, "the controller's pod")
    return found


def make_replica_set(scenario: Scenario, name: str) -> str:
    document = replica_set(name, scenario.test, {"1g.5gb": 1}, 1)
    document["spec"]["template"]["spec"]["schedulerName"] = NOBODY
    created = scenario.api.create(path("apis", "apps", "v1", "namespaces", scenario.namespace, "replicasets"), document)
    return str(created["metadata"]["uid"])


def make_job(scenario: Scenario, name: str) -> str:
    template = pod_template(scenario.test, {"1g.5gb": 1}, {})
    template["spec"].update(restartPolicy="Never", schedulerName=NOBODY)
    created = scenario.api.create(
        path("apis", "batch", "v1", "namespaces", scenario.namespace, "jobs"),
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": {"template": template}},
    )
    return str(created["metadata"]["uid"])


def borrow(scenario: Scenario, api: KubeApi, owner_uid: str, node: str) -> dict[str, Any]:
    """Replace the owner's pending pod by one borrowing 2g.10gb on `node`, as the binder does, through `api`."""
    pod = pending_pod_of(scenario, owner_uid)
    assert pod_request(pod).owner is not None
    placement = Placement(node, (Grant(G1, G2, 1, 2, "a100-40gb"),), 0)
    loan_key = scenario.cluster.plane.loan_key.read_bytes()
    return Executor(api, "migchain-system", loan_key).borrow(plan_borrow(pod, placement, loan_key))


@pytest.mark.parametrize(("kind", "make"), [("ReplicaSet", make_replica_set), ("Job", make_job)])
def test_an_owned_borrow_needs_exactly_the_owners_finalizers_rule(
    scenario: Scenario, tmp_path: Path, kind: str, make: Callable[[Scenario, str], str]
) -> None:
    node = f"gpu-{scenario.test}"
    create_node(scenario.api, node, A100, {"2g.10gb": 2}, scenario.test)
    rules = shipped_rules()

    # With the shipped ClusterRole the same borrow goes through: the replacement is bound, the original gone.
    shipped_uid = make(scenario, "shipped")
    original = pending_pod_of(scenario, shipped_uid)
    shipped_api = api_as(scenario, tmp_path, "shipped", rules)
    replacement = borrow(scenario, shipped_api, shipped_uid, node)
    assert replacement["spec"]["nodeName"] == node
    [ref] = replacement["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["uid"], ref["blockOwnerDeletion"]) == (kind, shipped_uid, True)

    def original_gone() -> bool:
        try:
            return bool(scenario.pod(original["metadata"]["name"])["metadata"]["uid"] != original["metadata"]["uid"])
        except ApiError as error:
            return error.status == 404

    wait_until(original_gone, 30, "the original to go")

    # The rule is an authorization the plugin asks about, not an endpoint: the API server serves no finalizers
    # subresource of ReplicaSets or Jobs, so it lets migchain write nothing of the owner.
    group = {"ReplicaSet": ("apps", "replicasets"), "Job": ("batch", "jobs")}[kind]
    owner = path("apis", group[0], "v1", "namespaces", scenario.namespace, group[1], "shipped")
    with pytest.raises(ApiError) as caught:
        shipped_api.request("PUT", f"{owner}/finalizers", scenario.api.get(owner))
    assert caught.value.status == 404

    assert without_finalizers(rules) != rules, "manifests/rbac-extender.yaml grants no owner's finalizers"
    # Without the rule the API server refuses the replacement, and the original stays.
    refused_uid = make(scenario, "refused")
    original = pending_pod_of(scenario, refused_uid)
    with pytest.raises(ApiError) as caught:
        borrow(scenario, api_as(scenario, tmp_path, "without-finalizers", without_finalizers(rules)), refused_uid, node)
    assert caught.value.status == 403
    assert "cannot set blockOwnerDeletion" in str(caught.value)
    assert scenario.pod(original["metadata"]["name"])["metadata"]["uid"] == original["metadata"]["uid"]
