"""Mutual TLS between kube-scheduler and the extender: the certificates, the listen rules, the verbs' guard."""

from __future__ import annotations

import ssl
from pathlib import Path

import orjson
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from extender.certs import CertificateAuthority, service_hosts
from extender.cli import main as migchain
from extender.reload import RulesInForce
from extender.serve import transport_problem
from extender.store import SnapshotStore
from extender.web.app import WebSettings, create_app
from tests.unit.test_http import RULES


def test_the_serving_certificate_is_issued_by_the_ca_for_every_name_of_the_service():
    authority = CertificateAuthority("migchain-ca")
    pair = authority.issue("migchain-extender", hosts=service_hosts("migchain-extender", "gpu"), server=True)
    certificate = x509.load_pem_x509_certificate(pair.certificate)
    certificate.verify_directly_issued_by(x509.load_pem_x509_certificate(authority.certificate))
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [
        "migchain-extender",
        "migchain-extender.gpu",
        "migchain-extender.gpu.svc",
        "migchain-extender.gpu.svc.cluster.local",
    ]
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_a_client_certificate_cannot_serve_and_a_certificate_must_be_for_something():
    authority = CertificateAuthority("migchain-ca")
    client = x509.load_pem_x509_certificate(authority.issue("migchain-scheduler", client=True).certificate)
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    with pytest.raises(ValueError, match="server, a client or both"):
        authority.issue("nothing")


def test_certificates_from_the_cli_complete_a_mutual_tls_handshake(tmp_path: Path):
    """What `migchain certs --out` writes is enough for both ends: the server verifies the client and vice versa."""
    assert migchain(["certs", "--out", str(tmp_path), "--namespace", "gpu"]) == 0
    server_files, client_files = tmp_path / "migchain-extender-tls", tmp_path / "migchain-scheduler-client-tls"
    assert (server_files / "tls.key").stat().st_mode & 0o077 == 0
    assert (server_files / "ca.crt").read_bytes() == (client_files / "ca.crt").read_bytes()

    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(server_files / "tls.crt", server_files / "tls.key")
    server_context.load_verify_locations(server_files / "ca.crt")
    server_context.verify_mode = ssl.CERT_REQUIRED
    client_context = ssl.create_default_context(cafile=str(client_files / "ca.crt"))
    client_context.load_cert_chain(client_files / "tls.crt", client_files / "tls.key")

    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    back_in, back_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(incoming, back_out, server_side=True)
    client = client_context.wrap_bio(back_in, outgoing, server_hostname="migchain-extender.gpu.svc")
    done = {"server": False, "client": False}
    for _ in range(10):  # shuttle handshake records between the two ends in memory
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        incoming.write(outgoing.read())
        back_in.write(back_out.read())
    assert done == {"server": True, "client": True}
    peer = server.getpeercert()
    assert peer is not None
    assert (("commonName", "migchain-scheduler"),) in peer["subject"]


@pytest.mark.parametrize(
    ("bind", "files", "complaint"),
    [
        ("127.0.0.1:8888", (None, None, None), ""),
        ("[::1]:8888", (None, None, None), ""),
        ("localhost:8888", (None, None, None), ""),
        ("unix:/run/migchain.sock", (None, None, None), ""),
        ("0.0.0.0:8443", (None, None, None), "not a loopback address"),
        ("10.1.2.3:8443", ("tls.crt", "tls.key", None), "not a loopback address"),  # server-only TLS is not enough
        ("extender.example:8443", (None, None, None), "not a loopback address"),
        ("0.0.0.0:8443", ("tls.crt", None, None), "go together"),
        ("127.0.0.1:8888", (None, None, "ca.crt"), "needs --tls-cert-file"),
        ("0.0.0.0:8443", ("tls.crt", "tls.key", "ca.crt"), ""),
        ("0.0.0.0:8443", ("tls.crt", "tls.key", "missing.crt"), "missing.crt: no such file"),
    ],
)
def test_plain_http_is_only_for_loopback_and_off_it_mutual_tls_is_a_must(tmp_path: Path, bind, files, complaint):
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (tmp_path / name).write_text("PEM")

    def located(name: str | None) -> str | None:
        return None if name is None else str(tmp_path / name)

    cert, key, client_ca = files
    problem = transport_problem(bind, located(cert), located(key), located(client_ca))
    assert (complaint in problem) if complaint else problem == ""


def test_with_mutual_tls_the_verbs_refuse_a_caller_without_a_certificate():
    """The handshake already refuses such a caller (test_stalled_connections.py); the app does too."""
    client = create_app(
        WebSettings(require_client_certificate=True), RulesInForce.fixed(RULES), SnapshotStore()
    ).test_client()
    for verb in ("/filter", "/prioritize", "/bind"):
        answer = client.post(verb, data=b"{}", content_type="application/json")
        assert answer.status_code == 403, verb
        assert "client certificate" in orjson.loads(answer.data)["Error"]


class _VerifiedConnection:
    """What gunicorn puts in the WSGI environ for a TLS connection whose client showed a valid certificate."""

    def __init__(self, name: str = "migchain-scheduler", alternatives: tuple[tuple[str, str], ...] = ()) -> None:
        self._certificate: dict[str, object] = {"subject": ((("organizationName", "x"),), (("commonName", name),))}
        if alternatives:
            self._certificate["subjectAltName"] = alternatives

    def getpeercert(self) -> dict[str, object]:
        return self._certificate


FILTER = b'{"Pod": {"metadata": {"name": "p", "uid": "u"}}, "NodeNames": []}'


def test_with_mutual_tls_a_verified_caller_reaches_the_verbs():
    client = create_app(
        WebSettings(require_client_certificate=True), RulesInForce.fixed(RULES), SnapshotStore()
    ).test_client()
    answer = client.post(
        "/filter", data=FILTER, content_type="application/json", environ_base={"gunicorn.socket": _VerifiedConnection()}
    )
    assert answer.status_code == 200


@pytest.mark.parametrize(
    ("connection", "status"),
    [
        (_VerifiedConnection(), 200),
        (_VerifiedConnection("someone-else"), 403),
        (_VerifiedConnection("someone-else", (("DNS", "migchain-scheduler"),)), 200),
        (_VerifiedConnection("someone-else", (("URI", "spiffe://cluster/ns/migchain-system/sa/x"),)), 403),
        (_VerifiedConnection("migchain-scheduler\x1b[2J" * 40), 403),
    ],
    ids=["scheduler", "other-name", "dns-alternative-name", "other-uri", "hostile-name"],
)
def test_a_pinned_identity_lets_only_that_certificate_reach_the_verbs(connection, status):
    """--client-identity: a certificate the CA signed for another name (another component) is not the scheduler."""
    client = create_app(
        WebSettings(require_client_certificate=True, client_identities=frozenset({"migchain-scheduler"})),
        RulesInForce.fixed(RULES),
        SnapshotStore(),
    ).test_client()
    environ = {"gunicorn.socket": connection}
    for verb in ("/filter", "/prioritize"):
        answer = client.post(verb, data=FILTER, content_type="application/json", environ_base=environ)
        assert answer.status_code == status, verb
        if status == 403:
            message = orjson.loads(answer.data)["Error"]
            assert "not kube-scheduler's" in message
            assert "\x1b" not in message and len(message) < 400  # the name is escaped and cut short
