"""Certificate renewal on a real control plane: `migchain certs` on real Secrets and a real Deployment, and the
real kube-scheduler picking up a renewed client certificate without a restart."""

from __future__ import annotations

import base64
import datetime
import os
import time
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from extender.certs import POLICY, CertificateAuthority, fingerprint, migchain_leaves
from extender.kube.api import path
from extender.kube.certs import TRUST_BUNDLE, bundle_hash, renew_secrets
from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import create_node

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"
CA, SERVING, CLIENT = "migchain-ca", "migchain-extender-tls", "migchain-scheduler-client-tls"
HOUR = datetime.timedelta(hours=1)
DAY = datetime.timedelta(days=1)


class Certs:
    """`migchain certs` against one test namespace, with kube-scheduler's Deployment in it (no replicas)."""

    def __init__(self, scenario: Scenario, capsys: pytest.CaptureFixture[str]) -> None:
        self.scenario, self.capsys = scenario, capsys
        self.namespace = scenario.namespace
        self.specs = migchain_leaves("migchain-extender", self.namespace, SERVING, CLIENT)
        self.deployment = path("apis", "apps", "v1", "namespaces", self.namespace, "deployments", "migchain-scheduler")

    def run(self, now: datetime.datetime) -> str:
        code = renew_secrets(
            self.scenario.api,
            namespace=self.namespace,
            ca_secret=CA,
            specs=self.specs,
            scheduler="migchain-scheduler",
            now=now,
        )
        said = self.capsys.readouterr()
        assert code == 0, said.err
        return str(said.out)

    def secret(self, name: str) -> dict[str, Any]:
        return self.scenario.api.get(path("api", "v1", "namespaces", self.namespace, "secrets", name))

    def data(self, name: str) -> dict[str, bytes]:
        return {k: base64.b64decode(v) for k, v in self.secret(name)["data"].items()}

    def versions(self) -> dict[str, str]:
        return {name: self.secret(name)["metadata"]["resourceVersion"] for name in (CA, SERVING, CLIENT)}

    def bundle(self) -> list[str]:
        return [fingerprint(c) for c in x509.load_pem_x509_certificates(self.data(CA)["ca.crt"])]

    def scheduler_trusts(self) -> str:
        deployment = self.scenario.api.get(self.deployment)
        return str(deployment["spec"]["template"]["metadata"].get("annotations", {}).get(TRUST_BUNDLE, ""))

    def rolled_out(self) -> bool:
        deployment = self.scenario.api.get(self.deployment)
        return bool(deployment["status"].get("observedGeneration", 0) >= deployment["metadata"]["generation"])

    def create_scheduler_deployment(self) -> None:
        labels = {"app": "scheduler"}
        self.scenario.api.create(
            path("apis", "apps", "v1", "namespaces", self.namespace, "deployments"),
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "migchain-scheduler"},
                "spec": {
                    "replicas": 0,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"containers": [{"name": "kube-scheduler", "image": "registry.k8s.io/kube-scheduler"}]},
                    },
                },
            },
        )


def issuer_of(certs: Certs, leaf: str) -> str:
    certificate = x509.load_pem_x509_certificate(certs.data(leaf)["tls.crt"])
    for authority in x509.load_pem_x509_certificates(certs.data(CA)["ca.crt"]):
        try:
            certificate.verify_directly_issued_by(authority)
            return fingerprint(authority)
        except Exception:
            continue
    return ""


def test_migchain_certs_renews_leaves_and_rotates_the_ca_on_real_secrets(scenario: Scenario, capsys):
    certs = Certs(scenario, capsys)
    certs.create_scheduler_deployment()
    start = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    # Install: the CA is kept with its key, in a Secret of its own; kube-scheduler is told the bundle.
    certs.run(start)
    authority = certs.data(CA)
    assert certs.secret(CA)["type"] == "Opaque"
    assert {certs.secret(name)["type"] for name in (SERVING, CLIENT)} == {"kubernetes.io/tls"}
    key = serialization.load_pem_private_key(authority["tls.key"], password=None)
    assert key.public_key() == x509.load_pem_x509_certificate(authority["tls.crt"]).public_key()
    first_ca = certs.bundle()
    assert issuer_of(certs, SERVING) == issuer_of(certs, CLIENT) == first_ca[0]
    assert certs.data(SERVING)["ca.crt"] == certs.data(CLIENT)["ca.crt"] == authority["ca.crt"]
    assert certs.scheduler_trusts() == bundle_hash(authority["ca.crt"])
    # Again: nothing is written.
    versions = certs.versions()
    assert "nothing is due" in certs.run(start + DAY)
    assert certs.versions() == versions
    # Within the leaves' window: both renewed by the same CA, no restart of kube-scheduler.
    trusted = certs.scheduler_trusts()
    said = certs.run(start + 61 * DAY)
    assert said.count("within the renewal window") == 2
    renewed = certs.versions()
    assert renewed[CA] == versions[CA] and renewed[SERVING] != versions[SERVING] and renewed[CLIENT] != versions[CLIENT]
    assert certs.scheduler_trusts() == trusted
    # Within the CA's window: a new CA joins the bundle, kube-scheduler is restarted with it.
    due = start + POLICY.ca_life - POLICY.ca_renew_before
    certs.run(due - 40 * DAY)  # leaves renewed on the way
    said = certs.run(due)
    assert "a new CA joins the bundle" in said and "restarting Deployment" in said
    joined = certs.bundle()
    assert joined[0] == first_ca[0] and len(joined) == 2
    assert certs.data(CLIENT)["ca.crt"] == certs.data(CA)["ca.crt"]
    assert issuer_of(certs, SERVING) == first_ca[0]  # the old CA signs until the new one settled
    assert certs.scheduler_trusts() == bundle_hash(certs.data(CA)["ca.crt"])
    # Once the scheduler's rollout is complete (the real Deployment controller says so), the new CA signs.
    wait_until(certs.rolled_out, 30, "the Deployment controller to observe the restart")
    said = certs.run(due + 2 * HOUR)
    assert "signs from now on" in said
    assert issuer_of(certs, SERVING) == issuer_of(certs, CLIENT) == joined[1]
    assert certs.bundle() == joined
    # An hour after both leaves moved to the new CA, the old one leaves the bundle.
    said = certs.run(due + 4 * HOUR)
    assert "leaves the bundle" in said
    assert certs.bundle() == joined[1:]
    assert certs.data(SERVING)["ca.crt"] == certs.data(CLIENT)["ca.crt"] == certs.data(CA)["ca.crt"]
    wait_until(certs.rolled_out, 30, "the Deployment controller to observe the restart")
    assert "nothing is due" in certs.run(due + 5 * HOUR)


