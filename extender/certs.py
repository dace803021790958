"""Certificates for mutual TLS between kube-scheduler and the extender: a CA, serving and client key pairs, renewal.

Computation only: it returns PEM bytes and writes nothing. `migchain certs`
stores them as Secrets (extender/kube/certs.py) or files; the e2e control
plane issues its own with the same code. What to renew and when is decided by
extender/core/renewal.py; `renew` reads what is stored, asks it, and returns
what to store instead.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from extender.core.renewal import Authority, CertState, Leaf, RenewalPlan, RenewalPolicy, plan_renewal

POLICY = RenewalPolicy()
CA_VALIDITY = POLICY.ca_life
# Short, and renewed a month ahead by the migchain-certs CronJob (or
# cert-manager): a leaked key is good for weeks, not years, and renewal runs
# often enough to be known to work.
LEAF_VALIDITY = POLICY.leaf_life
# Clocks of the nodes differ by a little; a certificate valid from "now" on
# the issuing node could be not yet valid on another one.
CLOCK_SKEW = datetime.timedelta(minutes=5)

# The keys of the CA Secret: the CA that signs, the CA that will (during a
# rotation), and the bundle both ends trust. Each leaf Secret holds
# tls.crt, tls.key and that same bundle as ca.crt.
SIGNER = ("tls.crt", "tls.key")
NEXT = ("next.crt", "next.key")
BUNDLE = "ca.crt"


@dataclass(frozen=True)
class KeyPair:
    certificate: bytes  # PEM
    key: bytes  # PEM, PKCS#8, unencrypted: Secrets and files are the protection


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _alternative_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now if now is not None else datetime.datetime.now(datetime.UTC)


def fingerprint(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex()


class CertificateAuthority:
    """A self-signed CA that exists only to issue the extender's and the scheduler's certificates."""

    def __init__(
        self, name: str, validity: datetime.timedelta = CA_VALIDITY, *, now: datetime.datetime | None = None
    ) -> None:
        self._key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        start = _now(now)
        self._certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - CLOCK_SKEW)
            .not_valid_after(start + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )  # keyCertSign, cRLSign
            # During a rotation two CAs are trusted at once: the key identifiers
            # let a verifier pick the one that signed a certificate.
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    @classmethod
    def load(cls, certificate: bytes, key: bytes) -> CertificateAuthority:
        """A CA kept from an earlier run; ValueError when the key is not the certificate's."""
        authority = cls.__new__(cls)
        authority._certificate = x509.load_pem_x509_certificate(certificate)
        loaded = serialization.load_pem_private_key(key, password=None)
        if not isinstance(loaded, rsa.RSAPrivateKey) or loaded.public_key() != authority._certificate.public_key():
            raise ValueError("the CA key is not the CA certificate's")
        authority._key = loaded
        return authority

    @property
    def certificate(self) -> bytes:
        return self._certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key(self) -> bytes:
        """The CA's private key (PEM): kept in a Secret only migchain's certs ServiceAccount reads."""
        return _pem_key(self._key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self._certificate)

    def issue(
        self,
        name: str,
        *,
        hosts: Sequence[str] = (),
        organizations: Sequence[str] = (),
        server: bool = False,
        client: bool = False,
        validity: datetime.timedelta = LEAF_VALIDITY,
        now: datetime.datetime | None = None,
    ) -> KeyPair:
        """A leaf certificate for `name`: serving `hosts` (DNS names or IPs) and/or authenticating as a client.

        It never outlives the CA: a verifier would refuse it past the CA's end anyway.
        """
        if not (server or client):
            raise ValueError("a certificate must be for a server, a client or both")
        key = _new_key()
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
        attributes += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
        start = _now(now)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self._certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - CLOCK_SKEW)
            .not_valid_after(min(start + validity, self._certificate.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
            )  # digitalSignature, keyEncipherment
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        if hosts:
            builder = builder.add_extension(_alternative_names(hosts), critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        return KeyPair(certificate.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def service_hosts(service: str, namespace: str) -> tuple[str, ...]:
    """Every name a Service is reached by inside the cluster."""
    return (
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    )


# -- renewal ----------------------------------------------------------------------


@dataclass(frozen=True)
class LeafSpec:
    """A leaf migchain keeps: where it is stored and what it must say."""

    secret: str
    name: str
    hosts: tuple[str, ...] = ()
    server: bool = False
    client: bool = False


def migchain_leaves(service: str, namespace: str, server_secret: str, client_secret: str) -> tuple[LeafSpec, ...]:
    """The extender's serving certificate (the Service's names) and kube-scheduler's client certificate."""
    return (
        LeafSpec(server_secret, service, service_hosts(service, namespace), server=True),
        LeafSpec(client_secret, "migchain-scheduler", client=True),
    )


@dataclass(frozen=True)
class Stored:
    """What the CA Secret and the leaf Secrets (or folders) hold; an empty mapping for one that does not exist."""

    authority: Mapping[str, bytes]
    leaves: Mapping[str, Mapping[str, bytes]]
    bundle_changed: datetime.datetime | None = None


def renew(
    stored: Stored,
    specs: Sequence[LeafSpec],
    now: datetime.datetime,
    policy: RenewalPolicy = POLICY,
    *,
    bundle_loaded: bool = True,
) -> tuple[RenewalPlan, Stored]:
    """What to store instead of `stored` at `now`, and the plan that says why (unchanged when nothing is due)."""
    bundle = trusted_bundle(stored)
    signer = _kept_authority(stored.authority, SIGNER)
    upcoming = _kept_authority(stored.authority, NEXT)
    for kept in (signer, upcoming):
        if kept is not None and kept.fingerprint not in {fingerprint(c) for c in bundle}:
            bundle.append(x509.load_pem_x509_certificate(kept.certificate))  # a bundle repaired by hand
    state = CertState(
        trusted=tuple(Authority(fingerprint(c), c.not_valid_after_utc) for c in bundle),
        leaves={spec.secret: _leaf(stored.leaves.get(spec.secret, {}), spec, bundle) for spec in specs},
        signer=signer.fingerprint if signer else "",
        next=upcoming.fingerprint if upcoming else "",
        bundle_changed=stored.bundle_changed,
        bundle_loaded=bundle_loaded,
    )
    plan = plan_renewal(state, now, policy)

    name = f"migchain-ca-{now:%Y%m%dT%H%M%SZ}"
    if plan.new_ca == "signer":
        signer, upcoming = CertificateAuthority(name, policy.ca_life, now=now), None
        bundle.append(x509.load_pem_x509_certificate(signer.certificate))
    elif plan.new_ca == "next":
        upcoming = CertificateAuthority(name, policy.ca_life, now=now)
        bundle.append(x509.load_pem_x509_certificate(upcoming.certificate))
    if plan.promote:
        signer, upcoming = upcoming, None
    leaves = {secret: dict(data) for secret, data in stored.leaves.items()}
    for spec in specs:
        if spec.secret in plan.reissue:
            assert signer is not None, "the planner issues leaves only where a CA signs"
            pair = signer.issue(
                spec.name, hosts=spec.hosts, server=spec.server, client=spec.client, validity=policy.leaf_life, now=now
            )
            leaves[spec.secret] = {SIGNER[0]: pair.certificate, SIGNER[1]: pair.key}
    trusted = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in bundle if fingerprint(c) not in plan.retire)
    for spec in specs:
        if leaves.get(spec.secret):
            leaves[spec.secret][BUNDLE] = trusted
    authority = {BUNDLE: trusted}
    for kept, (certificate, key) in ((signer, SIGNER), (upcoming, NEXT)):
        if kept is not None:
            authority |= {certificate: kept.certificate, key: kept.key}
    changed = stored.bundle_changed if trusted == stored.authority.get(BUNDLE) else now
    return plan, Stored(authority, leaves, changed)


def trusted_bundle(stored: Stored) -> list[x509.Certificate]:
    """The CAs both ends trust: the CA Secret's bundle, or (certificates of an older migchain) the leaves' CAs."""
    sources = [stored.authority[BUNDLE]] if stored.authority.get(BUNDLE) else []
    sources = sources or [data[BUNDLE] for data in stored.leaves.values() if data.get(BUNDLE)]
    found: dict[str, x509.Certificate] = {}
    for pem in sources:
        try:
            certificates = x509.load_pem_x509_certificates(pem)
        except ValueError:
            continue  # an unreadable bundle trusts nothing
        for certificate in certificates:
            found.setdefault(fingerprint(certificate), certificate)
    return list(found.values())


def _kept_authority(data: Mapping[str, bytes], keys: tuple[str, str]) -> CertificateAuthority | None:
    certificate, key = (data.get(name) for name in keys)
    if not certificate or not key:
        return None
    try:
        return CertificateAuthority.load(certificate, key)
    except ValueError:
        return None  # a broken CA Secret: the planner sees no kept key and replaces the CA with an overlap


def _leaf(data: Mapping[str, bytes], spec: LeafSpec, bundle: Sequence[x509.Certificate]) -> Leaf | None:
    try:
        certificate = x509.load_pem_x509_certificate(data[SIGNER[0]])
        key = serialization.load_pem_private_key(data[SIGNER[1]], password=None)
    except (KeyError, ValueError, TypeError):
        return None
    issuer = ""
    for authority in bundle:
        try:
            certificate.verify_directly_issued_by(authority)
        except (ValueError, TypeError, InvalidSignature):
            continue
        issuer = fingerprint(authority)
        break
    return Leaf(
        issuer=issuer,
        issued=certificate.not_valid_before_utc + CLOCK_SKEW,
        not_after=certificate.not_valid_after_utc,
        as_wanted=key.public_key() == certificate.public_key() and describes(certificate, spec),
    )


def describes(certificate: x509.Certificate, spec: LeafSpec) -> bool:
    """The certificate names what `spec` asks for, with the same usages."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        usages = set(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return False
    try:
        alternatives = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts = {str(n) for n in alternatives.get_values_for_type(x509.DNSName)}
        hosts |= {str(n) for n in alternatives.get_values_for_type(x509.IPAddress)}
    except x509.ExtensionNotFound:
        hosts = set()
    wanted = {ExtendedKeyUsageOID.SERVER_AUTH} if spec.server else set()
    wanted |= {ExtendedKeyUsageOID.CLIENT_AUTH} if spec.client else set()
    return [n.value for n in names] == [spec.name] and hosts == set(spec.hosts) and usages == wanted
