"""manifests/ on a real API server: every object is accepted, and the RBAC allows the code's calls and nothing else.

The whole rendering goes through a server-side dry run (admission, Pod
Security included); only the RBAC objects and the admission policy are really
applied, then each ServiceAccount's accesses are put to the API server as
SubjectAccessReviews, and writes are made with the ServiceAccounts' own tokens:
the admission policy refuses what RBAC cannot tell apart, and migchain's own
borrows and returns, run as those accounts, still go through.
Everything applied is removed at the end; the migchain-system Namespace, which
the session uses, only loses the labels this test gave it.
"""

from __future__ import annotations

import copy
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extender.core.loan import LOAN_SIGNATURE_ANNOTATION, RESTARTS_ANNOTATION
from extender.kube.api import JSON_PATCH, ApiError, Connection, KubeApi, path
from tests.e2e.conftest import Cluster, Scenario
from tests.e2e.controlplane import BIN, Process, wait_until
from tests.e2e.fleet import create_node, mig_pod, replica_set
from tests.unit.test_manifests import (
    API_CALLS,
    CERTS,
    EXTENDER,
    LOAN_KEY,
    NAMESPACE,
    RETURNER,
    SCHEDULER,
    TEAM,
    Access,
    render,
)

pytestmark = pytest.mark.e2e

RBAC_KINDS = (
    "Namespace",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
)
POLICY = "migchain-pod-writes"
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
    # the binder and the returner: each only its verbs
    Access(RETURNER, "delete", "pods", TEAM),
    Access(RETURNER, "create", "pods", TEAM, subresource="binding"),
    Access(RETURNER, "update", "pods", TEAM),
    Access(RETURNER, "get", "secrets", NAMESPACE, name=LOAN_KEY),
    Access(RETURNER, "update", "leases", NAMESPACE, group=LEASES, name="migchain-scheduler"),
    Access(EXTENDER, "create", "pods", TEAM, subresource="eviction"),
    Access(EXTENDER, "patch", "pods", TEAM, subresource="status"),
    Access(EXTENDER, "update", "leases", NAMESPACE, group=LEASES, name="migchain-returner"),
    # the journal (whole pod specs, env values included): migchain's two accounts, nobody else
    Access(SCHEDULER, "list", "configmaps", NAMESPACE),
    Access(CERTS, "list", "configmaps", NAMESPACE),
    Access(LOAN_KEY, "list", "configmaps", NAMESPACE),
    Access("default", "list", "configmaps", NAMESPACE),
    Access(RETURNER, "get", "configmaps", NAMESPACE, name="migchain-journal-x"),
    Access(RETURNER, "list", "configmaps"),
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
    Access(EXTENDER, "list", "configmaps", NAMESPACE),  # RoleBinding to the Role migchain-journal
    Access(RETURNER, "list", "configmaps", NAMESPACE),  # the same RoleBinding's other subject
    Access(RETURNER, "create", "pods", TEAM, subresource="eviction"),  # ClusterRoleBinding migchain-returner
    Access(RETURNER, "update", "leases", NAMESPACE, group=LEASES, name="migchain-returner"),  # Role migchain-returner
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


# -- the admission policy, and migchain run as its own ServiceAccounts ---------------------------------------------

EAGER_GPU = "TEST-EAGER-GPU"  # covered by tests/fixtures/chains/e2e-eager.yaml, returnMode eager
DRY_RUN = {"dryRun": "All"}


def account_kubeconfig(cluster: Cluster, account: str, folder: Path) -> Path:
    """A kubeconfig with the ServiceAccount's own token (a TokenRequest): the identity its pod has."""
    request = cluster.api.create(
        path("api", "v1", "namespaces", NAMESPACE, "serviceaccounts", account, "token"),
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}},
    )
    kubeconfig = folder / f"{account}.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(cluster.plane.kubeconfig_document(request["status"]["token"])))
    return kubeconfig


def account_api(cluster: Cluster, account: str, folder: Path) -> KubeApi:
    return KubeApi(Connection.load(str(account_kubeconfig(cluster, account, folder))))


