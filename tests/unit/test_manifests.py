"""manifests/, kind/ and the Dockerfile: they parse, render with the real `kubectl kustomize`, and agree with the code.

No cluster: tests/e2e/test_manifests.py sends the same rendering to a real
API server. API_CALLS below is the inventory of the code's Kubernetes API
calls and the access each needs; the e2e test asks the API server about each.
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from extender import __version__, cli, returner_cli, serve
from extender.certs import POLICY, service_hosts
from extender.config import load_rules
from extender.core.mig import MIG_RESOURCE_PREFIX

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
KIND = ROOT / "kind"
KUBECTL = ROOT / ".cache" / "kube" / "bin" / "kubectl"
NAMESPACE = "migchain-system"

EXTENDER = "migchain-extender"  # the ServiceAccount of the extender (the binder)
RETURNER = "migchain-returner"  # the ServiceAccount of the returner, a Deployment of its own
CERTS = "migchain-certs"
LOAN_KEY = "migchain-loan-key"  # the Job that makes the loan key's Secret, and that Secret
SCHEDULER = "migchain-scheduler"
# What `migchain certs` keeps: the CA with its key, the serving and the client certificate.
CERT_SECRETS = ("migchain-ca", "migchain-extender-tls", "migchain-scheduler-client-tls")
SCHEDULER_CLIENT_NAME = "migchain-scheduler"  # the common name `migchain certs` gives kube-scheduler's certificate


class Access(NamedTuple):
    """One access a ServiceAccount needs, in SubjectAccessReview terms. namespace "": cluster-wide or all."""

    account: str
    verb: str
    resource: str
    namespace: str = ""
    group: str = ""
    subresource: str = ""
    name: str = ""


# Any namespace of the cluster's users: the extender places and moves their pods.
TEAM = "team-a"

# Every KubeApi call site in extender/, by file and method, and the accesses
# it needs. A new call (or one gone) fails test_the_api_call_inventory_is_current
# until this table, manifests/rbac-*.yaml and manifests/README.md are revisited.
API_CALLS: dict[tuple[str, str], tuple[int, list[Access]]] = {
    ("extender/kube/cache.py", "list_all"): (
        1,
        [Access(account, "list", resource) for account in (EXTENDER, RETURNER) for resource in ("nodes", "pods")],
    ),
    ("extender/kube/cache.py", "watch"): (
        1,
        [Access(account, "watch", resource) for account in (EXTENDER, RETURNER) for resource in ("nodes", "pods")],
    ),
    ("extender/kube/binder.py", "get"): (2, [Access(EXTENDER, "get", "pods", TEAM)]),
    ("extender/kube/binder.py", "create"): (1, [Access(EXTENDER, "create", "pods", TEAM, subresource="binding")]),
    ("extender/kube/events.py", "create"): (
        1,
        [Access(EXTENDER, "create", "events", TEAM), Access(RETURNER, "create", "events", TEAM)],
    ),
    # The executor runs in both processes: the binder's borrows, the returner's returns and preemptions.
    ("extender/kube/executor.py", "create"): (
        4,
        [
            Access(EXTENDER, "create", "pods", TEAM),  # the borrower, a journaled pod back
            # What OwnerReferencesPermissionEnforcement asks of a create of a pod whose ownerReference to its
            # ReplicaSet or Job sets blockOwnerDeletion (tests/e2e/test_owner_references_permission.py).
            Access(EXTENDER, "update", "replicasets", TEAM, group="apps", subresource="finalizers"),
            Access(EXTENDER, "update", "jobs", TEAM, group="batch", subresource="finalizers"),
            Access(RETURNER, "create", "pods", TEAM),  # a bare pod restored
            Access(RETURNER, "create", "pods", TEAM, subresource="eviction"),
            Access(EXTENDER, "create", "configmaps", NAMESPACE),
            Access(RETURNER, "create", "configmaps", NAMESPACE),
        ],
    ),
    ("extender/kube/executor.py", "delete"): (
        2,
        [
            Access(EXTENDER, "delete", "pods", TEAM),  # the pending original a borrow replaces
            Access(EXTENDER, "delete", "configmaps", NAMESPACE),
            Access(RETURNER, "delete", "configmaps", NAMESPACE),
        ],
    ),
    ("extender/kube/executor.py", "get"): (
        2,
        [Access(EXTENDER, "get", "pods", TEAM), Access(RETURNER, "get", "pods", TEAM)],
    ),
    ("extender/kube/executor.py", "list_all"): (
        2,  # the journal, and its entries' ages
        [Access(EXTENDER, "list", "configmaps", NAMESPACE), Access(RETURNER, "list", "configmaps", NAMESPACE)],
    ),
    # A dry-run create of the copy before anything is deleted or evicted.
    ("extender/kube/executor.py", "request"): (
        1,
        [Access(EXTENDER, "create", "pods", TEAM), Access(RETURNER, "create", "pods", TEAM)],
    ),
    ("extender/kube/executor.py", "patch"): (
        4,
        [
            Access(EXTENDER, "patch", "pods", TEAM),  # deletion cost, the original's Job tracking finalizer
            Access(RETURNER, "patch", "pods", TEAM),  # a returned Job pod's tracking finalizer
            Access(RETURNER, "patch", "pods", TEAM, subresource="status"),  # nominate
        ],
    ),
    ("extender/kube/requeue.py", "patch"): (1, [Access(EXTENDER, "patch", "pods", TEAM)]),
    ("extender/kube/lease.py", "create"): (
        1,
        [
            Access(RETURNER, "create", "leases", NAMESPACE, group="coordination.k8s.io"),
            Access(EXTENDER, "create", "leases", NAMESPACE, group="coordination.k8s.io"),
        ],
    ),
    ("extender/kube/lease.py", "get"): (
        1,
        [
            Access(RETURNER, "get", "leases", NAMESPACE, group="coordination.k8s.io", name="migchain-returner"),
            Access(EXTENDER, "get", "leases", NAMESPACE, group="coordination.k8s.io", name="migchain-extender"),
        ],
    ),
    ("extender/kube/lease.py", "request"): (  # PUT
        1,
        [
            Access(RETURNER, "update", "leases", NAMESPACE, group="coordination.k8s.io", name="migchain-returner"),
            Access(EXTENDER, "update", "leases", NAMESPACE, group="coordination.k8s.io", name="migchain-extender"),
        ],
    ),
    ("extender/kube/returner.py", "get"): (2, [Access(RETURNER, "get", "pods", TEAM)]),
    ("extender/kube/preemptor.py", "get"): (1, [Access(RETURNER, "get", "pods", TEAM)]),
    # The admin's commands (`migchain status`, ...) with the user's kubeconfig, or
    # in the extender's pod (kubectl exec) with its ServiceAccount.
    ("extender/kube/status.py", "list_all"): (
        2,
        [Access(EXTENDER, "list", "nodes"), Access(EXTENDER, "list", "pods")],
    ),
    ("extender/kube/snapshot.py", "list_all"): (
        2,
        [Access(EXTENDER, "list", "nodes"), Access(EXTENDER, "list", "pods")],
    ),
    # `migchain certs`, run by the migchain-certs Job and the migchain-certs-renewal CronJob.
    ("extender/kube/certs.py", "get"): (
        2,
        [
            *(Access(CERTS, "get", "secrets", NAMESPACE, name=secret) for secret in CERT_SECRETS),
            Access(CERTS, "get", "deployments", NAMESPACE, group="apps", name=SCHEDULER),
        ],
    ),
    ("extender/kube/certs.py", "create"): (1, [Access(CERTS, "create", "secrets", NAMESPACE)]),
    ("extender/kube/certs.py", "request"): (  # PUT
        1,
        [Access(CERTS, "update", "secrets", NAMESPACE, name=secret) for secret in CERT_SECRETS],
    ),
    ("extender/kube/certs.py", "patch"): (
        1,
        [Access(CERTS, "patch", "deployments", NAMESPACE, group="apps", name=SCHEDULER)],
    ),
    # `migchain loan-key`, run by the migchain-loan-key Job (the admin's commands read the Secret with the
    # user's kubeconfig, if they may).
    ("extender/kube/loan_key.py", "get"): (1, [Access(LOAN_KEY, "get", "secrets", NAMESPACE, name=LOAN_KEY)]),
    ("extender/kube/loan_key.py", "create"): (1, [Access(LOAN_KEY, "create", "secrets", NAMESPACE)]),
}

# The re-carver's calls (extender/kube/recarver.py, only with --recarve): granted by the component manifests/recarve/,
# not by the base (the MIG Manager's ConfigMap lives in the GPU Operator's namespace, which the base must not need).
GPU_OPERATOR = "gpu-operator"
MIG_CONFIG = "custom-mig-config"
RECARVE_CALLS: dict[tuple[str, str], tuple[int, list[Access]]] = {
    ("extender/kube/recarver.py", "get"): (
        2,  # the ConfigMap; the Node, for its taints and resourceVersion, before each write of the record
        [Access(RETURNER, "get", "configmaps", GPU_OPERATOR, name=MIG_CONFIG), Access(RETURNER, "get", "nodes")],
    ),
    ("extender/kube/recarver.py", "list_all"): (
        2,  # the opted-in nodes' records at a new term; the pods on a node just before its label is set
        [Access(RETURNER, "list", "nodes"), Access(RETURNER, "list", "pods")],
    ),
    ("extender/kube/recarver.py", "patch"): (
        2,  # the record, the label and the taint on the Node; the named config in the ConfigMap
        [Access(RETURNER, "patch", "nodes"), Access(RETURNER, "patch", "configmaps", GPU_OPERATOR, name=MIG_CONFIG)],
    ),
}

API_CALL = re.compile(r"\bapi\.(get|create|patch|delete|list_all|watch|request)\(")


def render() -> list[dict[str, Any]]:
    """`kubectl kustomize manifests/` with the kubectl built for the e2e tests, as objects."""
    if not KUBECTL.exists():
        pytest.skip(f"{KUBECTL} is not built: run `make control-plane` (make test does)")
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(MANIFESTS)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render()


def the(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def pod_spec(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return template_spec(the(objects, kind, name))


def template_spec(workload: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a Deployment, a Job or a CronJob."""
    spec = workload["spec"]
    spec = spec["jobTemplate"]["spec"] if workload["kind"] == "CronJob" else spec
    found: dict[str, Any] = spec["template"]["spec"]
    return found


