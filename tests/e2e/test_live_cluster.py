"""The real kube-scheduler, configured by scheduler-config.yaml, calling migchain on a real control plane."""

from __future__ import annotations

import http.client
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import orjson
import pytest

from extender.kube.api import path
from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import ADMIN_TOKEN, ROOT, wait_until
from tests.e2e.fleet import SCHEDULER, TEST_LABEL, create_node, fleet_from_chain

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"
A100_CHAIN = ROOT / "chains" / "a100-40gb.yaml"
G1 = "nvidia.com/mig-1g.5gb"


def mig_usage(pods: list[dict[str, Any]]) -> dict[str, Counter[str]]:
    """MIG slices held per node by bound, non-terminal pods, read back from the API server."""
    usage: dict[str, Counter[str]] = {}
    for pod in pods:
        node = pod["spec"].get("nodeName")
        if not node or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            continue
        for container in pod["spec"]["containers"]:
            for resource, count in container.get("resources", {}).get("limits", {}).items():
                if resource.startswith("nvidia.com/mig-"):
                    usage.setdefault(node, Counter())[resource] += int(count)
    return usage


def assert_no_overcommit(scenario: Scenario, capacity: dict[str, dict[str, int]]) -> dict[str, Counter[str]]:
    usage = mig_usage(scenario.pods())
    for node, used in usage.items():
        for resource, count in used.items():
            assert count <= capacity[node].get(resource, 0), f"{node} holds {count} {resource}, has {capacity[node]}"
    return usage


def test_an_exact_fit_is_bound_and_the_extender_filter_was_asked(scenario: Scenario):
    cluster = scenario.cluster
    filters_before = cluster.metric("migchain_extender_requests_total", verb="filter", code="200")
    binds_before = cluster.metric("migchain_binds_total", outcome="bound", kind="exact")
    create_node(scenario.api, f"gpu-{scenario.test}-a", A100, {"1g.5gb": 1, "2g.10gb": 1}, scenario.test)
    scenario.create_pod("train", {"1g.5gb": 1})
    assert scenario.wait_bound("train") == f"gpu-{scenario.test}-a"
    assert cluster.metric("migchain_extender_requests_total", verb="filter", code="200") > filters_before
    assert cluster.metric("migchain_binds_total", outcome="bound", kind="exact") == binds_before + 1
    wait_until(lambda: scenario.pod("train")["status"].get("phase") == "Running", 15, "kwok runs it")


def test_with_no_free_slice_anywhere_the_pod_pends_with_the_extenders_reason(scenario: Scenario):
    # Only whole GPUs, which the shipped A100 policy never lends to a 1g.5gb pod.
    create_node(scenario.api, f"gpu-{scenario.test}-a", A100, {"7g.40gb": 1}, scenario.test)
    create_node(scenario.api, f"gpu-{scenario.test}-b", A100, {"7g.40gb": 1}, scenario.test)
    scenario.create_pod("waits", {"1g.5gb": 1})
    messages = wait_until(lambda: scenario.events("waits", "FailedScheduling"), 30, "a FailedScheduling event")
    assert "no 1g.5gb on this node" in messages[0], messages
    assert "7g.40gb denied: 5 steps exceed maxSteps 3" in messages[0], messages
    assert not scenario.pod("waits")["spec"].get("nodeName")


def burst(scenario: Scenario, pods: int, during: Any = None) -> None:
    """Create `pods` 1g.5gb pods from several threads at once, as a burst of job submissions."""
    names = [f"burst-{index}" for index in range(pods)]

    def submit(chunk: list[str]) -> None:
        for name in chunk:
            scenario.create_pod(name, {"1g.5gb": 1})

    threads = [threading.Thread(target=submit, args=(names[offset::4],)) for offset in range(4)]
    for thread in threads:
        thread.start()
    if during is not None:
        during()
    for thread in threads:
        thread.join()


def fleet_of_twenty(scenario: Scenario) -> dict[str, dict[str, int]]:
    """20 A100 nodes of 5 GPUs, each cut into 2 x 1g.5gb: 200 slices of 1g.5gb, nothing larger."""
    names = fleet_from_chain(scenario.api, A100_CHAIN, {"1g.5gb": 2}, nodes=20, gpus_per_node=5, test=scenario.test)
    return {name: {G1: 10} for name in names}


def bound_count(scenario: Scenario) -> int:
    return sum(1 for pod in scenario.pods() if pod["spec"].get("nodeName"))


def test_a_burst_never_overcommits_and_binds_every_pod_that_fits(scenario: Scenario):
    capacity = fleet_of_twenty(scenario)
    burst(scenario, 240)
    deadline = time.monotonic() + 120
    while bound_count(scenario) < 200 and time.monotonic() < deadline:
        assert_no_overcommit(scenario, capacity)
        time.sleep(0.5)
    usage = assert_no_overcommit(scenario, capacity)
    assert sum(sum(used.values()) for used in usage.values()) == 200
    assert all(used[G1] == 10 for used in usage.values())
    # The 40 that cannot fit stay Pending, told why.
    pending = [pod["metadata"]["name"] for pod in scenario.pods() if not pod["spec"].get("nodeName")]
    assert len(pending) == 40
    wait_until(lambda: scenario.events(pending[0], "FailedScheduling"), 30, "FailedScheduling for a pending pod")


