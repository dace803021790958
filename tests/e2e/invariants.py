"""What must hold after any fault, read from the API server alone: no over-commit, no pod lost, each loan once.

Written independently of the extender's own accounting (its ledger is what is
under test): requests are summed from the pod objects, capacity is read from
the Node objects.

- (a) no over-commit: on every node, for every MIG resource, the requests of the
  bound pods that still hold their slices (not Succeeded or Failed; pods being
  deleted still count: their containers may still run) fit the allocatable;
- (b) no pod lost: every bare pod a test created is there under its name,
  every ReplicaSet has as many live pods as it wants, and no journaled borrow
  or return is left unfinished (a pod there exists only in the journal);
- (c) each loan recorded once: no two live pods carry the same
  `migchain.io/replaced-uid`, and no live pod is the original of another live
  pod's loan.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from extender.kube.api import KubeApi, path

MIG_PREFIX = "nvidia.com/mig-"
REPLACED_UID = "migchain.io/replaced-uid"
JOURNAL_LABEL = "migchain.io/journal"
JOURNAL_NAMESPACE = "migchain-system"

Pod = dict[str, Any]


def mig_requests(pod: Mapping[str, Any]) -> dict[str, int]:
    """The pod's MIG slices: app containers add up, an init container needs its own at most (limits stand in for
    requests, as the API server copies them for extended resources)."""
    spec = pod.get("spec") or {}

    def of(container: Mapping[str, Any]) -> dict[str, int]:
        resources = container.get("resources") or {}
        merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        return {name: int(value) for name, value in merged.items() if name.startswith(MIG_PREFIX)}

    total: collections.Counter[str] = collections.Counter()
    for container in spec.get("containers") or []:
        total.update(of(container))
    for container in spec.get("initContainers") or []:
        for name, count in of(container).items():
            total[name] = max(total[name], count)
    return dict(total)


def holds_slices(pod: Mapping[str, Any]) -> bool:
    return bool((pod.get("spec") or {}).get("nodeName")) and (pod.get("status") or {}).get("phase") not in (
        "Succeeded",
        "Failed",
    )


def live(pod: Mapping[str, Any]) -> bool:
    """Not on its way out: neither deleted nor finished."""
    return not pod["metadata"].get("deletionTimestamp") and (pod.get("status") or {}).get("phase") not in (
        "Succeeded",
        "Failed",
    )


def bound(pods: Iterable[Pod]) -> list[Pod]:
    return [pod for pod in pods if live(pod) and pod["spec"].get("nodeName")]


def borrowing(pod: Mapping[str, Any]) -> bool:
    return REPLACED_UID in (pod["metadata"].get("annotations") or {})


def over_commits(nodes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]) -> list[str]:
    """(a): one line per node and MIG resource whose bound pods ask for more than it has."""
    used: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    holders: dict[str, list[str]] = collections.defaultdict(list)
    for pod in pods:
        if holds_slices(pod):
            node = pod["spec"]["nodeName"]
            used[node].update(mig_requests(pod))
            holders[node].append(pod["metadata"]["name"])
    problems = []
    for node in nodes:
        name = node["metadata"]["name"]
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        for resource, count in sorted(used.get(name, {}).items()):
            if count > int(allocatable.get(resource, 0)):
                problems.append(
                    f"node {name}: {count} x {resource} bound, {allocatable.get(resource, 0)} allocatable "
                    f"(pods {sorted(holders[name])})"
                )
    return problems


def loan_problems(pods: Iterable[Mapping[str, Any]]) -> list[str]:
    """(c): a loan recorded on two live pods, or a live original beside its live replacement."""
    alive = [pod for pod in pods if live(pod)]
    by_loan: dict[str, list[str]] = collections.defaultdict(list)
    for pod in alive:
        replaced = (pod["metadata"].get("annotations") or {}).get(REPLACED_UID)
        if replaced:
            by_loan[replaced].append(f"{pod['metadata']['namespace']}/{pod['metadata']['name']}")
    problems = [f"loan of {uid} recorded on {sorted(names)}" for uid, names in by_loan.items() if len(names) > 1]
    for pod in alive:
        uid = pod["metadata"]["uid"]
        if uid in by_loan:
            problems.append(
                f"pod {pod['metadata']['namespace']}/{pod['metadata']['name']} ({uid}) is an original whose "
                f"replacement {by_loan[uid]} is live too"
            )
    return problems


def owned_by(pod: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in pod["metadata"].get("ownerReferences") or [])


def replica_set_problems(api: KubeApi, namespace: str, pods: list[Pod]) -> list[str]:
    """(b), owned pods: every ReplicaSet of the namespace has as many live pods as it wants."""
    sets, _ = api.list_all(path("apis", "apps", "v1", "namespaces", namespace, "replicasets"))
    problems = []
    for replica_set in sets:
        uid = replica_set["metadata"]["uid"]
        have = [pod["metadata"]["name"] for pod in pods if live(pod) and owned_by(pod, uid)]
        want = int(replica_set["spec"].get("replicas", 1))
        if len(have) != want:
            problems.append(f"ReplicaSet {replica_set['metadata']['name']} wants {want} pods, has {len(have)}")
    return problems


def lost(api: KubeApi, namespace: str, pods: list[Pod], bare: Collection[str]) -> list[str]:
    """(b): bare pods missing under their name, and ReplicaSets short of (or over) their count."""
    names = {pod["metadata"]["name"] for pod in pods}
    problems = [f"bare pod {namespace}/{name} is gone" for name in sorted(set(bare) - names)]
    return problems + replica_set_problems(api, namespace, pods)


def namespace_pods(api: KubeApi, namespace: str) -> list[Pod]:
    items, _ = api.list_all(path("api", "v1", "namespaces", namespace, "pods"))
    return items


def _journal(api: KubeApi, namespace: str) -> list[tuple[str, str]]:
    """(ConfigMap name, pod name) of every unfinished borrow or return migchain journaled for `namespace`."""
    items, _ = api.list_all(
        path("api", "v1", "namespaces", JOURNAL_NAMESPACE, "configmaps"), labelSelector=JOURNAL_LABEL
    )
    entries = []
    for item in items:
        original = (json.loads((item.get("data") or {}).get("original") or "{}")).get("metadata") or {}
        if original.get("namespace") == namespace:
            entries.append((item["metadata"]["name"], str(original.get("name"))))
    return entries


def journal_entries(api: KubeApi, namespace: str) -> list[str]:
    """The journal's ConfigMaps for pods of `namespace`."""
    return [name for name, _ in _journal(api, namespace)]


