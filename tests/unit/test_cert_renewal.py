"""`migchain certs` renews: the CA key is kept, leaves are renewed ahead of expiry, the CA rotates with an overlap."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509

from extender.certs import (
    BUNDLE,
    POLICY,
    CertificateAuthority,
    Stored,
    fingerprint,
    migchain_leaves,
    renew,
)

DAY = datetime.timedelta(days=1)
T0 = datetime.datetime(2026, 3, 1, tzinfo=datetime.UTC)
# Handshakes check validity against the real clock: timelines that end now.
NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
HOUR = datetime.timedelta(hours=1)
SPECS = migchain_leaves("migchain-extender", "gpu", "migchain-extender-tls", "migchain-scheduler-client-tls")
SERVING, CLIENT = (spec.secret for spec in SPECS)


def certificate(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def bundle(stored: Stored) -> list[str]:
    return [fingerprint(c) for c in x509.load_pem_x509_certificates(stored.authority[BUNDLE])]


def handshake(server: Mapping[str, bytes], client: Mapping[str, bytes], tmp_path: Path) -> str:
    """A mutual-TLS handshake in memory between these Secrets' files; the client's name as the server verified it."""
    for name, data in (("server", server), ("client", client)):
        for key, value in data.items():
            (tmp_path / f"{name}-{key}").write_bytes(value)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp_path / "server-tls.crt", tmp_path / "server-tls.key")
    server_context.load_verify_locations(tmp_path / "server-ca.crt")
    server_context.verify_mode = ssl.CERT_REQUIRED
    client_context = ssl.create_default_context(cafile=str(tmp_path / "client-ca.crt"))
    client_context.load_cert_chain(tmp_path / "client-tls.crt", tmp_path / "client-tls.key")
    incoming, outgoing, back_in, back_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    ends = {
        "server": server_context.wrap_bio(incoming, back_out, server_side=True),
        "client": client_context.wrap_bio(back_in, outgoing, server_hostname="migchain-extender.gpu.svc"),
    }
    done: set[str] = set()
    for _ in range(10):
        for name, end in ends.items():
            if name not in done:
                try:
                    end.do_handshake()
                    done.add(name)
                except ssl.SSLWantReadError:
                    pass
        incoming.write(outgoing.read())
        back_in.write(back_out.read())
    assert done == {"server", "client"}
    peer = ends["server"].getpeercert()
    assert peer
    assert (("commonName", "migchain-scheduler"),) in peer["subject"]
    return "migchain-scheduler"


def test_the_ca_key_is_kept_and_leaves_live_90_days():
    plan, stored = renew(Stored({}, {}), SPECS, T0)
    assert plan.new_ca == "signer"
    authority = CertificateAuthority.load(stored.authority["tls.crt"], stored.authority["tls.key"])
    for spec in SPECS:
        leaf = certificate(stored.leaves[spec.secret]["tls.crt"])
        leaf.verify_directly_issued_by(certificate(authority.certificate))
        assert leaf.not_valid_after_utc - T0 == POLICY.leaf_life
        assert stored.leaves[spec.secret][BUNDLE] == stored.authority[BUNDLE] == authority.certificate


def test_a_run_with_nothing_due_stores_the_same_bytes():
    _, stored = renew(Stored({}, {}), SPECS, T0)
    plan, again = renew(stored, SPECS, T0 + 59 * DAY)
    assert not plan.changes
    assert again == stored


def test_leaves_are_renewed_by_the_same_ca_while_the_old_ones_are_still_valid(tmp_path: Path):
    _, first = renew(Stored({}, {}), SPECS, NOW - 61 * DAY)
    plan, second = renew(first, SPECS, NOW)
    assert set(plan.reissue) == {SERVING, CLIENT}
    assert second.authority == first.authority  # same CA, same bundle
    for secret in (SERVING, CLIENT):
        old, new = (certificate(s.leaves[secret]["tls.crt"]) for s in (first, second))
        assert old.serial_number != new.serial_number
        assert old.not_valid_after_utc > NOW + 28 * DAY  # the overlap: the old one still has weeks
    # old and new leaves mix freely during the overlap: kube-scheduler may still hold its old one
    assert handshake(second.leaves[SERVING], first.leaves[CLIENT], tmp_path) == "migchain-scheduler"
    assert handshake(first.leaves[SERVING], second.leaves[CLIENT], tmp_path) == "migchain-scheduler"


def test_the_ca_rotates_with_a_bundle_that_holds_old_and_new_while_leaves_roll(tmp_path: Path):
    due = NOW - DAY
    _, stored = renew(Stored({}, {}), SPECS, due - (POLICY.ca_life - POLICY.ca_renew_before))
    old_ca = bundle(stored)
    _, stored = renew(stored, SPECS, due - 40 * DAY)  # leaves renewed on the way there
    plan, joined = renew(stored, SPECS, due)
    assert plan.new_ca == "next"
    assert bundle(joined)[:1] == old_ca and len(bundle(joined)) == 2
    assert joined.authority["tls.key"] == stored.authority["tls.key"]  # the old CA still signs
    assert {"next.crt", "next.key"} <= joined.authority.keys()
    # kube-scheduler has not restarted with the new bundle: the new CA does not sign yet
    waiting, same = renew(joined, SPECS, due + 2 * HOUR, bundle_loaded=False)
    assert not waiting.changes and same == joined
    plan, promoted = renew(joined, SPECS, due + 2 * HOUR)
    assert plan.promote
    assert promoted.authority["tls.crt"] == joined.authority["next.crt"]
    assert bundle(promoted) == bundle(joined)
    # During the overlap an old leaf and a new leaf verify each other's ends.
    assert handshake(promoted.leaves[SERVING], joined.leaves[CLIENT], tmp_path) == "migchain-scheduler"
    assert handshake(joined.leaves[SERVING], promoted.leaves[CLIENT], tmp_path) == "migchain-scheduler"
    plan, retired = renew(promoted, SPECS, due + 4 * HOUR)
    assert plan.retire == tuple(old_ca)
    assert bundle(retired) == bundle(promoted)[1:]
    assert retired.bundle_changed == due + 4 * HOUR
    assert handshake(retired.leaves[SERVING], retired.leaves[CLIENT], tmp_path) == "migchain-scheduler"


def test_a_leaf_never_outlives_its_ca():
    authority = CertificateAuthority("short", datetime.timedelta(days=10), now=T0)
    pair = authority.issue("x", client=True, now=T0)
    assert certificate(pair.certificate).not_valid_after_utc == certificate(authority.certificate).not_valid_after_utc


def test_secrets_of_an_older_migchain_are_taken_over_without_breaking_them():
    """`migchain certs` used to throw the CA key away: the next run brings a new CA in beside the old one."""
    old = CertificateAuthority("migchain-ca")
    leaves = {
        spec.secret: {
            "tls.crt": (
                pair := old.issue(spec.name, hosts=spec.hosts, server=spec.server, client=spec.client)
            ).certificate,
            "tls.key": pair.key,
            BUNDLE: old.certificate,
        }
        for spec in SPECS
    }
    now = datetime.datetime.now(datetime.UTC)
    plan, stored = renew(Stored({}, leaves), SPECS, now)
    assert (plan.new_ca, plan.reissue) == ("next", ())
    assert bundle(stored)[0] == old.fingerprint
    assert "tls.key" not in stored.authority  # nothing signs until the new CA settles
    for secret in (SERVING, CLIENT):
        assert stored.leaves[secret]["tls.crt"] == leaves[secret]["tls.crt"]
        assert stored.leaves[secret][BUNDLE] == stored.authority[BUNDLE]