def test_killing_the_extender_mid_burst_loses_no_accounting(scenario: Scenario):
    capacity = fleet_of_twenty(scenario)
    cluster = scenario.cluster

    def kill_when_a_third_is_bound() -> None:
        wait_until(lambda: bound_count(scenario) >= 70, 60, "70 pods bound")
        cluster.extender.kill()
        time.sleep(1)  # the scheduler meets a dead extender: its pods fail and are retried
        cluster.extender.start()
        cluster.wait_extender_ready()

    burst(scenario, 240, during=kill_when_a_third_is_bound)
    deadline = time.monotonic() + 150
    while bound_count(scenario) < 200 and time.monotonic() < deadline:
        assert_no_overcommit(scenario, capacity)
        time.sleep(0.5)
    usage = assert_no_overcommit(scenario, capacity)
    assert sum(sum(used.values()) for used in usage.values()) == 200


def test_pods_that_ask_for_no_mig_are_scheduled_without_the_extender(scenario: Scenario):
    cluster = scenario.cluster
    create_node(scenario.api, f"gpu-{scenario.test}-a", A100, {"1g.5gb": 1}, scenario.test)
    calls_before = {
        verb: cluster.metric("migchain_extender_requests_total", verb=verb) for verb in ("filter", "prioritize", "bind")
    }
    scenario.api.create(
        path("api", "v1", "namespaces", scenario.namespace, "pods"),
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "cpu-only"},
            "spec": {
                "schedulerName": SCHEDULER,
                "nodeSelector": {TEST_LABEL: scenario.test},
                "containers": [{"name": "main", "image": "pause", "resources": {"requests": {"cpu": "1"}}}],
            },
        },
    )
    assert scenario.wait_bound("cpu-only") == f"gpu-{scenario.test}-a"
    for verb, before in calls_before.items():
        assert cluster.metric("migchain_extender_requests_total", verb=verb) == before, verb


def test_a_bind_for_a_pod_whose_uid_changed_is_refused(scenario: Scenario):
    """kube-scheduler may bind from a stale cache; a pod recreated under the same name must not inherit the bind."""
    create_node(scenario.api, f"gpu-{scenario.test}-a", A100, {"7g.40gb": 1}, scenario.test)
    scenario.create_pod("renamed", {"1g.5gb": 1})  # cannot fit: it stays unbound
    body = orjson.dumps(
        {"PodName": "renamed", "PodNamespace": scenario.namespace, "PodUID": "not-its-uid", "Node": "anywhere"}
    )
    status, answer = scenario.cluster.call("/bind", body)
    assert status == 200
    assert "not binding" in orjson.loads(answer)["Error"]
    assert not scenario.pod("renamed")["spec"].get("nodeName")


def test_the_verbs_need_the_schedulers_client_certificate_and_probes_have_their_own_port(scenario: Scenario):
    """Mutual TLS: /bind moves pods. Without a certificate the handshake fails; with one the CA signed for another
    name the connection is closed after it: either way no request is even read, and nothing is bound. kubelet and
    Prometheus use the health port."""
    cluster = scenario.cluster
    create_node(scenario.api, f"gpu-{scenario.test}-a", A100, {"7g.40gb": 1}, scenario.test)
    pod = scenario.create_pod("guarded", {"1g.5gb": 1})  # cannot fit: it stays unbound
    bind = orjson.dumps(
        {"PodName": "guarded", "PodNamespace": scenario.namespace, "PodUID": pod["metadata"]["uid"],
         "Node": f"gpu-{scenario.test}-a"}
    )  # fmt: skip
    filter_args = orjson.dumps({"Pod": pod, "NodeNames": [f"gpu-{scenario.test}-a"]})
    for route, body in (("/bind", bind), ("/filter", filter_args), ("/prioritize", filter_args)):
        request = urllib.request.Request(
            f"{cluster.extender_url}{route}", data=body, headers={"Content-Type": "application/json"}
        )
        for other in (False, True):
            context = cluster.tls.context(as_scheduler=False, other=other)
            with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError, http.client.HTTPException)) as no:
                urllib.request.urlopen(request, timeout=5, context=context).close()
            assert not isinstance(no.value, urllib.error.HTTPError), (route, other)  # no HTTP answer at all
    assert cluster.call("/filter", filter_args)[0] == 200
    assert cluster.probe("/readyz")[0] == 200
    assert cluster.probe("/metrics")[0] == 200
    assert cluster.call("/metrics")[0] == 404  # not on the verbs port
    assert not scenario.pod("guarded")["spec"].get("nodeName")


def test_no_secret_reaches_migchains_logs(scenario: Scenario):
    """The API token and the TLS keys migchain holds never appear in what it logs."""
    cluster = scenario.cluster
    create_node(scenario.api, f"gpu-{scenario.test}-a", A100, {"1g.5gb": 1}, scenario.test)
    scenario.create_pod("logged", {"1g.5gb": 1})
    scenario.wait_bound("logged")
    secrets = [ADMIN_TOKEN, cluster.tls.serving.key.read_text().splitlines()[1]]
    logs = [process.log.read_text(errors="replace") for process in (cluster.extender, *cluster.returners)]
    assert all(logs)
    for text in logs:
        for secret in secrets:
            assert secret not in text