WORKLOADS = ("Deployment", "Job", "CronJob")


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [c for c in spec["containers"] if c["name"] == name]
    return dict(found)


def argv(c: dict[str, Any]) -> list[str]:
    return [*c.get("command", []), *c.get("args", [])]


def mount_path(spec: dict[str, Any], c: dict[str, Any], source: str, name: str) -> str:
    """Where container c mounts the volume of that Secret (source "secret") or ConfigMap ("configMap"), as a folder."""
    field = "secretName" if source == "secret" else "name"
    volumes = {v["name"] for v in spec["volumes"] if (v.get(source) or {}).get(field) == name}
    [path] = [m["mountPath"] for m in c["volumeMounts"] if m["name"] in volumes]
    assert not any(m.get("subPath") for m in c["volumeMounts"] if m["name"] in volumes)
    return str(path)


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return int(number)


def dockerfile_uid() -> int:
    text = (ROOT / "Dockerfile").read_text()
    [uid] = re.findall(r"useradd --uid (\d+)", text)
    [user] = re.findall(r"^USER (\d+)", text, re.MULTILINE)
    assert user.startswith(uid) or user == uid
    return int(uid)


# -- files --------------------------------------------------------------------


def test_every_yaml_file_of_manifests_and_kind_parses_into_kubernetes_style_objects():
    paths = sorted([*MANIFESTS.rglob("*.yaml"), *KIND.rglob("*.yaml")])
    assert MANIFESTS / "kustomization.yaml" in paths
    assert KIND / "cluster.yaml" in paths
    for path in paths:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert documents, f"{path} is empty"
        for document in documents:
            assert isinstance(document, dict), path
            assert document.get("apiVersion") and document.get("kind"), f"{path}: a document without apiVersion/kind"


