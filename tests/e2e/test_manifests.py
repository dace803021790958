"""manifests/ on a real API server: every object is accepted, and the RBAC allows the code's calls and nothing else.

The whole rendering goes through a server-side dry run (admission, Pod
Security included); only the RBAC objects are really applied, then each
ServiceAccount's accesses are put to the API server as SubjectAccessReviews.
Everything applied is removed at the end; the migchain-system Namespace, which
the session uses, only loses the labels this test gave it.
"""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from extender.kube.api import ApiError, path
from tests.e2e.conftest import Cluster
from tests.e2e.controlplane import BIN, wait_until
from tests.unit.test_manifests import API_CALLS, CERTS, EXTENDER, LOAN_KEY, NAMESPACE, SCHEDULER, TEAM, Access, render

pytestmark = pytest.mark.e2e

RBAC_KINDS = ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
MANAGER = "migchain-e2e-manifests"
LEASES = "coordination.k8s.io"

# Beyond what the code needs, each account may do nothing; a sample of what must stay denied.
DENIED = [
    # nodes are read-only to migchain
    Access(EXTENDER, "delete", "nodes"),
    Access(EXTENDER, "patch", "nodes"),
    Access(EXTENDER, "update", "nodes"),
    Access(EXTENDER, "patch", "nodes", subresource="status"),
    Access(EXTENDER, "get", "nodes"),  # it lists and watches; single reads go to its cache
    # pods: never updated whole, their status only patched (nominatedNodeName), never exec
    Access(EXTENDER, "update", "pods", TEAM),
    Access(EXTENDER, "update", "pods", TEAM, subresource="status"),
    Access(EXTENDER, "create", "pods", TEAM, subresource="exec"),
    Access(EXTENDER, "get", "pods", TEAM, subresource="log"),
    Access(EXTENDER, "deletecollection", "pods", TEAM),
    # no Secret anywhere, its own namespace included
    Access(EXTENDER, "get", "secrets", NAMESPACE, name="migchain-extender-tls"),
    Access(EXTENDER, "list", "secrets"),
    Access(EXTENDER, "get", "secrets", TEAM),
    # workload controllers are not its business
    Access(EXTENDER, "update", "deployments", TEAM, group="apps"),
    Access(EXTENDER, "delete", "replicasets", TEAM, group="apps"),
    Access(EXTENDER, "patch", "jobs", TEAM, group="batch"),
    # the owners' finalizers only, and only of the kinds whose pods borrow by default
    Access(EXTENDER, "update", "replicasets", TEAM, group="apps"),
    Access(EXTENDER, "update", "jobs", TEAM, group="batch", subresource="status"),
    Access(EXTENDER, "patch", "replicasets", TEAM, group="apps", subresource="finalizers"),
    Access(EXTENDER, "update", "statefulsets", TEAM, group="apps", subresource="finalizers"),
    Access(EXTENDER, "update", "deployments", TEAM, group="apps", subresource="finalizers"),
    Access(EXTENDER, "update", "workflows", TEAM, group="argoproj.io", subresource="finalizers"),
    Access(EXTENDER, "create", "pods", TEAM, subresource="ephemeralcontainers"),
    # the journal lives in migchain-system only, and is never read one by one or rewritten
    Access(EXTENDER, "create", "configmaps", TEAM),
    Access(EXTENDER, "list", "configmaps"),
    Access(EXTENDER, "get", "configmaps", NAMESPACE, name="migchain-journal-x"),
    Access(EXTENDER, "update", "configmaps", NAMESPACE, name="migchain-journal-x"),
    Access(EXTENDER, "get", "configmaps", "kube-system", name="extension-apiserver-authentication"),
    # its own lease only
    Access(EXTENDER, "update", "leases", NAMESPACE, group=LEASES, name="migchain-scheduler"),
    Access(EXTENDER, "delete", "leases", NAMESPACE, group=LEASES, name="migchain-returner"),
    Access(EXTENDER, "get", "leases", "kube-system", group=LEASES, name="kube-scheduler"),
    Access(EXTENDER, "create", "leases", "kube-system", group=LEASES),
    # events are written, never changed or deleted
    Access(EXTENDER, "delete", "events", TEAM),
    Access(EXTENDER, "create", "events", TEAM, group="events.k8s.io"),
    # no way to more power
    Access(EXTENDER, "create", "serviceaccounts", NAMESPACE, subresource="token", name="migchain-extender"),
    Access(EXTENDER, "create", "clusterrolebindings", group="rbac.authorization.k8s.io"),
    Access(EXTENDER, "escalate", "clusterroles", group="rbac.authorization.k8s.io"),
    # the scheduler: its own lease, no Secrets, no journal
    Access(SCHEDULER, "update", "leases", NAMESPACE, group=LEASES, name="migchain-returner"),
    Access(SCHEDULER, "get", "secrets", NAMESPACE, name="migchain-scheduler-client-tls"),
    Access(SCHEDULER, "create", "configmaps", NAMESPACE),
    Access(SCHEDULER, "create", "pods", TEAM),
    # the certs Job and CronJob: the three Secrets and a restart of the scheduler, nothing more
    Access(CERTS, "get", "secrets", NAMESPACE, name="some-other-secret"),
    Access(CERTS, "update", "secrets", NAMESPACE, name="some-other-secret"),
    Access(CERTS, "list", "secrets", NAMESPACE),
    Access(CERTS, "delete", "secrets", NAMESPACE, name="migchain-scheduler-client-tls"),
    Access(CERTS, "delete", "secrets", NAMESPACE, name="migchain-ca"),
    Access(CERTS, "create", "secrets", "kube-system"),
    Access(CERTS, "get", "secrets", "kube-system", name="migchain-ca"),
    Access(CERTS, "list", "pods"),
    # the loan key: made by its Job, read through the API by nobody else (the extender pod mounts it)
    Access(EXTENDER, "get", "secrets", NAMESPACE, name=LOAN_KEY),
    Access(SCHEDULER, "get", "secrets", NAMESPACE, name=LOAN_KEY),
    Access(CERTS, "get", "secrets", NAMESPACE, name=LOAN_KEY),
    Access(LOAN_KEY, "list", "secrets", NAMESPACE),
    Access(LOAN_KEY, "update", "secrets", NAMESPACE, name=LOAN_KEY),
    Access(LOAN_KEY, "delete", "secrets", NAMESPACE, name=LOAN_KEY),
    Access(LOAN_KEY, "get", "secrets", NAMESPACE, name="migchain-extender-tls"),
    Access(LOAN_KEY, "list", "pods"),
    Access(CERTS, "patch", "deployments", NAMESPACE, group="apps", name=EXTENDER),
    Access(CERTS, "update", "deployments", NAMESPACE, group="apps", name=SCHEDULER),
    Access(CERTS, "delete", "deployments", NAMESPACE, group="apps", name=SCHEDULER),
    Access(CERTS, "create", "deployments", NAMESPACE, group="apps"),
    # the CA's key: the certs account's alone
    Access(EXTENDER, "get", "secrets", NAMESPACE, name="migchain-ca"),
    Access(SCHEDULER, "get", "secrets", NAMESPACE, name="migchain-ca"),
]

