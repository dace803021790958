"""No pod only in the journal: copies the API server refuses, answers lost on the way back, pods their user deleted.

Each test puts a bare pod where a borrow or a return must delete it, and makes
the API server refuse its copy (a ResourceQuota, restricted PodSecurity, a
ValidatingAdmissionPolicy, ephemeral containers), or loses the answer to an
eviction (a proxy in front of the API server), or has the pod's user delete it
while migchain is busy with it. The pod must end where it can be seen: as it
was, as its copy, or gone because its user said so; never only in a ConfigMap.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from extender.core.loan import restored_pod
from extender.kube.api import ApiError, path
from extender.kube.executor import Executor
from tests.e2e.conftest import Cluster, Scenario
from tests.e2e.controlplane import Process, wait_until
from tests.e2e.fleet import PAUSE, create_node
from tests.e2e.invariants import journal_entries
from tests.e2e.proxy import Action, ApiProxy

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"
EAGER_GPU = "TEST-EAGER-GPU"  # tests/fixtures/chains/e2e-eager.yaml: returnMode eager
G1 = "nvidia.com/mig-1g.5gb"
G2 = "nvidia.com/mig-2g.10gb"
REPLACED_UID = "migchain.io/replaced-uid"
ADMISSION = ("apis", "admissionregistration.k8s.io", "v1")


def report(test: str, **numbers: Any) -> None:
    print(f"\n[no-loss] {test}: " + ", ".join(f"{key}={value}" for key, value in numbers.items()))


def limits(pod: dict[str, Any]) -> dict[str, str]:
    return dict(pod["spec"]["containers"][0]["resources"]["limits"])


def borrowing(pod: dict[str, Any]) -> bool:
    return REPLACED_UID in (pod["metadata"].get("annotations") or {})


def current(scenario: Scenario, name: str) -> dict[str, Any] | None:
    try:
        return scenario.pod(name)
    except ApiError as error:
        if error.status == 404:
            return None
        raise


def only_large_slice(scenario: Scenario) -> str:
    """A node with one 2g.10gb and nothing smaller: a pod asking for a 1g.5gb must borrow it."""
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"2g.10gb": 1}, scenario.test)
    return node


def one_borrower(scenario: Scenario) -> dict[str, Any]:
    """An eager node: `filler` holds its 1g.5gb, bare pod `b` borrows its 2g.10gb; `filler` ending returns `b`."""
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, EAGER_GPU, {"1g.5gb": 1, "2g.10gb": 1}, scenario.test)
    scenario.create_pod("filler", {"1g.5gb": 1})
    scenario.wait_bound("filler")
    scenario.create_pod("b", {"1g.5gb": 1}, labels={"app": "b"})
    wait_until(lambda: borrowing(scenario.pod("b")), 30, "b to borrow")
    borrower = scenario.pod("b")
    assert limits(borrower) == {G2: "1"}
    return borrower


def returned(scenario: Scenario, name: str, old: dict[str, Any]) -> dict[str, Any] | None:
    """The pod back under its name with its original request, bound, no loan; None until then."""
    pod = current(scenario, name)
    if pod is None or pod["metadata"]["uid"] == old["metadata"]["uid"] or borrowing(pod):
        return None
    return pod if pod["spec"].get("nodeName") else None


def untouched(scenario: Scenario, old: dict[str, Any]) -> None:
    """`old` is still there: the same pod, not being deleted, and nothing of it journaled."""
    pod = current(scenario, old["metadata"]["name"])
    assert pod is not None, (
        f"pod {old['metadata']['name']} is gone; journal: {journal_entries(scenario.api, scenario.namespace)}"
    )
    assert pod["metadata"]["uid"] == old["metadata"]["uid"]
    assert not pod["metadata"].get("deletionTimestamp")
    assert journal_entries(scenario.api, scenario.namespace) == []


def same_and_running(scenario: Scenario, old: dict[str, Any]) -> bool:
    pod = current(scenario, old["metadata"]["name"])
    return (
        pod is not None
        and pod["metadata"]["uid"] == old["metadata"]["uid"]
        and not pod["metadata"].get("deletionTimestamp")
    )


def refused(scenario: Scenario, name: str, words: str) -> list[str]:
    """kube-scheduler's FailedScheduling events on the pod that carry migchain's refusal."""
    return [message for message in scenario.events(name, "FailedScheduling") if words in message]


@contextlib.contextmanager
def admission_policy(scenario: Scenario, expression: str, message: str) -> Iterator[None]:
    """A ValidatingAdmissionPolicy on pod creates in the scenario's namespace, bound with Deny; removed after."""
    name = scenario.test
    policies = path(*ADMISSION, "validatingadmissionpolicies")
    bindings = path(*ADMISSION, "validatingadmissionpolicybindings")
    scenario.api.create(
        policies,
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}
                    ]
                },
                "validations": [{"expression": expression, "message": message}],
            },
        },
    )
    scenario.api.create(
        bindings,
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": scenario.namespace}}
                },
            },
        },
    )
    try:
        yield
    finally:
        for resource in (bindings, policies):
            with contextlib.suppress(ApiError):
                scenario.api.delete(f"{resource}/{name}")