def test_the_copies_under_manifests_are_the_files_of_chains_and_scheduler_config():
    copies = MANIFESTS / "copies"
    shipped = {p.name for p in (ROOT / "chains").glob("*.yaml")}
    assert {p.name for p in (copies / "chains").glob("*.yaml")} == shipped, "run `make manifests`"
    for name in shipped:
        assert (copies / "chains" / name).read_bytes() == (ROOT / "chains" / name).read_bytes(), (
            f"manifests/copies/chains/{name} differs from chains/{name}: run `make manifests`"
        )
    assert (copies / "scheduler-config.yaml").read_bytes() == (ROOT / "scheduler-config.yaml").read_bytes(), (
        "manifests/copies/scheduler-config.yaml differs from scheduler-config.yaml: run `make manifests`"
    )


# -- the rendering ------------------------------------------------------------


CLUSTER_KINDS = (
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
)


def test_kustomize_renders_every_object_into_its_namespace(rendered):
    kinds = Counter(o["kind"] for o in rendered)
    assert kinds == {
        "Namespace": 1,
        "ServiceAccount": 5,
        "ClusterRole": 2,
        "ClusterRoleBinding": 4,
        "Role": 6,
        "RoleBinding": 7,
        "ConfigMap": 2,
        "Service": 2,
        "Deployment": 3,
        "Job": 2,
        "CronJob": 1,
        "NetworkPolicy": 2,
        "ValidatingAdmissionPolicy": 1,
        "ValidatingAdmissionPolicyBinding": 1,
    }
    for o in rendered:
        namespace = o["metadata"].get("namespace")
        if o["kind"] in CLUSTER_KINDS:
            assert namespace is None
        elif o["metadata"]["name"] == "migchain-scheduler-extension-apiserver-authentication-reader":
            assert namespace == "kube-system"
        else:
            assert namespace == NAMESPACE, f"{o['kind']} {o['metadata']['name']} would land in {namespace}"
    assert the(rendered, "Namespace", NAMESPACE)["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == (
        "restricted"
    )


def test_the_chain_configmap_holds_every_chain_file_verbatim_and_both_processes_mount_it(rendered):
    chains = the(rendered, "ConfigMap", "migchain-chains")  # a fixed name: it changes in place
    assert chains["data"] == {p.name: p.read_text() for p in (ROOT / "chains").glob("*.yaml")}
    for name in ("extender", "returner"):
        spec = pod_spec(rendered, "Deployment", f"migchain-{name}")
        assert mount_path(spec, container(spec, name), "configMap", "migchain-chains") == "/etc/migchain/chains"


def test_the_scheduler_configmap_is_scheduler_config_yaml_byte_for_byte(rendered):
    [config] = [
        o
        for o in rendered
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("migchain-scheduler-config-")  # hashed
    ]
    assert config["data"] == {"scheduler-config.yaml": (ROOT / "scheduler-config.yaml").read_text()}
    spec = pod_spec(rendered, "Deployment", "migchain-scheduler")
    scheduler = container(spec, "kube-scheduler")
    folder = mount_path(spec, scheduler, "configMap", config["metadata"]["name"])
    assert argv(scheduler) == ["kube-scheduler", f"--config={folder}/scheduler-config.yaml"]