# What a second kube-scheduler needs from the bindings manifests/ give it (Configure Multiple Schedulers).
SCHEDULER_NEEDS = [
    Access(SCHEDULER, "create", "leases", NAMESPACE, group=LEASES),
    Access(SCHEDULER, "get", "leases", NAMESPACE, group=LEASES, name="migchain-scheduler"),
    Access(SCHEDULER, "update", "leases", NAMESPACE, group=LEASES, name="migchain-scheduler"),
    Access(SCHEDULER, "get", "configmaps", "kube-system", name="extension-apiserver-authentication"),
    Access(SCHEDULER, "list", "nodes"),
    Access(SCHEDULER, "watch", "pods"),
    Access(SCHEDULER, "create", "pods", TEAM, subresource="binding"),
    Access(SCHEDULER, "create", "events", TEAM, group="events.k8s.io"),
    Access(SCHEDULER, "list", "persistentvolumeclaims"),
    Access(SCHEDULER, "create", "tokenreviews", group="authentication.k8s.io"),
]


# One access from each binding manifests/ make: when all are allowed, the authorizer has them all.
IN_FORCE = [
    Access(EXTENDER, "list", "nodes"),  # ClusterRoleBinding to the ClusterRole migchain-extender
    Access(EXTENDER, "list", "configmaps", NAMESPACE),  # RoleBinding to the Role migchain-extender
    Access(CERTS, "create", "secrets", NAMESPACE),  # RoleBinding to the Role migchain-certs
    Access(LOAN_KEY, "create", "secrets", NAMESPACE),  # RoleBinding to the Role migchain-loan-key
    Access(SCHEDULER, "update", "leases", NAMESPACE, group=LEASES, name="migchain-scheduler"),  # its Role
    Access(SCHEDULER, "list", "nodes"),  # ClusterRoleBinding to system:kube-scheduler
    Access(SCHEDULER, "get", "persistentvolumes"),  # ClusterRoleBinding to system:volume-scheduler
    Access(SCHEDULER, "get", "configmaps", "kube-system", name="extension-apiserver-authentication"),
]


