"""The real extender (gunicorn, TLS) serves renewed certificates without a restart and without a failed handshake.

The files are laid out and replaced as kubelet updates a mounted Secret: a
new timestamped folder, the `..data` symlink swapped, the old folder deleted.
"""

from __future__ import annotations

import datetime
import http.client
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from extender.certs import CertificateAuthority, KeyPair

ROOT = Path(__file__).resolve().parents[2]
SHORT = datetime.timedelta(hours=2)  # short-lived, as a test CronJob would issue them
HOSTS = ("127.0.0.1", "localhost")

# The verbs port answers every path but the verbs 404 (JSON): an answer at all
# means the handshake, the part under test, went through.
PROBE = "/healthz"
ANSWERED = 404


def kubelet_update(folder: Path, files: Mapping[str, bytes]) -> None:
    """Replace a mounted Secret's files at once, as kubelet's atomic writer does."""
    folder.mkdir(exist_ok=True)
    stamp = folder / f"..{time.time_ns()}"
    stamp.mkdir()
    for name, data in files.items():
        (stamp / name).write_bytes(data)
    swap = folder / "..data_tmp"
    swap.symlink_to(stamp.name)
    os.replace(swap, folder / "..data")
    for name in files:
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(f"..data/{name}")
    for old in folder.glob("..1*"):
        if old != stamp:
            shutil.rmtree(old)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serial(pem_or_der: bytes) -> int:
    if pem_or_der.startswith(b"-----"):
        return int(x509.load_pem_x509_certificate(pem_or_der).serial_number)
    return int(x509.load_der_x509_certificate(pem_or_der).serial_number)


@dataclass
class Extender:
    """migchain-extender serving mutual TLS from a Secret-like folder, and a client that speaks as kube-scheduler."""

    folder: Path
    ca: CertificateAuthority
    port: int
    process: subprocess.Popen[bytes]
    client_files: Path
    log: Path
    health_port: int
    pid: int = 0

    def serve(self, pair: KeyPair, bundle: bytes | None = None) -> None:
        kubelet_update(self.folder, {"tls.crt": pair.certificate, "tls.key": pair.key, "ca.crt": bundle or b""})

    def client(self, pair: KeyPair | None = None, trust: bytes | None = None) -> ssl.SSLContext:
        pair = pair or self.ca.issue("migchain-scheduler", client=True, validity=SHORT)
        stem = self.client_files / str(serial(pair.certificate))
        certificate, key = stem.with_suffix(".crt"), stem.with_suffix(".key")
        certificate.write_bytes(pair.certificate)
        key.write_bytes(pair.key)
        context = ssl.create_default_context(cadata=(trust or self.ca.certificate).decode())
        context.load_cert_chain(certificate, key)
        return context

    def get(self, route: str, context: ssl.SSLContext) -> tuple[int, int, bytes]:
        """(the serving certificate's serial, HTTP status, body) over a new connection."""
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=10)
        try:
            connection.connect()
            assert isinstance(connection.sock, ssl.SSLSocket)
            served = connection.sock.getpeercert(binary_form=True)
            assert served is not None
            connection.request("GET", route)
            answer = connection.getresponse()
            return serial(served), answer.status, answer.read()
        finally:
            connection.close()

    def metric(self, context: ssl.SSLContext, name: str, **labels: str) -> float | None:
        """A sample of the extender's /metrics, on its health port (plain HTTP; `context` is not needed there)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return None


@pytest.fixture
def extender(tmp_path: Path) -> Iterator[Extender]:
    ca = CertificateAuthority("migchain-ca")
    folder, clients = tmp_path / "tls", tmp_path / "clients"
    clients.mkdir()
    port, health_port, log_file = free_port(), free_port(), tmp_path / "extender.log"
    first = ca.issue("migchain-extender", hosts=HOSTS, server=True, validity=SHORT)
    kubelet_update(folder, {"tls.crt": first.certificate, "tls.key": first.key, "ca.crt": ca.certificate})
    environment = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "extender.serve",
                f"--bind=127.0.0.1:{port}",
                f"--health-bind=127.0.0.1:{health_port}",
                f"--tls-cert-file={folder / 'tls.crt'}",
                f"--tls-key-file={folder / 'tls.key'}",
                f"--client-ca-file={folder / 'ca.crt'}",
                "--chains",
                str(ROOT / "chains" / "a100-40gb.yaml"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=ROOT,
        )
    running = Extender(folder, ca, port, process, clients, log_file, health_port, process.pid)
    try:  # a start that fails must not leave the server running
        probe = running.client()
        deadline = time.monotonic() + 60
        while True:
            try:
                if running.get(PROBE, probe)[1] == ANSWERED:
                    break
            except OSError:
                pass
            assert running.process.poll() is None, running.log.read_text()
            assert time.monotonic() < deadline, running.log.read_text()
            time.sleep(0.2)
        yield running
    finally:
        running.process.terminate()
        try:
            running.process.wait(15)
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait(5)


@dataclass
class Load:
    """Threads opening new connections as kube-scheduler, each a full handshake and a request, until stopped."""

    extender: Extender
    context: ssl.SSLContext
    stop: threading.Event = field(default_factory=threading.Event)
    served: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, serial served)
    failures: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                number, status, _ = self.extender.get(PROBE, self.context)
                assert status == ANSWERED, status
                self.served.append((time.monotonic(), number))
            except (OSError, AssertionError, http.client.HTTPException) as error:
                self.failures.append(repr(error))

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(3)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(20)


def wait_for(predicate, timeout: float = 10.0) -> float:
    """Seconds until predicate() holds; fails after `timeout` (generous: the machine is shared)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.05)
    return time.monotonic() - start