def test_every_pod_runs_locked_down_as_the_dockerfile_user_with_resources_and_a_tmp(rendered):
    workloads = [o for o in rendered if o["kind"] in WORKLOADS]
    assert len(workloads) == 6
    uid = dockerfile_uid()
    for workload in workloads:
        where = f"{workload['kind']} {workload['metadata']['name']}"
        spec = template_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] == uid, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert not any("hostPath" in v for v in spec.get("volumes", [])), where
        assert not spec.get("hostNetwork"), where
        tmp = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            context = c["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert context["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert context["capabilities"] == {"drop": ["ALL"]}, (where, c["name"])
            assert not context.get("privileged"), (where, c["name"])
            for bound in ("requests", "limits"):
                assert set(c["resources"][bound]) >= {"cpu", "memory"}, (where, c["name"], bound)
            assert any(m["mountPath"] == "/tmp" and m["name"] in tmp for m in c["volumeMounts"]), (where, c["name"])


def test_the_extender_is_probed_over_plain_http_on_its_health_port_not_on_the_verbs_port(rendered):
    spec = pod_spec(rendered, "Deployment", "migchain-extender")
    extender = container(spec, "extender")
    args = serve.parser().parse_args(argv(extender)[1:])
    health = int(args.health_bind.rsplit(":", 1)[1])
    assert args.health_bind.startswith("0.0.0.0:")  # kubelet probes the pod IP
    assert health != int(args.bind.rsplit(":", 1)[1])
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = extender[probe]["httpGet"]
        assert (get["path"], get.get("scheme", "HTTP"), port_number(extender, get["port"])) == (path, "HTTP", health)
        assert "httpHeaders" not in get


def test_the_returner_is_probed_on_its_health_port(rendered):
    spec = pod_spec(rendered, "Deployment", RETURNER)
    returner = container(spec, "returner")
    port = int(returner_cli.parser().parse_args(argv(returner)[1:]).health_bind.rsplit(":", 1)[1])
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = returner[probe]["httpGet"]
        assert (get["path"], port_number(returner, get["port"])) == (path, port)


def test_the_binder_and_the_returner_are_pods_of_their_own_each_with_its_own_service_account(rendered):
    """A pod has one ServiceAccount: the returner is a Deployment of its own, so each process gets only its verbs."""
    extender, returner = pod_spec(rendered, "Deployment", EXTENDER), pod_spec(rendered, "Deployment", RETURNER)
    assert [c["name"] for c in extender["containers"]] == ["extender"]
    assert [c["name"] for c in returner["containers"]] == ["returner"]
    assert (extender["serviceAccountName"], returner["serviceAccountName"]) == (EXTENDER, RETURNER)
    granted = _granted(rendered)

    def verbs(account: str) -> set[tuple[str, str]]:
        return {(resource, verb) for who, _, _, resource, verb, _ in granted if who == account}

    # the returner never deletes a pod, never binds one; the binder never evicts or nominates, and each elects its
    # own leader only
    assert not verbs(RETURNER) & {("pods", "delete"), ("pods/binding", "create")}
    assert not verbs(EXTENDER) & {("pods/eviction", "create"), ("pods/status", "patch")}
    leases = {(who, names) for who, _, _, resource, verb, names in granted if (resource, verb) == ("leases", "update")}
    leases.discard((SCHEDULER, ("migchain-scheduler",)))  # kube-scheduler's own
    assert leases == {(EXTENDER, ("migchain-extender",)), (RETURNER, ("migchain-returner",))}


def test_the_scheduler_is_probed_on_its_secure_port(rendered):
    scheduler = container(pod_spec(rendered, "Deployment", "migchain-scheduler"), "kube-scheduler")
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        get = scheduler[probe]["httpGet"]
        assert (get["path"], get["scheme"], port_number(scheduler, get["port"])) == (path, "HTTPS", 10259)


def test_migchain_extender_accepts_its_flags_serves_mutual_tls_and_loads_mounted_rules_that_go_together(rendered):
    spec = pod_spec(rendered, "Deployment", "migchain-extender")
    extender = container(spec, "extender")
    assert argv(extender)[0] == "migchain-extender"
    args = serve.parser().parse_args(argv(extender)[1:])
    assert args.bind == "0.0.0.0:8443"
    tls = mount_path(spec, extender, "secret", "migchain-extender-tls")
    assert (args.tls_cert_file, args.tls_key_file, args.client_ca_file) == (
        f"{tls}/tls.crt",
        f"{tls}/tls.key",
        f"{tls}/ca.crt",
    )
    # The verbs answer only the certificate the certs Job issues kube-scheduler.
    assert args.client_identity == [SCHEDULER_CLIENT_NAME]
    chains = mount_path(spec, extender, "configMap", "migchain-chains")
    assert all(Path(path).parent == Path(chains) for path in args.chains)
    names = [Path(path).name for path in args.chains]
    assert set(names) <= set(the(rendered, "ConfigMap", "migchain-chains")["data"])
    load_rules([ROOT / "chains" / name for name in names])  # raises if they conflict
    env = {e["name"]: e for e in extender["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_the_pinned_client_identity_is_the_name_migchain_certs_gives_the_schedulers_certificate(rendered, tmp_path):
    assert cli.main(["certs", "--out", str(tmp_path)]) == 0
    certificate = x509.load_pem_x509_certificate((tmp_path / "migchain-scheduler-client-tls" / "tls.crt").read_bytes())
    names = [attribute.value for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    extender = container(pod_spec(rendered, "Deployment", "migchain-extender"), "extender")
    assert names == serve.parser().parse_args(argv(extender)[1:]).client_identity == [SCHEDULER_CLIENT_NAME]


def test_migchain_returner_accepts_its_flags_uses_the_extenders_rules_and_the_pod_name_as_lease_identity(rendered):
    spec = pod_spec(rendered, "Deployment", RETURNER)
    returner = container(spec, "returner")
    assert argv(returner)[0] == "migchain-returner"
    args = returner_cli.parser().parse_args(argv(returner)[1:])
    extender_spec = pod_spec(rendered, "Deployment", EXTENDER)
    extender_args = serve.parser().parse_args(argv(container(extender_spec, "extender"))[1:])
    assert args.chains == extender_args.chains  # a loan is returned by the rules it was made under
    assert args.health_bind.startswith("0.0.0.0:")  # kubelet probes the pod IP
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in returner["env"]}
    assert args.identity == "$(POD_NAME)"  # kubelet expands it
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    assert spec["serviceAccountName"] == RETURNER
    chains = mount_path(spec, returner, "configMap", "migchain-chains")
    assert all(Path(path).parent == Path(chains) for path in args.chains)


def test_two_extender_replicas_behind_their_service_a_rollout_that_cannot_stall_and_no_budget_to_block_a_drain(
    rendered,
):
    deployment = the(rendered, "Deployment", "migchain-extender")
    assert deployment["spec"]["replicas"] == 2
    # Only the leader is ever ready: a rollout that waited for a new pod to be ready before retiring the old
    # leader would wait for good; so it may take both old pods down (one failover).
    rolling = deployment["spec"]["strategy"]
    assert rolling["type"] == "RollingUpdate"
    assert rolling["rollingUpdate"]["maxUnavailable"] == deployment["spec"]["replicas"]
    assert rolling["rollingUpdate"]["maxSurge"] >= 1  # the new pods start while the old ones go
    spread = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    [term] = spread["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = the(rendered, "Service", "migchain-extender")
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert set(ports) == {"https", "health"}
    extender = container(deployment["spec"]["template"]["spec"], "extender")
    assert ports["https"]["port"] == 443
    assert port_number(extender, ports["https"]["targetPort"]) == 8443
    health = serve.parser().parse_args(argv(extender)[1:]).health_bind
    assert port_number(extender, ports["health"]["targetPort"]) == int(health.rsplit(":", 1)[1])
    # The returner's /metrics: a Service of its own, on its pods.
    returner_deployment = the(rendered, "Deployment", RETURNER)
    returner = container(returner_deployment["spec"]["template"]["spec"], "returner")
    returner_service = the(rendered, "Service", RETURNER)
    assert (
        returner_service["spec"]["selector"].items()
        <= returner_deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert not returner_service["spec"]["selector"].items() <= labels.items()
    [metrics] = returner_service["spec"]["ports"]
    health = returner_cli.parser().parse_args(argv(returner)[1:]).health_bind
    assert port_number(returner, metrics["targetPort"]) == int(health.rsplit(":", 1)[1])
    # A budget would count one healthy pod of two for good, and block every drain of the leader's node.
    assert not [o for o in rendered if o["kind"] == "PodDisruptionBudget"]


def test_each_extender_replica_names_itself_on_the_lease_and_its_readiness_follows_the_lease_within_seconds(rendered):
    extender = container(pod_spec(rendered, "Deployment", "migchain-extender"), "extender")
    args = serve.parser().parse_args(argv(extender)[1:])
    assert args.identity == "$(POD_NAME)"  # kubelet expands it
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in extender["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    assert serve.lease_problem(args.lease_duration, args.lease_renew) == ""
    probe = extender["readinessProbe"]
    # The Service follows a failover within two probe periods.
    assert probe["periodSeconds"] * probe["failureThreshold"] <= 2
    assert probe["periodSeconds"] <= args.lease_renew


def admitted_ports(rendered: list[dict[str, Any]], name: str) -> dict[int, list[dict[str, Any]]]:
    """Port -> the peers NetworkPolicy `name` admits to the pods of Deployment `name`."""
    policy = the(rendered, "NetworkPolicy", name)["spec"]
    template = the(rendered, "Deployment", name)["spec"]["template"]
    assert policy["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]  # everything not admitted below is dropped
    containers = template["spec"]["containers"]

    def number(port: int | str) -> int:
        [found] = [p["containerPort"] for c in containers for p in c.get("ports", []) if port in (p["name"], p)]
        return int(found)

    admitted: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every client"
        assert all("ipBlock" not in peer for peer in rule["from"])
        for port in rule["ports"]:
            assert port["protocol"] == "TCP"
            admitted.setdefault(number(port["port"]), []).extend(rule["from"])
    return admitted


def test_the_network_policy_admits_only_the_scheduler_to_the_verbs_and_only_monitoring_to_the_health_ports(rendered):
    template = the(rendered, "Deployment", EXTENDER)["spec"]["template"]
    admitted = admitted_ports(rendered, EXTENDER)
    scheduler_labels = the(rendered, "Deployment", "migchain-scheduler")["spec"]["template"]["metadata"]["labels"]
    verbs = int(serve.parser().parse_args(argv(container(template["spec"], "extender"))[1:]).bind.rsplit(":", 1)[1])
    [scheduler] = admitted.pop(verbs)
    assert set(scheduler) == {"podSelector"}  # this namespace, these pods, no other
    assert scheduler["podSelector"]["matchLabels"].items() <= scheduler_labels.items()
    extender_health = serve.parser().parse_args(argv(container(template["spec"], "extender"))[1:]).health_bind
    returner = container(pod_spec(rendered, "Deployment", RETURNER), "returner")
    returner_health = returner_cli.parser().parse_args(argv(returner)[1:]).health_bind
    returner_admitted = admitted_ports(rendered, RETURNER)  # the returner serves nothing but its health port
    assert set(admitted) == {int(extender_health.rsplit(":", 1)[1])}
    assert set(returner_admitted) == {int(returner_health.rsplit(":", 1)[1])}
    for peers in [*admitted.values(), *returner_admitted.values()]:
        assert peers == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def test_the_scheduler_deployment_matches_scheduler_config_yaml(rendered):
    config = yaml.safe_load((ROOT / "scheduler-config.yaml").read_text())
    spec = pod_spec(rendered, "Deployment", "migchain-scheduler")
    assert spec["serviceAccountName"] == SCHEDULER
    scheduler = container(spec, "kube-scheduler")
    [extender] = config["extenders"]
    # the client certificate and CA come from the Secret the certs Job makes
    tls = mount_path(spec, scheduler, "secret", "migchain-scheduler-client-tls")
    assert {Path(path).parent for path in extender["tlsConfig"].values()} == {Path(tls)}
    assert {Path(path).name for path in extender["tlsConfig"].values()} == {"ca.crt", "tls.crt", "tls.key"}
    # the URL is the Service's, on its port
    url = urlsplit(extender["urlPrefix"])
    service = the(rendered, "Service", "migchain-extender")
    assert url.scheme == "https"
    assert url.hostname == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert url.port == service["spec"]["ports"][0]["port"]
    # the leader-election lease is the one its Role may update
    election = config["leaderElection"]
    role = the(rendered, "Role", SCHEDULER)
    assert role["metadata"]["namespace"] == election["resourceNamespace"]
    [named] = [rule for rule in role["rules"] if rule.get("resourceNames")]
    assert named["resourceNames"] == [election["resourceName"]]
    assert set(named["verbs"]) == {"get", "update"}
    assert config["clientConnection"]["kubeconfig"] == ""  # in-cluster: its ServiceAccount
    bound = {
        b["roleRef"]["name"]
        for b in rendered
        if b["kind"] in ("ClusterRoleBinding", "RoleBinding") and b["subjects"][0]["name"] == SCHEDULER
    }
    assert bound == {
        "system:kube-scheduler",
        "system:volume-scheduler",
        "extension-apiserver-authentication-reader",
        SCHEDULER,
    }


def test_the_scheduler_image_is_the_kubernetes_version_the_e2e_suite_runs(rendered):
    if not KUBECTL.exists():
        pytest.skip(f"{KUBECTL} is not built")
    version = subprocess.run(
        [str(KUBECTL), "version", "--client", "-o", "json"], capture_output=True, text=True, check=True, timeout=30
    )
    git_version = yaml.safe_load(version.stdout)["clientVersion"]["gitVersion"]
    scheduler = container(pod_spec(rendered, "Deployment", "migchain-scheduler"), "kube-scheduler")
    assert scheduler["image"] == f"registry.k8s.io/kube-scheduler:{git_version}"


def test_the_certs_job_makes_exactly_the_secrets_the_deployments_mount(rendered):
    job = the(rendered, "Job", "migchain-certs")
    assert job["spec"]["backoffLimit"] > 0
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    spec = job["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == CERTS
    assert spec["restartPolicy"] in ("Never", "OnFailure")
    [certs] = spec["containers"]
    assert argv(certs)[0] == "migchain"
    args = cli.parser().parse_args(argv(certs)[1:])
    assert args.run is cli._certs
    assert args.out is None  # Secrets, not files
    assert args.namespace == job["metadata"]["namespace"]
    assert args.service == the(rendered, "Service", "migchain-extender")["metadata"]["name"]
    mounted = {
        v["secret"]["secretName"]
        for kind, name in (("Deployment", "migchain-extender"), ("Deployment", "migchain-scheduler"))
        for v in pod_spec(rendered, kind, name)["volumes"]
        if "secret" in v
    }
    assert {args.server_secret, args.client_secret} == mounted - {LOAN_KEY}
    assert args.ca_secret not in mounted  # the CA's key is in no pod but the certs Job's (and read over the API)
    assert args.scheduler_deployment == SCHEDULER
    rules = the(rendered, "Role", CERTS)["rules"]
    [secrets] = [rule for rule in rules if rule.get("resourceNames") and rule["resources"] == ["secrets"]]
    assert set(secrets["resourceNames"]) == {*mounted - {LOAN_KEY}, args.ca_secret} == set(CERT_SECRETS)
    [deployments] = [rule for rule in rules if rule["resources"] == ["deployments"]]
    assert deployments["resourceNames"] == [SCHEDULER]


def test_the_certs_cronjob_runs_the_install_jobs_command_often_enough_to_renew_in_time(rendered):
    job, cron = the(rendered, "Job", CERTS), the(rendered, "CronJob", "migchain-certs-renewal")
    spec, cron_spec = template_spec(job), template_spec(cron)
    assert argv(container(cron_spec, "certs")) == argv(container(spec, "certs"))
    assert cron_spec["serviceAccountName"] == spec["serviceAccountName"] == CERTS
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"  # never two CAs made at once
    minute, hour, *rest = cron["spec"]["schedule"].split()
    assert minute.isdigit() and hour.startswith("*/") and rest == ["*", "*", "*"]
    # Runs every few hours: many chances within the 30-day renewal window, and
    # each step of a CA rotation (after its hour to settle) waits one run at most.
    every = int(hour.removeprefix("*/"))
    assert every <= 6
    assert every * 3600 <= 24 * 3600 < POLICY.leaf_renew_before.total_seconds()
    assert POLICY.problems() == []


def test_only_the_certs_account_may_read_the_ca_key(rendered):
    readers = {
        account
        for account, namespace, group, resource, verb, names in _granted(rendered)
        if resource == "secrets" and verb in ("get", "list", "watch") and (not names or "migchain-ca" in names)
    }
    assert readers == {CERTS}


def test_only_the_binder_and_the_returner_may_read_the_journal_through_one_role_of_its_own(rendered):
    """Journal entries hold whole pod specs, env values included: only migchain's two processes read them."""
    readers = {
        (account, role)
        for account, role, resource, verb in _granted_roles(rendered)
        if resource in ("configmaps", "*") and verb in ("get", "list", "watch", "*")
    }
    assert readers == {(EXTENDER, "Role/migchain-journal"), (RETURNER, "Role/migchain-journal")}
    role = the(rendered, "Role", "migchain-journal")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "delete", "list"]}]


def _granted_roles(rendered: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(account, Kind/name of the role, resource, verb) of migchain's own roles."""
    found = []
    for binding in rendered:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        ref = binding["roleRef"]
        roles = [o for o in rendered if o["kind"] == ref["kind"] and o["metadata"]["name"] == ref["name"]]
        for role in roles:
            for subject in binding["subjects"]:
                for rule in role["rules"]:
                    for resource in rule["resources"]:
                        for verb in rule["verbs"]:
                            found.append((subject["name"], f"{ref['kind']}/{ref['name']}", resource, verb))
    return found


def render_with_cert_manager(tmp_path: Path) -> list[dict[str, Any]]:
    """manifests/ with the cert-manager component, as an overlay of a user renders it."""
    if not KUBECTL.exists():
        pytest.skip(f"{KUBECTL} is not built")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    up = os.path.relpath(MANIFESTS, overlay)  # kustomize takes relative paths only
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [up], "components": [f"{up}/cert-manager"]})
    )
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def test_with_cert_manager_the_same_secrets_are_issued_and_renewed_and_the_certs_jobs_are_gone(tmp_path, rendered):
    objects = render_with_cert_manager(tmp_path)
    kinds = Counter(o["kind"] for o in objects)
    assert kinds["Certificate"] == 3 and kinds["Issuer"] == 2
    certs_objects = [o for o in objects if o["metadata"]["name"] in (CERTS, "migchain-certs-renewal")]
    assert not certs_objects  # the loan key's Job stays: cert-manager does not make it
    assert {o["kind"] for o in objects} - {"Certificate", "Issuer"} == {o["kind"] for o in rendered} - {"CronJob"}
    certificates = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "Certificate"}
    ca = certificates.pop("migchain-ca")
    assert ca["isCA"] is True
    assert ca["privateKey"]["rotationPolicy"] == "Never"  # a renewed CA verifies what the old one signed
    assert hours(ca["renewBefore"]) > max(hours(c["duration"]) for c in certificates.values())
    mounted = {
        v["secret"]["secretName"]
        for name in ("migchain-extender", RETURNER, SCHEDULER)
        for v in pod_spec(objects, "Deployment", name)["volumes"]
        if "secret" in v
    }
    assert {c["secretName"] for c in certificates.values()} == mounted - {LOAN_KEY}
    issuer = the(objects, "Issuer", ca["secretName"])
    assert issuer["spec"]["ca"]["secretName"] == ca["secretName"]
    service = the(objects, "Service", "migchain-extender")["metadata"]
    serving, client = certificates["migchain-extender-tls"], certificates["migchain-scheduler-client-tls"]
    assert tuple(serving["dnsNames"]) == service_hosts(service["name"], service["namespace"])
    assert "server auth" in serving["usages"] and "client auth" not in serving["usages"]
    assert "client auth" in client["usages"] and "server auth" not in client["usages"]
    for spec in (serving, client):
        assert spec["issuerRef"] == {"name": issuer["metadata"]["name"], "kind": "Issuer"}
        assert hours(spec["duration"]) == POLICY.leaf_life.total_seconds() / 3600
        assert hours(spec["renewBefore"]) == POLICY.leaf_renew_before.total_seconds() / 3600
        assert spec["privateKey"]["rotationPolicy"] == "Always"


def hours(duration: str) -> float:
    assert duration.endswith("h"), duration
    return float(duration.removesuffix("h"))


def test_the_loan_key_job_makes_the_secret_both_containers_load_their_key_from(rendered):
    job = the(rendered, "Job", LOAN_KEY)
    assert job["spec"]["backoffLimit"] > 0
    spec = job["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == LOAN_KEY
    [maker] = spec["containers"]
    args = cli.parser().parse_args(argv(maker)[1:])
    assert args.run is cli._loan_key
    assert args.out is None  # a Secret, not a file
    assert (args.namespace, args.secret) == (job["metadata"]["namespace"], LOAN_KEY)
    [named] = [rule for rule in the(rendered, "Role", LOAN_KEY)["rules"] if rule.get("resourceNames")]
    assert named["resourceNames"] == [LOAN_KEY] and named["verbs"] == ["get"]
    deployment, returner_spec = pod_spec(rendered, "Deployment", EXTENDER), pod_spec(rendered, "Deployment", RETURNER)
    extender, returner = container(deployment, "extender"), container(returner_spec, "returner")
    folder = mount_path(deployment, extender, "secret", LOAN_KEY)
    assert mount_path(returner_spec, returner, "secret", LOAN_KEY) == folder
    assert serve.parser().parse_args(argv(extender)[1:]).loan_key_file == f"{folder}/key"
    assert returner_cli.parser().parse_args(argv(returner)[1:]).loan_key_file == f"{folder}/key"
    # No other account may read it through the API: tenants must never learn the key (tests/e2e/test_manifests.py).
    readers = {
        account
        for account, _, _, resource, verb, names in _granted(rendered)
        if resource == "secrets" and verb in ("get", "list", "watch") and (not names or LOAN_KEY in names)
    }
    assert readers == {LOAN_KEY}


def test_migchain_containers_run_this_version_of_the_image(rendered):
    images = {
        c["image"]
        for o in rendered
        if o["kind"] in WORKLOADS
        for c in template_spec(o)["containers"]
        if not c["image"].startswith("registry.k8s.io/")
    }
    assert images == {f"migchain:{__version__}"}
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert {"name": "migchain", "newName": "migchain", "newTag": __version__} in kustomization["images"]


# -- RBAC -----------------------------------------------------------------------


def test_the_api_call_inventory_is_current():
    found: Counter[tuple[str, str]] = Counter()
    for path in sorted((ROOT / "extender").rglob("*.py")):
        for method in API_CALL.findall(path.read_text()):
            found[(str(path.relative_to(ROOT)), method)] += 1
    expected = {key: count for key, (count, _) in {**API_CALLS, **RECARVE_CALLS}.items()}
    assert dict(found) == expected, (
        "the Kubernetes API calls in extender/ changed: give each new call its access in API_CALLS, "
        "then check manifests/rbac-*.yaml and the table in manifests/README.md"
    )


def _granted(rendered: list[dict[str, Any]]) -> list[tuple[str, str, str, str, str, tuple[str, ...]]]:
    """(account, namespace or "", group, resource[/subresource], verb, resourceNames) of migchain's own roles."""
    grants = []
    for binding in rendered:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        ref = binding["roleRef"]
        roles = [o for o in rendered if o["kind"] == ref["kind"] and o["metadata"]["name"] == ref["name"]]
        if not roles:
            continue  # a built-in role (system:kube-scheduler, ...)
        [role] = roles
        namespace = binding["metadata"].get("namespace", "")
        for subject in binding["subjects"]:
            for rule in role["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for verb in rule["verbs"]:
                            names = tuple(rule.get("resourceNames", ()))
                            grants.append((subject["name"], namespace, group, resource, verb, names))
    return grants


def test_every_granted_verb_is_used_by_some_call(rendered):
    accesses = [access for _, listed in API_CALLS.values() for access in listed]
    for account, namespace, group, resource, verb, names in _granted(rendered):
        if account == SCHEDULER:
            continue  # kube-scheduler's needs are upstream's: its own lease only
        users = [
            a
            for a in accesses
            if (a.account, a.group, a.verb) == (account, group, verb)
            and "/".join(filter(None, (a.resource, a.subresource))) == resource
            and (not namespace or a.namespace == namespace)
            and (not names or a.name in names)
        ]
        assert users, f"{account} is granted {verb} {resource} in {namespace or 'the cluster'}, which no call needs"


def test_the_recarve_component_grants_every_call_of_the_recarver_and_turns_it_on(tmp_path):
    if not KUBECTL.exists():
        pytest.skip(f"{KUBECTL} is not built: run `make control-plane` (make test does)")
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(MANIFESTS, tmp_path)],
                "components": [os.path.relpath(MANIFESTS / "recarve", tmp_path)],
            }
        )
    )
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    objects = [document for document in yaml.safe_load_all(result.stdout) if document]
    grants = _granted(objects)
    for access in (access for _, listed in RECARVE_CALLS.values() for access in listed):
        assert any(
            (account, group, verb) == (access.account, access.group, access.verb)
            and resource == "/".join(filter(None, (access.resource, access.subresource)))
            and namespace in ("", access.namespace)
            and (not names or access.name in names)
            for account, namespace, group, resource, verb, names in grants
        ), f"the recarve component does not grant {access}"
    returner = the(objects, "Deployment", RETURNER)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--recarve" in returner and f"--recarve-config-map={GPU_OPERATOR}/{MIG_CONFIG}" in returner
    base = [o for o in render() if o["kind"] in ("ClusterRole", "Role")]
    assert not any("configmaps" in rule["resources"] and o["metadata"].get("namespace") == GPU_OPERATOR
                   for o in base for rule in o["rules"])  # fmt: skip