def kubectl(cluster: Cluster, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kubectl"), f"--kubeconfig={cluster.plane.kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def apply(cluster: Cluster, documents: str) -> subprocess.CompletedProcess[str]:
    return kubectl(cluster, "apply", "--server-side", f"--field-manager={MANAGER}", "-f", "-", stdin=documents)


def allowed(cluster: Cluster, access: Access) -> bool:
    attributes = {
        key: value
        for key, value in {
            "verb": access.verb,
            "group": access.group,
            "resource": access.resource,
            "subresource": access.subresource,
            "namespace": access.namespace,
            "name": access.name,
        }.items()
        if value
    }
    review = cluster.api.create(
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": f"system:serviceaccount:{NAMESPACE}:{access.account}",
                # the groups a ServiceAccount token carries: whatever they are granted counts too
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}", "system:authenticated"],
                "resourceAttributes": attributes,
            },
        },
    )
    return bool(review.get("status", {}).get("allowed"))


@pytest.fixture(scope="module")
def manifests(cluster: Cluster) -> Iterator[list[dict[str, Any]]]:
    """The rendering, with its RBAC objects (and the Namespace) really applied; removed afterwards."""
    objects = render()
    rbac = [o for o in objects if o["kind"] in RBAC_KINDS]
    try:
        cluster.api.get(path("api", "v1", "namespaces", NAMESPACE))
        namespace_existed = True
    except ApiError as error:
        if error.status != 404:
            raise
        namespace_existed = False
    try:
        for _ in range(2):  # applying again changes nothing: installs and upgrades use the same command
            applied = apply(cluster, yaml.safe_dump_all(rbac))
            assert applied.returncode == 0, applied.stderr
        # The authorizer learns RBAC objects through informers: wait until one
        # access granted by each kind of binding is allowed.
        wait_until(lambda: all(allowed(cluster, access) for access in IN_FORCE), 30, "the RBAC of manifests/")
        yield objects
    finally:
        others = [o for o in rbac if o["kind"] != "Namespace"]
        kubectl(cluster, "delete", "--ignore-not-found", "-f", "-", stdin=yaml.safe_dump_all(others))
        if namespace_existed:
            # Applying the bare Namespace under the same field manager drops the labels it set.
            bare = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
            apply(cluster, yaml.safe_dump(bare))
        else:
            kubectl(cluster, "delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=false")
        # Nothing of this test is left for the rest of the session.
        leftovers = kubectl(
            cluster, "get", "--ignore-not-found", "-o", "name", "-f", "-", stdin=yaml.safe_dump_all(others)
        )
        assert leftovers.returncode == 0 and not leftovers.stdout, leftovers.stdout + leftovers.stderr
        if namespace_existed:
            labels = cluster.api.get(path("api", "v1", "namespaces", NAMESPACE))["metadata"].get("labels", {})
            assert not any(key.startswith("pod-security.kubernetes.io/") for key in labels), labels


def dry_run(cluster: Cluster, objects: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    return kubectl(
        cluster,
        "apply",
        "--server-side",
        "--dry-run=server",
        f"--field-manager={MANAGER}",
        "-f",
        "-",
        stdin=yaml.safe_dump_all(objects),
    )


def test_a_real_api_server_accepts_every_object_with_no_pod_security_warning(cluster, manifests):
    result = dry_run(cluster, manifests)
    assert result.returncode == 0, result.stderr
    applied = result.stdout.splitlines()
    assert len(applied) == len(manifests), result.stdout
    assert all(line.endswith("serverside-applied (server dry run)") for line in applied), result.stdout
    # The Namespace (now applied) asks for warnings against the restricted Pod Security Standard.
    assert "Warning" not in result.stderr, result.stderr


def test_the_pod_security_check_does_catch_a_pod_that_breaks_the_standard(cluster, manifests):
    broken = copy.deepcopy(manifests)
    [deployment] = [o for o in broken if o["kind"] == "Deployment" and o["metadata"]["name"] == EXTENDER]
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        del container["securityContext"]["capabilities"]
    result = dry_run(cluster, broken)
    assert "would violate PodSecurity" in result.stderr, result.stderr


def test_every_call_of_the_code_is_allowed(cluster, manifests):
    needed = sorted({access for _, accesses in API_CALLS.values() for access in accesses})
    refused = [access for access in needed if not allowed(cluster, access)]
    assert not refused


def test_the_second_scheduler_may_elect_a_leader_authenticate_and_schedule(cluster, manifests):
    refused = [access for access in SCHEDULER_NEEDS if not allowed(cluster, access)]
    assert not refused


def test_nothing_else_is_allowed(cluster, manifests):
    needed = {access for _, accesses in API_CALLS.values() for access in accesses}
    assert not set(DENIED) & needed
    granted = [access for access in DENIED if allowed(cluster, access)]
    assert not granted
