"""Fixtures that start the real control plane, kwok, migchain and kube-scheduler on loopback."""

from __future__ import annotations

import itertools
import re
import shutil
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from extender.kube.api import ApiError, KubeApi, path
from tests.e2e.controlplane import ROOT, ControlPlane, Extender, ExtenderTls, Process, running, wait_until
from tests.e2e.fleet import TEST_LABEL, mig_pod
from tests.e2e.forwarder import Backend, Forwarder

CHAINS = [str(ROOT / "chains" / name) for name in ("a100-40gb.yaml", "a100-80gb.yaml", "h100-80gb.yaml")]
CHAINS.append(str(ROOT / "tests" / "fixtures" / "chains" / "e2e-eager.yaml"))
CHAINS.append(str(ROOT / "tests" / "fixtures" / "chains" / "e2e-opt-outs.yaml"))  # podOptOuts honoured
LIVE_CHAIN = ROOT / "tests" / "fixtures" / "chains" / "e2e-live.yaml"  # a copy of it is edited while migchain runs


@dataclass
class Cluster:
    plane: ControlPlane
    extender: Process
    extender_url: str  # kube-scheduler's verbs, mutual TLS
    health_url: str  # /healthz, /readyz, /metrics, plain HTTP
    tls: ExtenderTls
    chain_files: list[str]  # what the extender and the returners load: CHAINS and a copy of LIVE_CHAIN
    forwarder: Forwarder  # what kube-scheduler calls: the Service, in front of the ready replica
    returners: list[Process] = field(default_factory=list)

    def start_returner(self, identity: str, env: dict[str, str] | None = None, args: Sequence[str] = ()) -> Process:
        """A migchain-returner replica with its own lease identity; its log is kept with the others'."""
        process = self.plane.start_returner(self.chain_files, identity, env, args)
        if process not in self.returners:
            self.returners.append(process)
        return process

    def lease_holder(self) -> str:
        try:
            lease = self.api.get(
                path(
                    "apis", "coordination.k8s.io", "v1", "namespaces", "migchain-system", "leases", "migchain-returner"
                )
            )
        except ApiError:
            return ""
        return str(lease.get("spec", {}).get("holderIdentity") or "")

    @property
    def api(self) -> KubeApi:
        return self.plane.api

    def call(self, route: str, body: bytes | None = None) -> tuple[int, bytes]:
        """GET (no body) or POST JSON to the extender's verbs port, as kube-scheduler: mutual TLS, its certificate."""
        request = urllib.request.Request(
            f"{self.extender_url}{route}", data=body, headers={"Content-Type": "application/json"} if body else {}
        )
        return _answer(request, self.tls.context(as_scheduler=True))

    def probe(self, route: str) -> tuple[int, bytes]:
        """GET from the extender's health port (/healthz, /readyz, /metrics), as kubelet and Prometheus do."""
        return _answer(urllib.request.Request(f"{self.health_url}{route}"))

    def restart_extender(self, *, kill: bool = True) -> None:
        if kill:
            self.extender.kill()
        else:
            self.extender.stop()
        self.extender.start()
        self.wait_extender_ready()

    def wait_extender_ready(self) -> None:
        wait_until(lambda: self.probe("/readyz")[0] == 200, 60, "migchain /readyz")

    def metric(self, name: str, **labels: str) -> float:
        """A counter or gauge sample of the extender's /metrics (0 when absent)."""
        return _sample(self.probe("/metrics")[1].decode(), name, labels)

    def returner_metric(self, name: str, **labels: str) -> float:
        """A counter sample of the returners' /metrics, summed over the replicas running (only the leader
        counts: a counter of another replica is 0, or what it counted while it led)."""
        total = 0.0
        for returner in self.returners:
            if not returner.alive():
                continue
            [bind] = [a.split("=", 1)[1] for a in returner.argv if a.startswith("--health-bind=")]
            status, body = _answer(urllib.request.Request(f"http://{bind}/metrics"))
            if status == 200:
                total += _sample(body.decode(), name, labels)
        return total

    def logs(self) -> str:
        return self.plane.logs()