def test_every_rule_names_the_code_that_needs_it():
    """Each rule of manifests/rbac-*.yaml follows a comment naming the code; named functions and files exist."""
    for path in sorted([*MANIFESTS.glob("rbac-*.yaml"), *MANIFESTS.glob("recarve/rbac-*.yaml")]):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if not line.lstrip().startswith("- apiGroups:"):
                continue
            comment: list[str] = []
            for above in reversed(lines[:number]):
                if not above.lstrip().startswith("#"):
                    break
                comment.insert(0, above.strip().lstrip("#").strip())
            text = " ".join(comment)
            where = f"{path.name}:{number + 1}"
            files = [ROOT / f for f in re.findall(r"extender/[\w/]+\.py", text)]
            assert files or "kube-scheduler" in text, f"{where}: no comment naming the code that needs the rule"
            source = ""
            for file in files:
                assert file.is_file(), f"{where}: {file} does not exist"
                source += file.read_text()
            for private, method in re.findall(r"(?<![\w.])(_\w+)|\b[A-Z]\w+\.(_?\w+)", text) if files else ():
                name = private or method
                assert re.search(rf"\b(def|class) {name}\b", source), f"{where}: no {name} in {files}"


# -- Dockerfile -------------------------------------------------------------------


def test_the_dockerfile_installs_pinned_runtime_dependencies_as_a_fixed_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    [base] = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    # a patch release, and the digest of what it pointed at: a moved tag cannot change the image
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?@sha256:[0-9a-f]{64}", base), base
    assert not re.search(r"@sha256:(0{64}|[0-9a-f]?x+)", base), "a placeholder digest: run `make image-pin`"
    commands = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    installs = [" ".join(line.split()) for line in re.findall(r"pip install[^\\&\n]*", commands)]
    assert installs == [
        "pip install --no-cache-dir --require-hashes --no-deps --requirement requirements.lock",
        "pip install --no-cache-dir --no-deps --no-build-isolation .",
    ], "every file pip fetches is checked against a hash; migchain itself fetches nothing"
    assert "[test" not in text and "[sim" not in text
    assert dockerfile_uid() != 0
    [exposed] = re.findall(r"^EXPOSE (\d+)", text, re.MULTILINE)
    assert int(exposed) == 8443