def wait_policy_enforced(scenario: Scenario, probe: dict[str, Any], *, dry_run: bool = True) -> None:
    """The API server applies a new policy a moment after it is written: wait until it refuses `probe` (created
    for real, and deleted again, when the policy lets dry runs through)."""
    pods = path("api", "v1", "namespaces", scenario.namespace, "pods")

    def enforced() -> bool:
        try:
            scenario.api.request("POST", pods, probe, query={"dryRun": "All"} if dry_run else None)
        except ApiError as error:
            return error.status in (400, 403, 422)
        if not dry_run:
            scenario.api.delete(f"{pods}/{probe['metadata']['name']}")
        return False

    wait_until(enforced, 30, "the admission policy to be enforced", interval=0.5)


def probe_pod(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe", "annotations": annotations or {}},
        "spec": {"containers": [{"name": "main", "image": PAUSE}]},
    }


# -- item 2: the copy refused for good ----------------------------------------


def test_a_quota_on_the_larger_type_keeps_the_bare_pod_where_it_was(scenario: Scenario):
    quotas = path("api", "v1", "namespaces", scenario.namespace, "resourcequotas")
    hard = {f"requests.{G2}": "0"}
    scenario.api.create(
        quotas, {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-2g"}, "spec": {"hard": hard}}
    )
    # No quota controller runs here: the status it would write is written by hand, so admission enforces it.
    scenario.api.patch(f"{quotas}/no-2g/status", {"status": {"hard": hard, "used": {f"requests.{G2}": "0"}}})
    pod = scenario.create_pod("p", {"1g.5gb": 1})
    started = time.monotonic()
    only_large_slice(scenario)
    wait_until(
        lambda: refused(scenario, "p", "quota") or current(scenario, "p") is None, 60, "the borrow to be refused"
    )
    seen = time.monotonic() - started
    time.sleep(3)  # more scheduling attempts: none may delete it
    untouched(scenario, pod)
    assert not scenario.pod("p")["spec"].get("nodeName")
    report("quota", refused_after_s=f"{seen:.1f}", attempts=len(refused(scenario, "p", "quota")))


def test_a_namespace_switched_to_restricted_keeps_its_pending_bare_pod(scenario: Scenario):
    pod = scenario.create_pod("p", {"1g.5gb": 1})  # created before the switch: nothing checks it again
    scenario.api.patch(
        path("api", "v1", "namespaces", scenario.namespace),
        {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}},
    )
    only_large_slice(scenario)
    wait_until(
        lambda: refused(scenario, "p", "PodSecurity") or current(scenario, "p") is None, 60, "the borrow to be refused"
    )
    time.sleep(3)
    untouched(scenario, pod)