def refusal(write: Any) -> str:
    """The API server's message when it refuses `write` (a call), "" when the write went through."""
    try:
        write()
    except ApiError as error:
        return f"{error.status} {error.message}"
    return ""


def by_policy(message: str) -> bool:
    return message.startswith("403 ") and POLICY in message


def pods_of(namespace: str) -> str:
    return path("api", "v1", "namespaces", namespace, "pods")


def loan_shaped(name: str, test: str, node: str) -> dict[str, Any]:
    """A pod carrying a loan record of the shape migchain writes (its signature cannot be checked by CEL)."""
    annotations = {
        "migchain.io/original-requests": "nvidia.com/mig-1g.5gb=1",
        "migchain.io/borrowed-requests": "nvidia.com/mig-2g.10gb=1",
        "migchain.io/chain": "a100-40gb",
        "migchain.io/steps": "1",
        "migchain.io/original-resources": '{"containers/main":{"limits":{"nvidia.com/mig-1g.5gb":"1"}}}',
        "migchain.io/replaced-uid": "00000000-0000-0000-0000-000000000001",
        LOAN_SIGNATURE_ANNOTATION: "v1:" + "0" * 64,
    }
    pod = mig_pod(name, test, {"2g.10gb": 1}, annotations=annotations)
    pod["spec"]["nodeName"] = node
    # Within the restricted Pod Security Standard (migchain-system enforces it): only the policy refuses it there.
    pod["spec"]["securityContext"] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    pod["spec"]["containers"][0]["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    return pod


def privileged(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "hostPID": True,
            "containers": [{"name": "main", "image": "busybox", "securityContext": {"privileged": True}}],
        },
    }