def _pins(text: str) -> dict[str, str]:
    """name -> version of `name==version` lines, names normalised as pip does."""
    found = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", text, re.MULTILINE)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in found}


def test_requirements_lock_hashes_every_runtime_dependency_at_the_versions_of_constraints_txt():
    lock = (ROOT / "requirements.lock").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.split("\n\n", 1)[-1].split("\n", 6)[-1])
    pinned = _pins(lock)
    for entry in entries:
        if re.match(r"[A-Za-z0-9]", entry):
            assert "--hash=sha256:" in entry, f"no hash: {entry.splitlines()[0]}"
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in re.findall(r"--hash=sha256:(\S+)", lock))
    constraints = _pins((ROOT / "constraints.txt").read_text())
    different = {name: (version, constraints[name]) for name, version in pinned.items() if name in constraints}
    assert {name: pair for name, pair in different.items() if pair[0] != pair[1]} == {}, "run `make lock`"
    # every runtime requirement of setup.cfg, and the build backend of pyproject.toml (no build isolation)
    runtime = re.search(r"install_requires =\n((?:    .*\n)+)", (ROOT / "setup.cfg").read_text())
    assert runtime is not None
    names = {
        re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[ ]", line.strip())[0]).lower() for line in runtime[1].splitlines()
    }
    assert names | {"setuptools", "wheel"} <= set(pinned), "run `make lock`"
    assert not {"pytest", "hypothesis", "mypy", "scipy", "matplotlib"} & set(pinned)  # no test or sim extras