def test_a_namespace_switched_to_restricted_keeps_its_borrower_running(scenario: Scenario):
    borrower = one_borrower(scenario)
    scenario.api.patch(
        path("api", "v1", "namespaces", scenario.namespace),
        {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}},
    )
    scenario.set_phase("filler", "Succeeded")  # an eager return of b is due now
    wait_until(
        lambda: scenario.events("b", "ReturnFailed") or not same_and_running(scenario, borrower),
        60,
        "the return to be refused",
    )
    time.sleep(3)
    untouched(scenario, borrower)
    [message, *_] = scenario.events("b", "ReturnFailed")
    assert "PodSecurity" in message


def test_an_admission_policy_that_refuses_the_copy_keeps_the_bare_pod(scenario: Scenario):
    expression = f"!has(object.metadata.annotations) || !('{REPLACED_UID}' in object.metadata.annotations)"
    with admission_policy(scenario, expression, "no borrowers here"):
        wait_policy_enforced(scenario, probe_pod({REPLACED_UID: "x"}))
        pod = scenario.create_pod("p", {"1g.5gb": 1})
        only_large_slice(scenario)
        wait_until(
            lambda: refused(scenario, "p", "no borrowers here") or current(scenario, "p") is None,
            60,
            "the borrow to be refused",
        )
        time.sleep(3)
        untouched(scenario, pod)


def test_a_copy_refused_only_for_real_falls_back_to_the_original(scenario: Scenario):
    """The dry run passes, the real create is refused: the original comes back, pending, and borrows no more."""
    expression = (
        f"request.dryRun || !has(object.metadata.annotations) || !('{REPLACED_UID}' in object.metadata.annotations)"
    )
    with admission_policy(scenario, expression, "no borrowers here"):
        wait_policy_enforced(scenario, probe_pod({REPLACED_UID: "x"}), dry_run=False)
        pod = scenario.create_pod("p", {"1g.5gb": 1})
        only_large_slice(scenario)

        def fallen_back() -> dict[str, Any] | None:
            now = current(scenario, "p")
            return now if now is not None and now["metadata"]["uid"] != pod["metadata"]["uid"] else None

        back = wait_until(fallen_back, 60, "the original to be recreated")
        assert not borrowing(back) and limits(back) == {G1: "1"} and not back["spec"].get("nodeName")
        assert back["metadata"]["annotations"]["migchain.io/borrow"] == "false"
        wait_until(lambda: not journal_entries(scenario.api, scenario.namespace), 30, "the journal to be cleared")
        time.sleep(3)  # it borrows no more: the pod stays as it came back
        assert scenario.pod("p")["metadata"]["uid"] == back["metadata"]["uid"]
        assert scenario.events("p", "BorrowFellBack")


def test_a_journal_entry_nothing_can_finish_raises_an_event_and_a_metric(scenario: Scenario):
    """Every real pod create refused after the delete: the entry stays, an Event and a gauge say so, and it is
    finished once the API server admits the pod again."""
    cluster = scenario.cluster
    # Real creates of pods migchain writes (its annotations) refused: the replacement and the original it would
    # fall back to alike. The dry run passes, so migchain deletes the original.
    expression = (
        "request.dryRun || !has(object.metadata.annotations) || "
        "!object.metadata.annotations.exists(key, key.startsWith('migchain.io/'))"
    )
    with admission_policy(scenario, expression, "no pods of migchain's here for now"):
        wait_policy_enforced(scenario, probe_pod({"migchain.io/x": "x"}), dry_run=False)
        pod = scenario.create_pod("p", {"1g.5gb": 1})
        started = time.monotonic()
        only_large_slice(scenario)
        wait_until(lambda: current(scenario, "p") is None, 60, "the original to be deleted")
        wait_until(lambda: scenario.events("p", "JournalOverdue"), 60, "the overdue journal entry to be reported")
        overdue_after = time.monotonic() - started
        assert cluster.metric("migchain_journal_overdue_entries", kind="borrow") == 1
        assert cluster.metric("migchain_journal_oldest_entry_seconds", kind="borrow") >= 5
    back = wait_until(lambda: current(scenario, "p"), 60, "the pod to be recreated once admitted")
    assert back["metadata"]["uid"] != pod["metadata"]["uid"]
    wait_until(lambda: not journal_entries(scenario.api, scenario.namespace), 30, "the journal to be cleared")
    wait_until(lambda: cluster.metric("migchain_journal_overdue_entries", kind="borrow") == 0, 30, "the gauge to fall")
    report("journal-overdue", reported_after_s=f"{overdue_after:.1f}")


