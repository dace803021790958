"""`migchain certs` as the certs Job and CronJob run it, on folders laid out as a mounted Secret (--out)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from extender.cli import main as migchain

SERVING, CLIENT = "migchain-extender-tls", "migchain-scheduler-client-tls"
DAY = datetime.timedelta(days=1)
T0 = datetime.datetime(2026, 3, 1, tzinfo=datetime.UTC)


def certificate(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def run_certs(out: Path, capsys) -> str:
    assert migchain(["certs", "--out", str(out), "--namespace", "gpu"]) == 0
    return str(capsys.readouterr().out)


def test_migchain_certs_keeps_the_ca_key_for_the_next_run(tmp_path: Path, capsys):
    run_certs(tmp_path, capsys)
    ca = tmp_path / "migchain-ca"
    assert (ca / "tls.key").stat().st_mode & 0o077 == 0, "the CA key is kept, readable by its owner only"
    authority = certificate((ca / "tls.crt").read_bytes())
    key = serialization.load_pem_private_key((ca / "tls.key").read_bytes(), password=None)
    assert key.public_key() == authority.public_key()
    for secret in (SERVING, CLIENT):
        leaf = certificate((tmp_path / secret / "tls.crt").read_bytes())
        leaf.verify_directly_issued_by(authority)
        assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= 90 * DAY + datetime.timedelta(hours=1)


def test_migchain_certs_again_changes_nothing_and_says_so(tmp_path: Path, capsys):
    run_certs(tmp_path, capsys)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert "nothing is due" in run_certs(tmp_path, capsys)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files


def test_migchain_certs_renews_a_leaf_within_its_window_and_swaps_the_files_at_once(tmp_path: Path, capsys):
    from extender.cert_files import project
    from extender.certs import Stored, migchain_leaves, renew

    specs = migchain_leaves("migchain-extender", "gpu", SERVING, CLIENT)
    _, stored = renew(Stored({}, {}), specs, datetime.datetime.now(datetime.UTC) - 70 * DAY)

    project(tmp_path / "migchain-ca", stored.authority, T0)
    for secret, data in stored.leaves.items():
        project(tmp_path / secret, data, T0)
    before = (tmp_path / SERVING / "tls.crt").read_bytes()
    said = run_certs(tmp_path, capsys)
    assert "within the renewal window" in said
    after = tmp_path / SERVING / "tls.crt"
    assert after.read_bytes() != before
    assert (tmp_path / "migchain-ca" / "tls.crt").read_bytes() == stored.authority["tls.crt"]  # the same CA
    # as kubelet lays out a Secret: files are links into ..data, which a renewal swaps whole
    assert os.readlink(after) == "..data/tls.crt"
    assert len([p for p in (tmp_path / SERVING).iterdir() if p.name.startswith("..2")]) == 1  # the old one is gone


@pytest.mark.parametrize("secret", [SERVING, CLIENT])
def test_migchain_certs_replaces_a_deleted_leaf(tmp_path: Path, capsys, secret):
    run_certs(tmp_path, capsys)
    for file in (tmp_path / secret).iterdir():
        if file.is_symlink() or file.is_file():
            file.unlink()
    assert "missing or unreadable" in run_certs(tmp_path, capsys)
    assert certificate((tmp_path / secret / "tls.crt").read_bytes())


@pytest.mark.parametrize(
    ("annotation", "status", "loaded"),
    [
        ("abc", {"observedGeneration": 3, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}, True),
        ("old", {"observedGeneration": 3, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}, False),
        ("abc", {"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}, False),
        ("abc", {"observedGeneration": 3, "replicas": 2, "updatedReplicas": 1, "availableReplicas": 2}, False),
        ("abc", {"observedGeneration": 3, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 0}, False),
    ],
)
def test_a_new_ca_waits_for_kube_schedulers_rollout_with_the_new_bundle_to_complete(annotation, status, loaded):
    """Old pods (replicas > updated), a pod not yet available, or a rollout not yet observed: not loaded."""
    from extender.kube.certs import TRUST_BUNDLE, _runs_with

    deployment = {
        "metadata": {"generation": 3},
        "spec": {"replicas": 1, "template": {"metadata": {"annotations": {TRUST_BUNDLE: annotation}}}},
        "status": status,
    }
    assert _runs_with(deployment, "abc") is loaded