def test_renewed_serving_certificates_are_served_without_a_restart_and_no_handshake_fails(extender: Extender):
    swaps, delays = 10, []
    with Load(extender, extender.client()) as load:
        wait_for(lambda: len(load.served) > 5)
        for _ in range(swaps):
            pair = extender.ca.issue("migchain-extender", hosts=HOSTS, server=True, validity=SHORT)
            extender.serve(pair, extender.ca.certificate)
            swapped, fresh = time.monotonic(), serial(pair.certificate)
            delays.append(wait_for(lambda f=fresh, s=swapped: any(n == f and t > s for t, n in load.served[-50:])))
        handshakes = len(load.served)
    print(
        f"\nrotation: {swaps} swaps, {handshakes} handshakes during them, {len(load.failures)} failed; "
        f"new certificate served {max(delays):.2f} s at most after its swap"
    )
    assert load.failures == []
    assert extender.process.poll() is None and extender.process.pid == extender.pid  # never restarted
    # The days left of the certificate now served, on the extender's own metrics.
    not_after = x509.load_pem_x509_certificate(pair.certificate).not_valid_after_utc
    context = extender.client()
    assert extender.metric(context, "migchain_certificate_expiry_timestamp_seconds", certificate="serving") == (
        not_after.timestamp()
    )
    days = extender.metric(context, "migchain_certificate_days_left", certificate="serving")
    assert days is not None and abs(days - SHORT / datetime.timedelta(days=1)) < 0.01


def test_a_broken_renewal_never_replaces_the_certificate_in_use(extender: Extender):
    context = extender.client()
    served = extender.get(PROBE, context)[0]
    good, other = (extender.ca.issue("migchain-extender", hosts=HOSTS, server=True, validity=SHORT) for _ in "ab")
    with Load(extender, context) as load:
        # A key that is not the certificate's (a renewal stopped halfway, a bad copy by hand).
        extender.serve(KeyPair(good.certificate, other.key), extender.ca.certificate)
        time.sleep(3)  # three checks of the files at least
        broken = len(load.served)
        assert load.failures == []
        assert {n for _, n in load.served} == {served}
        extender.serve(good, extender.ca.certificate)
        wait_for(lambda: any(n == serial(good.certificate) for _, n in load.served[-50:]))
    print(f"\nbroken renewal: {broken} handshakes while the bad pair was on disk, {len(load.failures)} failed")
    assert load.failures == []
    assert extender.metric(context, "migchain_certificate_reload_failures_total") == 1.0


def test_a_rotated_client_ca_bundle_is_trusted_at_once_and_a_retired_ca_no_more(extender: Extender):
    serving = extender.ca.issue("migchain-extender", hosts=HOSTS, server=True, validity=SHORT)
    old_ca, new_ca = extender.ca, CertificateAuthority("migchain-ca-2")
    old_client = extender.client()
    new_pair = new_ca.issue("migchain-scheduler", client=True, validity=SHORT)
    new_client = extender.client(new_pair)
    with pytest.raises(ssl.SSLError):
        extender.get(PROBE, new_client)  # not trusted yet
    # The new CA joins the bundle: both clients are accepted, by the same process.
    extender.serve(serving, old_ca.certificate + new_ca.certificate)
    wait_for(lambda: _accepted(extender, new_client))
    assert extender.get(PROBE, old_client)[1] == ANSWERED
    not_after = x509.load_pem_x509_certificate(new_pair.certificate).not_valid_after_utc.timestamp()
    assert extender.metric(old_client, "migchain_certificate_expiry_timestamp_seconds", certificate="client-ca") == (
        x509.load_pem_x509_certificate(new_ca.certificate).not_valid_after_utc.timestamp()
    )
    assert extender.get(PROBE, new_client)[1] == ANSWERED
    assert extender.metric(new_client, "migchain_certificate_expiry_timestamp_seconds", certificate="client") == (
        not_after
    )
    # The old CA leaves the bundle: its client is refused.
    extender.serve(serving, new_ca.certificate)
    wait_for(lambda: not _accepted(extender, old_client))
    assert extender.get(PROBE, new_client)[1] == ANSWERED
    assert extender.process.pid == extender.pid


def _accepted(extender: Extender, context: ssl.SSLContext) -> bool:
    try:
        return extender.get(PROBE, context)[1] == ANSWERED
    except (ssl.SSLError, OSError):
        return False


def test_the_extenders_own_serving_certificate_cannot_call_it_as_the_scheduler(extender: Extender):
    """The CA signs two leaves only, each for one use: the serving one (serverAuth) is no client certificate."""
    serving = extender.ca.issue("migchain-extender", hosts=HOSTS, server=True, validity=SHORT)
    assert not _accepted(extender, extender.client(serving))
    assert _accepted(extender, extender.client())