def test_kubectl_debug_on_a_borrower_does_not_stop_its_return(scenario: Scenario):
    borrower = one_borrower(scenario)
    scenario.api.patch(
        path("api", "v1", "namespaces", scenario.namespace, "pods", "b", "ephemeralcontainers"),
        {
            "spec": {
                "ephemeralContainers": [
                    {"name": "debugger", "image": PAUSE, "targetContainerName": "main", "stdin": True, "tty": True}
                ]
            }
        },
        content_type="application/strategic-merge-patch+json",
    )
    assert scenario.pod("b")["spec"]["ephemeralContainers"]
    scenario.set_phase("filler", "Succeeded")
    back = wait_until(lambda: returned(scenario, "b", borrower), 60, "b to be returned")
    assert limits(back) == {G1: "1"}
    assert not back["spec"].get("ephemeralContainers")
    wait_until(lambda: not journal_entries(scenario.api, scenario.namespace), 30, "the journal to be cleared")


# -- item 1: an eviction whose answer is lost -------------------------------------


def returner_process(cluster: Cluster) -> Process:
    return cluster.plane.processes["returner-returner-a"]


@contextlib.contextmanager
def returner_behind(cluster: Cluster, proxy: ApiProxy, folder: Any) -> Iterator[Process]:
    """The returner (identity returner-a) talking to the API server through `proxy`; the usual one again after."""
    usual = returner_process(cluster)
    usual.stop()
    kubeconfig = proxy.kubeconfig(folder, "returner-proxied")
    argv = [f"--kubeconfig={kubeconfig}" if arg.startswith("--kubeconfig=") else arg for arg in usual.argv]
    proxied = Process("returner-proxied", argv, folder / "returner-proxied.log")
    cluster.plane.processes["returner-proxied"] = proxied  # its log is shown when a test fails
    proxied.start()
    try:
        wait_until(lambda: "returner-a holds the lease" in proxied.log.read_text(errors="replace"), 60, "lease")
        yield proxied
    finally:
        proxied.stop()
        cluster.plane.processes.pop("returner-proxied", None)
        cluster.start_returner("returner-a")


def test_an_eviction_whose_answer_is_lost_still_returns_the_bare_pod(scenario: Scenario, tmp_path: Any):
    cluster = scenario.cluster
    eviction = f"/api/v1/namespaces/{scenario.namespace}/pods/b/eviction"
    dropped: list[str] = []

    def rule(method: str, resource: str) -> Action:
        if method == "POST" and resource == eviction and not dropped:
            dropped.append(resource)
            return "drop-answer"
        return "pass"

    proxy = ApiProxy(cluster.plane, rule)
    try:
        with returner_behind(cluster, proxy, tmp_path):
            borrower = one_borrower(scenario)
            scenario.set_phase("filler", "Succeeded")
            wait_until(lambda: dropped, 60, "the eviction to be sent")
            started = time.monotonic()
            back = wait_until(lambda: returned(scenario, "b", borrower), 60, "b to be recreated")
            took = time.monotonic() - started
            assert limits(back) == {G1: "1"}
            wait_until(lambda: not journal_entries(scenario.api, scenario.namespace), 30, "the journal to be cleared")
    finally:
        proxy.close()
    report("lost-eviction-answer", recreated_after_s=f"{took:.1f}")


# -- item 5: pods their user deleted -----------------------------------------------