def journaled_pods(api: KubeApi, namespace: str) -> list[str]:
    """The pods of `namespace` the journal holds."""
    return [pod for _, pod in _journal(api, namespace)]


def check_invariants(api: KubeApi, namespace: str, bare: Collection[str] = ()) -> list[Pod]:
    """Assert (a) on every node of the cluster, (b) for the namespace, (c) across the cluster; returns the
    namespace's pods. Call it once the system has settled (see `settle`)."""
    nodes, _ = api.list_all("/api/v1/nodes")
    everywhere, _ = api.list_all("/api/v1/pods")
    pods = [pod for pod in everywhere if pod["metadata"]["namespace"] == namespace]
    problems = over_commits(nodes, everywhere) + lost(api, namespace, pods, bare) + loan_problems(everywhere)
    problems += [f"journal entry {name} left unfinished" for name in journal_entries(api, namespace)]
    assert not problems, "invariants broken:\n" + "\n".join(problems)
    return pods


def _pending_reason(pod: Mapping[str, Any]) -> str:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return str(condition.get("reason") or "")
    return ""


def unsettled(api: KubeApi, namespace: str, pods: list[Pod]) -> list[str]:
    """Why the namespace is not settled yet: pods on their way out, unbound pods no scheduler attempt has
    explained yet, journaled borrows or returns, ReplicaSets short of (or over) their count."""
    reasons = [f"{pod['metadata']['name']} terminating" for pod in pods if pod["metadata"].get("deletionTimestamp")]
    reasons += [
        f"{pod['metadata']['name']} pending without a reason"
        for pod in pods
        if live(pod) and not pod["spec"].get("nodeName") and not _pending_reason(pod)
    ]
    reasons += [f"journal {name}" for name in journal_entries(api, namespace)]
    return reasons + replica_set_problems(api, namespace, pods)


def settle(api: KubeApi, namespace: str, timeout: float = 90.0, quiet: float = 1.5) -> list[Pod]:
    """Wait until every pod of the namespace is bound or pending with a reason from the scheduler, nothing is
    journaled or terminating, every ReplicaSet has its count, and nothing changed for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last: tuple[Any, ...] | None = None
    since = time.monotonic()
    why: list[str] = []
    while time.monotonic() < deadline:
        pods = namespace_pods(api, namespace)
        why = unsettled(api, namespace, pods)
        state = tuple(
            sorted((pod["metadata"]["name"], pod["metadata"]["uid"], pod["spec"].get("nodeName") or "") for pod in pods)
        )
        if why or state != last:
            last, since = state, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return pods
        time.sleep(0.25)
    raise TimeoutError(f"namespace {namespace} did not settle in {timeout:.0f}s: {why[:10]}")