def test_the_dockerignore_keeps_what_the_build_copies_and_drops_the_rest():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:  # Docker's rules, as far as this file uses them
        parts = Path(path).parts
        for pattern in patterns:
            if pattern.startswith("**/"):  # at any depth
                if any(fnmatch.fnmatch(part, pattern.removeprefix("**/")) for part in parts):
                    return True
            elif any(fnmatch.fnmatch("/".join(parts[: n + 1]), pattern) for n in range(len(parts))):
                return True
        return False

    copied = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied += line.split()[1:-1]
    assert "extender" in copied and "setup.cfg" in copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not ignored(source), f"{source} is copied by the Dockerfile but .dockerignore drops it"
    for dropped in (".git", ".venv", ".cache", "tests", "bench", "docs", "extender/__pycache__"):
        assert ignored(dropped), dropped


# -- kind -----------------------------------------------------------------------


def test_the_kind_config_is_a_cluster_of_one_control_plane_with_scheduler_config_and_two_workers():
    config = yaml.safe_load((KIND / "cluster.yaml").read_text())
    assert (config["apiVersion"], config["kind"]) == ("kind.x-k8s.io/v1alpha4", "Cluster")
    assert [node["role"] for node in config["nodes"]] == ["control-plane", "worker", "worker"]
    [mount] = config["nodes"][0]["extraMounts"]
    # kind resolves a relative hostPath against its working directory: demo.sh runs from the repository root
    assert (ROOT / mount["hostPath"]).resolve() == (ROOT / "scheduler-config.yaml").resolve()
    assert Path(mount["containerPath"]).is_absolute()
    assert mount["readOnly"] is True