@contextlib.contextmanager
def extender_behind(cluster: Cluster, proxy: ApiProxy, folder: Any) -> Iterator[None]:
    extender = cluster.extender
    usual = list(extender.argv)
    kubeconfig = proxy.kubeconfig(folder, "extender-proxied")
    extender.argv = [f"--kubeconfig={kubeconfig}" if arg.startswith("--kubeconfig=") else arg for arg in usual]
    try:
        cluster.restart_extender(kill=False)
        yield
    finally:
        extender.argv = usual
        cluster.restart_extender(kill=False)


def test_a_bare_pod_its_user_deletes_during_its_borrow_is_not_replaced(scenario: Scenario, tmp_path: Any):
    cluster = scenario.cluster
    original = f"/api/v1/namespaces/{scenario.namespace}/pods/p"

    def rule(method: str, resource: str) -> Action:
        return 3.0 if method == "DELETE" and resource == original else "pass"

    proxy = ApiProxy(cluster.plane, rule)
    try:
        with extender_behind(cluster, proxy, tmp_path):
            scenario.create_pod("p", {"1g.5gb": 1})
            only_large_slice(scenario)
            wait_until(lambda: proxy.actions(3.0), 60, "migchain to delete the original")
            scenario.api.delete(path("api", "v1", "namespaces", scenario.namespace, "pods", "p"))  # its user
            time.sleep(8)  # the held delete arrives (404), and a recovery pass runs
            assert current(scenario, "p") is None, "the pod its user deleted came back"
            assert journal_entries(scenario.api, scenario.namespace) == []
            assert scenario.events("p", "BorrowAbandoned")
    finally:
        proxy.close()


HOLD = "e2e.migchain.io/hold"


def hold(scenario: Scenario, name: str, held: bool) -> None:
    """Put a finalizer of the test's on the pod, or take it off: a deleted pod stays Terminating while it is on."""
    scenario.api.patch(
        path("api", "v1", "namespaces", scenario.namespace, "pods", name),
        {"metadata": {"finalizers": [HOLD] if held else None}},
    )


def test_an_evicted_borrower_carries_the_mark_recovery_tells_an_eviction_by(scenario: Scenario):
    """The Eviction API marks a pod (condition DisruptionTarget, reason EvictionByEvictionAPI) before deleting it:
    what recovery reads to tell migchain's eviction from a user's delete. Checked on the real API server."""
    borrower = one_borrower(scenario)
    hold(scenario, "b", True)
    scenario.set_phase("filler", "Succeeded")
    leaving = wait_until(
        lambda: (pod := current(scenario, "b")) is not None and pod["metadata"].get("deletionTimestamp") and pod,
        60,
        "b to be evicted",
    )
    conditions = {(c["type"], c.get("reason")) for c in leaving["status"].get("conditions") or []}
    assert ("DisruptionTarget", "EvictionByEvictionAPI") in conditions
    hold(scenario, "b", False)
    back = wait_until(lambda: returned(scenario, "b", borrower), 60, "b to be returned")
    assert limits(back) == {G1: "1"}


def test_recovery_does_not_recreate_a_borrower_its_user_deleted(scenario: Scenario):
    """A return journaled, the returner gone before it evicted; meanwhile the borrower's user deletes it. The next
    returner must not bring it back."""
    cluster = scenario.cluster
    borrower = one_borrower(scenario)
    hold(scenario, "b", True)
    returner = returner_process(cluster)
    returner.stop()
    try:
        loan_key = cluster.plane.loan_key.read_bytes()
        crashed = Executor(scenario.api, "migchain-system", loan_key)
        crashed._journal_entry("return", borrower["metadata"]["uid"], borrower, restored_pod(borrower, 1, loan_key))
        scenario.api.delete(path("api", "v1", "namespaces", scenario.namespace, "pods", "b"))  # its user
    finally:
        cluster.start_returner("returner-a")
    wait_until(lambda: not journal_entries(scenario.api, scenario.namespace), 60, "recovery to settle the entry")
    hold(scenario, "b", False)
    wait_until(lambda: current(scenario, "b") is None, 30, "b to go")
    time.sleep(6)  # another recovery pass, another return round
    assert current(scenario, "b") is None, "the borrower its user deleted came back"