def test_the_admission_policy_refuses_the_writes_rbac_cannot_tell_apart(cluster, manifests, scenario, tmp_path):
    extender, returner = account_api(cluster, EXTENDER, tmp_path), account_api(cluster, RETURNER, tmp_path)
    team = scenario.namespace
    cluster.plane.ensure_namespace("kube-system")
    # RBAC alone allows every one of these: it grants create and patch of pods whole.
    for access in (
        Access(EXTENDER, "create", "pods", "kube-system"),
        Access(EXTENDER, "create", "pods", team),
        Access(EXTENDER, "patch", "pods", team),
        Access(RETURNER, "create", "pods", "kube-system"),
        Access(RETURNER, "patch", "pods", team),
        Access(RETURNER, "patch", "pods", team, subresource="status"),
    ):
        assert allowed(cluster, access), access
    # The policy takes effect once the API server has compiled it: wait for its first refusal.
    started = time.monotonic()
    wait_until(
        lambda: by_policy(
            refusal(lambda: extender.request("POST", pods_of(team), mig_pod("plain", team, {}), query=DRY_RUN))
        ),
        30,
        "the admission policy to refuse a pod without a loan record",
    )
    in_force = time.monotonic() - started
    # A running pod of a tenant, written by its owner (the admin here).
    tenant_pod = mig_pod("tenant", team, {"1g.5gb": 1}, labels={"app": "tenant"})
    tenant_pod["metadata"]["finalizers"] = ["example.com/keep"]
    scenario.api.create(pods_of(team), tenant_pod)
    tenant = path("api", "v1", "namespaces", team, "pods", "tenant")
    image = [{"op": "replace", "path": "/spec/containers/0/image", "value": "evil:latest"}]
    refused = {
        "a privileged pod in kube-system (extender)": lambda: extender.create(pods_of("kube-system"), privileged("x")),
        "a privileged pod in kube-system (returner)": lambda: returner.create(pods_of("kube-system"), privileged("x")),
        "a loan-shaped pod in kube-system": lambda: extender.create(
            pods_of("kube-system"), loan_shaped("x", team, "some-node")
        ),
        "a loan-shaped pod in migchain-system": lambda: extender.create(
            pods_of(NAMESPACE), loan_shaped("x", team, "some-node")
        ),
        "a plain pod without a loan record (extender)": lambda: extender.create(
            pods_of(team), mig_pod("plain", team, {})
        ),
        "a plain pod without a loan record (returner)": lambda: returner.create(
            pods_of(team), mig_pod("plain", team, {})
        ),
        "a privileged pod with a forged restore record": lambda: returner.create(
            pods_of(team),
            {
                **privileged("x"),
                "metadata": {
                    "name": "x",
                    "annotations": {RESTARTS_ANNOTATION: "0", LOAN_SIGNATURE_ANNOTATION: "not-a-signature"},
                },
            },
        ),
        "a patch of a container image (extender)": lambda: extender.patch(tenant, image, content_type=JSON_PATCH),
        "a patch of a container image (returner)": lambda: returner.patch(tenant, image, content_type=JSON_PATCH),
        "a patch of a label": lambda: extender.patch(tenant, {"metadata": {"labels": {"app": "other"}}}),
        "a patch of a tenant's annotation": lambda: extender.patch(tenant, {"metadata": {"annotations": {"a": "b"}}}),
        "a patch of the tenant's own migchain.io/borrow": lambda: extender.patch(
            tenant, {"metadata": {"annotations": {"migchain.io/borrow": "true"}}}
        ),
        "a patch of another finalizer": lambda: extender.patch(tenant, {"metadata": {"finalizers": ["x.io/hold"]}}),
        "a patch that drops the tenant's finalizer": lambda: extender.patch(tenant, {"metadata": {"finalizers": []}}),
        "a patch of the status phase": lambda: returner.patch(tenant + "/status", {"status": {"phase": "Succeeded"}}),
    }
    answers = {what: refusal(write) for what, write in refused.items()}
    wrong = {what: answer for what, answer in answers.items() if not by_policy(answer)}
    assert not wrong, "\n".join(f"{what}: {answer}" for what, answer in wrong.items())
    # What migchain does write still goes through.
    node = f"gpu-{team}-a"
    admitted = {
        "a borrower (loan record, bound)": lambda: extender.request(
            "POST", pods_of(team), loan_shaped("borrower", team, node), query=DRY_RUN
        ),
        "the lowest deletion cost": lambda: extender.patch(
            tenant, {"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "-2147483648"}}}
        ),
        "migchain.io/requeued": lambda: extender.patch(
            tenant, {"metadata": {"annotations": {"migchain.io/requeued": "1"}}}
        ),
        # (kube-controller-manager's Job controller soon takes the finalizer off this pod, which no Job owns:
        # the patches name the whole list, so that they apply either way.)
        "the Job tracking finalizer on": lambda: returner.patch(
            tenant, {"metadata": {"finalizers": ["example.com/keep", "batch.kubernetes.io/job-tracking"]}}
        ),
        "the Job tracking finalizer off": lambda: extender.patch(
            tenant, {"metadata": {"finalizers": ["example.com/keep"]}}
        ),
        "status.nominatedNodeName": lambda: returner.patch(
            tenant + "/status",
            [{"op": "add", "path": "/status/nominatedNodeName", "value": node}],
            content_type=JSON_PATCH,
        ),
    }
    answers = {what: refusal(write) for what, write in admitted.items()}
    wrong = {what: answer for what, answer in answers.items() if answer}
    assert not wrong, "\n".join(f"{what}: {answer}" for what, answer in wrong.items())
    pod = scenario.pod("tenant")
    assert pod["spec"]["containers"][0]["image"] != "evil:latest"
    assert pod["metadata"]["labels"] == {"app": "tenant"}
    assert pod["metadata"]["finalizers"] == ["example.com/keep"]
    scenario.api.patch(tenant, {"metadata": {"finalizers": None}})  # the namespace can go
    print(f"\npolicy in force after {in_force:.1f}s; {len(refused)} writes refused, {len(admitted)} admitted")


def restart_as(process: Process, kubeconfig: Path) -> None:
    process.stop()
    process.argv = [f"--kubeconfig={kubeconfig}" if a.startswith("--kubeconfig=") else a for a in process.argv]
    process.start()


def test_migchain_borrows_and_returns_as_its_own_service_accounts_under_the_policy(
    cluster, manifests, scenario: Scenario, tmp_path
):
    """The extender and the returner run with their ServiceAccounts' tokens: a bare pod borrows and is
    returned, a ReplicaSet's pod borrows, and the API server refuses none of it."""
    admin = str(cluster.plane.kubeconfig)
    returner = cluster.plane.processes["returner-returner-a"]  # the session's (others may have come and gone)
    logs = {process.name: process.log.stat().st_size for process in (cluster.extender, returner)}
    try:
        restart_as(cluster.extender, account_kubeconfig(cluster, EXTENDER, tmp_path))
        cluster.wait_extender_ready()
        restart_as(returner, account_kubeconfig(cluster, RETURNER, tmp_path))
        wait_until(lambda: cluster.lease_holder() == "returner-a", 60, "the returner to hold its lease")
        api, team = scenario.api, scenario.namespace
        create_node(api, f"gpu-{team}-a", EAGER_GPU, {"1g.5gb": 1, "2g.10gb": 1}, team)
        scenario.create_pod("filler", {"1g.5gb": 1})
        scenario.wait_bound("filler")
        scenario.create_pod("bare", {"1g.5gb": 1})
        borrower = wait_until(lambda: _borrowing(scenario.pod("bare")), 60, "the bare pod to borrow")
        assert borrower["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/mig-2g.10gb": "1"}
        scenario.set_phase("filler", "Succeeded")  # the 1g.5gb frees: eager return
        back = wait_until(lambda: _returned(scenario, "bare", borrower), 90, "the bare pod to be returned")
        assert back["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/mig-1g.5gb": "1"}
        assert back["metadata"]["annotations"][RESTARTS_ANNOTATION] == "1"
        # The 2g.10gb is free again: a ReplicaSet's pod borrows it (deletion cost, create, delete).
        api.create(
            path("apis", "apps", "v1", "namespaces", team, "replicasets"), replica_set("rs", team, {"1g.5gb": 1}, 1)
        )
        [owned] = wait_until(
            lambda: [p for p in scenario.pods() if p["metadata"]["name"].startswith("rs-") and _borrowing(p)],
            60,
            "the ReplicaSet's pod to borrow",
        )
        assert owned["spec"].get("nodeName") == f"gpu-{team}-a"
        wait_until(
            lambda: len([p for p in scenario.pods() if p["metadata"]["name"].startswith("rs-")]) == 1, 30, "one rs pod"
        )
        assert scenario.events("bare", "Borrowed") and scenario.events("bare", "Returning")
    finally:
        restart_as(cluster.extender, Path(admin))
        cluster.wait_extender_ready()
        restart_as(returner, Path(admin))
        wait_until(lambda: cluster.lease_holder() == "returner-a", 60, "the returner to hold its lease")
    for process in (cluster.extender, returner):
        with process.log.open("rb") as handle:
            handle.seek(logs[process.name])
            text = handle.read().decode(errors="replace")
        assert POLICY not in text and " 403" not in text, f"{process.name}: {text[-3000:]}"


def _borrowing(pod: dict[str, Any]) -> dict[str, Any] | None:
    return pod if "migchain.io/replaced-uid" in (pod["metadata"].get("annotations") or {}) else None


def _returned(scenario: Scenario, name: str, old: dict[str, Any]) -> dict[str, Any] | None:
    try:
        pod = scenario.pod(name)
    except ApiError:
        return None
    if pod["metadata"]["uid"] == old["metadata"]["uid"] or _borrowing(pod) or not pod["spec"].get("nodeName"):
        return None
    return pod


def test_a_borrow_cut_short_is_finished_under_the_policy_by_putting_the_original_back(
    cluster, manifests, scenario: Scenario, tmp_path
):
    """The extender, as its ServiceAccount, dies between deleting a bare pod and creating its replacement;
    meanwhile the node fills up. Recovery puts the original back: a create the policy must admit."""
    admin = Path(str(cluster.plane.kubeconfig))
    api, team = scenario.api, scenario.namespace
    node = f"gpu-{team}-a"
    create_node(api, node, "NVIDIA-A100-SXM4-40GB", {"2g.10gb": 1}, team)
    log_start = cluster.extender.log.stat().st_size
    extender_kubeconfig = account_kubeconfig(cluster, EXTENDER, tmp_path)
    try:
        cluster.extender.env = {**os.environ, "MIGCHAIN_FAILPOINTS": "bare-after-delete"}
        restart_as(cluster.extender, extender_kubeconfig)
        cluster.wait_extender_ready()
        original = scenario.create_pod("notebook", {"1g.5gb": 1})
        wait_until(lambda: not cluster.extender.alive(), 30, "the extender to die after deleting the original")
        # The 2g.10gb goes to another pod meanwhile: the replacement no longer fits.
        squatter = mig_pod("squatter", team, {"2g.10gb": 1})
        squatter["spec"]["nodeName"] = node
        api.create(pods_of(team), squatter)
        cluster.extender.env = None
        restart_as(cluster.extender, extender_kubeconfig)
        cluster.wait_extender_ready()
        back = wait_until(lambda: _exists(scenario, "notebook"), 60, "the original to be put back")
    finally:
        cluster.extender.env = None
        restart_as(cluster.extender, admin)
        cluster.wait_extender_ready()
    assert back["metadata"]["uid"] != original["metadata"]["uid"]
    annotations = back["metadata"]["annotations"]
    assert annotations[RESTARTS_ANNOTATION] == "0" and LOAN_SIGNATURE_ANNOTATION in annotations
    assert "migchain.io/replaced-uid" not in annotations
    assert back["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/mig-1g.5gb": "1"}
    with cluster.extender.log.open("rb") as handle:
        handle.seek(log_start)
        text = handle.read().decode(errors="replace")
    assert POLICY not in text, text[-3000:]


def _exists(scenario: Scenario, name: str) -> dict[str, Any] | None:
    try:
        return scenario.pod(name)
    except ApiError:
        return None


def test_of_every_subject_bound_in_the_cluster_only_migchains_two_accounts_may_read_the_journal(cluster, manifests):
    """Who can get or list ConfigMaps in migchain-system (journal entries hold whole pod specs, env values
    included), asked of the API server for every subject of every binding: migchain's two accounts, besides
    the cluster's own components and controllers (system:*, kube-system's accounts)."""
    subjects: set[tuple[str, str]] = set()
    for bindings in (
        path("apis", "rbac.authorization.k8s.io", "v1", "clusterrolebindings"),
        path("apis", "rbac.authorization.k8s.io", "v1", "namespaces", NAMESPACE, "rolebindings"),
    ):
        for binding in cluster.api.list_all(bindings)[0]:
            for subject in binding.get("subjects") or []:
                if subject["kind"] == "ServiceAccount":
                    subjects.add(("user", f"system:serviceaccount:{subject['namespace']}:{subject['name']}"))
                else:
                    subjects.add(("group" if subject["kind"] == "Group" else "user", subject["name"]))
    readers = set()
    for kind, name in subjects:
        if name.startswith("system:") and not name.startswith("system:serviceaccount:"):
            continue  # the cluster's own components and system:masters
        if name.startswith("system:serviceaccount:kube-system:"):
            continue  # kube-controller-manager's controllers (namespace deletion, garbage collection, quota)
        for verb in ("get", "list", "watch"):
            spec: dict[str, Any] = {
                "resourceAttributes": {"verb": verb, "resource": "configmaps", "namespace": NAMESPACE},
                **({"user": name} if kind == "user" else {"user": "someone", "groups": [name]}),
            }
            review = cluster.api.create(
                "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec},
            )
            if review.get("status", {}).get("allowed"):
                readers.add(name)
    assert readers == {f"system:serviceaccount:{NAMESPACE}:{account}" for account in (EXTENDER, RETURNER)}
