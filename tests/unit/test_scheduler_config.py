"""scheduler-config.yaml: a valid KubeSchedulerConfiguration that wires in every MIG type of the shipped chains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from extender.config import load_rules

ROOT = Path(__file__).resolve().parents[2]


def config() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "scheduler-config.yaml").read_text())
    return document


def test_it_is_a_v1_kube_scheduler_configuration_with_one_binding_extender():
    document = config()
    assert document["apiVersion"] == "kubescheduler.config.k8s.io/v1"
    assert document["kind"] == "KubeSchedulerConfiguration"
    [extender] = document["extenders"]
    assert extender["filterVerb"] == "filter"
    assert "prioritizeVerb" not in extender  # the filter passes only the best nodes: one call a pod
    assert extender["bindVerb"] == "bind"
    assert extender["nodeCacheCapable"] is True
    # mutual TLS to the Service that manifests/ creates, with the files the scheduler's Secret mounts
    assert extender["urlPrefix"] == "https://migchain-extender.migchain-system.svc:443"
    assert extender["enableHTTPS"] is True
    assert extender["tlsConfig"] == {
        "caFile": "/etc/migchain/tls/ca.crt",
        "certFile": "/etc/migchain/tls/tls.crt",
        "keyFile": "/etc/migchain/tls/tls.key",
    }
    assert extender["httpTimeout"].endswith("s")
    # the extender is the one authority on MIG fit: it must see every feasible node
    assert document["percentageOfNodesToScore"] == 100


def test_managed_resources_are_every_shipped_mig_type_and_ignored_by_the_in_tree_fit():
    [extender] = config()["extenders"]
    managed = {entry["name"] for entry in extender["managedResources"]}
    assert all(entry["ignoredByScheduler"] is True for entry in extender["managedResources"])
    shipped: set[str] = set()
    for path in (ROOT / "chains").glob("*.yaml"):
        shipped |= load_rules([path]).types
    assert managed == shipped