def test_the_kind_demo_is_valid_bash_and_fakes_a_gpu_the_installed_rules_can_borrow_on(rendered):
    script = KIND / "demo.sh"
    assert os.access(script, os.X_OK)
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False, timeout=30)
    assert check.returncode == 0, check.stderr
    text = script.read_text()
    assert "set -euo pipefail" in text
    [product] = re.findall(r"^PRODUCT=(\S+)", text, re.MULTILINE)
    [layout] = re.findall(r"^LAYOUT=\((.*)\)", text, re.MULTILINE)
    profiles = [entry.split("=")[0] for entry in layout.split()]
    extender = container(pod_spec(rendered, "Deployment", "migchain-extender"), "extender")
    names = [Path(p).name for p in serve.parser().parse_args(argv(extender)[1:]).chains]
    rules = load_rules([ROOT / "chains" / name for name in names])
    [chain] = [c for c in rules.chains if product in c.gpu_products]
    types = [f"{MIG_RESOURCE_PREFIX}{profile}" for profile in profiles]
    assert set(types) <= set(chain.types)
    # the story: a 1g.5gb pod borrows the 2g.10gb
    assert chain.types.index(f"{MIG_RESOURCE_PREFIX}1g.5gb") < chain.types.index(f"{MIG_RESOURCE_PREFIX}2g.10gb")