def test_secrets_of_an_older_migchain_are_taken_over_without_touching_the_leaves_in_use(scenario: Scenario, capsys):
    certs = Certs(scenario, capsys)
    old = CertificateAuthority("migchain-ca")
    secrets = path("api", "v1", "namespaces", scenario.namespace, "secrets")
    for spec in certs.specs:  # as `migchain certs` wrote them before: the CA key thrown away
        pair = old.issue(spec.name, hosts=spec.hosts, server=spec.server, client=spec.client)
        data = {"tls.crt": pair.certificate, "tls.key": pair.key, "ca.crt": old.certificate}
        scenario.api.create(
            secrets,
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "kubernetes.io/tls",
                "metadata": {"name": spec.secret},
                "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
            },
        )
    before = {name: certs.data(name)["tls.crt"] for name in (SERVING, CLIENT)}
    said = certs.run(datetime.datetime.now(datetime.UTC))
    assert "no CA key is kept" in said
    assert certs.bundle()[0] == old.fingerprint and len(certs.bundle()) == 2
    assert {name: certs.data(name)["tls.crt"] for name in (SERVING, CLIENT)} == before
    assert "tls.key" not in certs.data(CA) and "next.key" in certs.data(CA)


def test_kube_scheduler_uses_a_renewed_client_certificate_without_a_restart(scenario: Scenario):
    """kube-scheduler reads its extender client certificate files again for new connections (client-go)."""
    cluster = scenario.cluster
    scheduler = cluster.plane.processes["kube-scheduler"]
    assert scheduler.popen is not None and cluster.tls.authority is not None
    pid = scheduler.popen.pid
    client = cluster.tls.client
    create_node(scenario.api, f"gpu-{scenario.test}", A100, {"1g.5gb": 7}, scenario.test)
    scenario.create_pod("before", {"1g.5gb": 1})
    scenario.wait_bound("before")
    shown = x509.load_pem_x509_certificate(client.certificate.read_bytes()).not_valid_after_utc.timestamp()
    assert cluster.metric("migchain_certificate_expiry_timestamp_seconds", certificate="client") == shown

    # Renew it as the CronJob would: same CA, new key, a different end of validity.
    pair = cluster.tls.authority.issue("migchain-scheduler", client=True, validity=POLICY.leaf_life - DAY)
    renewed = x509.load_pem_x509_certificate(pair.certificate).not_valid_after_utc.timestamp()
    assert renewed != shown
    for target, content in ((client.key, pair.key), (client.certificate, pair.certificate)):
        staged = target.with_name(target.name + ".new")
        staged.write_bytes(content)
        os.replace(staged, target)
    started = time.monotonic()
    count = 0

    def shows_the_renewed_one() -> bool:
        nonlocal count
        # A connection kube-scheduler keeps alive keeps the certificate of its handshake: let it idle out
        # (gunicorn's keep-alive is 5 s); the pod's filter and bind then open a new one.
        time.sleep(7)
        count += 1
        scenario.create_pod(f"after-{count}", {"1g.5gb": 1})
        scenario.wait_bound(f"after-{count}")
        return cluster.metric("migchain_certificate_expiry_timestamp_seconds", certificate="client") == renewed

    wait_until(shows_the_renewed_one, 120, "kube-scheduler to show its renewed client certificate", interval=0)
    print(
        f"\nkube-scheduler showed its renewed client certificate {time.monotonic() - started:.1f} s after the swap, "
        f"on the connection of pod {count} after it"
    )
    assert scheduler.popen.pid == pid and scheduler.alive()  # never restarted
    assert count <= 3  # the first new connection or so: no failed call, every pod placed on the way