def _sample(text: str, name: str, labels: dict[str, str]) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def _answer(request: urllib.request.Request, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@dataclass
class Scenario:
    """One test's corner of the cluster: its namespace, and a label its nodes carry and its pods select."""

    cluster: Cluster
    namespace: str
    test: str
    nodes: list[str] = field(default_factory=list)

    @property
    def api(self) -> KubeApi:
        return self.cluster.api

    def create_pod(self, name: str, requests: dict[str, int], **kwargs: Any) -> dict[str, Any]:
        return self.api.create(
            path("api", "v1", "namespaces", self.namespace, "pods"), mig_pod(name, self.test, requests, **kwargs)
        )

    def pods(self) -> list[dict[str, Any]]:
        items, _ = self.api.list_all(path("api", "v1", "namespaces", self.namespace, "pods"))
        return items

    def pod(self, name: str) -> dict[str, Any]:
        return self.api.get(path("api", "v1", "namespaces", self.namespace, "pods", name))

    def wait_bound(self, name: str, timeout: float = 30) -> str:
        node: str = wait_until(lambda: self.pod(name)["spec"].get("nodeName"), timeout, f"pod {name} bound")
        return node

    def events(self, name: str, reason: str) -> list[str]:
        items, _ = self.api.list_all(
            path("api", "v1", "namespaces", self.namespace, "events"),
            fieldSelector=f"involvedObject.name={name},reason={reason}",
        )
        return [item.get("message", "") for item in items]

    def set_phase(self, name: str, phase: str) -> None:
        self.api.patch(
            path("api", "v1", "namespaces", self.namespace, "pods", name, "status"), {"status": {"phase": phase}}
        )


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("cluster")
    with running(ControlPlane(folder)) as plane:
        plane.start_kwok()
        tls = ExtenderTls.issue(folder)
        live_chain = folder / LIVE_CHAIN.name
        shutil.copyfile(LIVE_CHAIN, live_chain)
        chain_files = [*CHAINS, str(live_chain)]
        # An unfinished journal entry is reported after 5 s here (180 s by default), so a test can see it.
        extender = plane.start_extender(tls, chain_files, "--journal-overdue-after=5")
        # One replica, and the forwarder falls back to it whatever its /readyz says: as a direct URL.
        forwarder = Forwarder([backend(extender)])
        live = Cluster(plane, extender.process, extender.url, extender.health_url, tls, chain_files, forwarder)
        plane.start_scheduler(forwarder.url, tls)
        wait_until(lambda: _scheduler_leads(plane), 60, "kube-scheduler to take its lease")
        live.start_returner("returner-a")
        wait_until(lambda: live.lease_holder() == "returner-a", 60, "the returner to take its lease")
        yield live


def backend(extender: Extender) -> Backend:
    host, port = extender.url.removeprefix("https://").rsplit(":", 1)
    return Backend(extender.process.name, (host, int(port)), extender.health_url)


def _scheduler_leads(plane: ControlPlane) -> bool:
    try:
        lease = plane.api.get(
            path("apis", "coordination.k8s.io", "v1", "namespaces", "migchain-system", "leases", "migchain-scheduler")
        )
    except ApiError:
        return False
    return bool(lease.get("spec", {}).get("holderIdentity"))


_counter = itertools.count()


@pytest.fixture
def scenario(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Scenario]:
    test = f"t{next(_counter)}-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    cluster.plane.ensure_namespace(test)
    yield Scenario(cluster, test, test)
    # Clean up: the namespace (its pods go with it) and this test's nodes.
    try:
        cluster.api.delete(path("api", "v1", "namespaces", test))
        nodes, _ = cluster.api.list_all("/api/v1/nodes", labelSelector=f"{TEST_LABEL}={test}")
        for node in nodes:
            cluster.api.delete(path("api", "v1", "nodes", node["metadata"]["name"]))
    except ApiError:
        pass


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and "cluster" in getattr(item, "funcargs", {}):
        report.sections.append(("control plane and migchain logs", item.funcargs["cluster"].logs()))  # type: ignore[attr-defined]
    return report
