"""A forged journal ConfigMap on the real control plane: reported, never executed (issue 18, least privilege).

Anyone who may create a ConfigMap in migchain-system could write a journal
entry; migchain used to finish every entry it found, creating the pod it held
in whatever namespace it named. Now an entry migchain did not sign is left
alone, with a Warning Event on its ConfigMap and a count in
migchain_errors_total{component="journal", kind="rejected"}.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Any

import pytest

from extender.core.cluster import REPLACED_UID_ANNOTATION
from extender.kube.api import ApiError, path
from extender.kube.executor import JOURNAL_LABEL
from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import mig_pod

pytestmark = pytest.mark.e2e

JOURNAL_NAMESPACE = "migchain-system"
CONFIGMAPS = path("api", "v1", "namespaces", JOURNAL_NAMESPACE, "configmaps")


def planted(name: str, namespace: str, uid: str) -> dict[str, Any]:
    """The pod a forger would like migchain to create: privileged, with the host's process namespace."""
    pod = mig_pod(name, namespace, {})
    pod["metadata"].update(namespace=namespace, uid=uid)
    pod["spec"]["hostPID"] = True
    pod["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    return pod


def forged_entry(kind: str, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """A journal ConfigMap as migchain writes one, without migchain's signature (the forger lacks the key)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"migchain-journal-{before['metadata']['uid']}", "labels": {JOURNAL_LABEL: kind}},
        "data": {"original": json.dumps(before), "replacement": json.dumps(after), "written": "2026-11-30T00:00:00Z"},
    }


def rejections(scenario: Scenario, name: str) -> list[str]:
    items, _ = scenario.api.list_all(
        path("api", "v1", "namespaces", JOURNAL_NAMESPACE, "events"),
        fieldSelector=f"involvedObject.name={name},reason=JournalEntryRejected",
    )
    return [item.get("message", "") for item in items]


def test_a_forged_journal_configmap_is_reported_and_never_executed(scenario: Scenario):
    cluster, team = scenario.cluster, scenario.namespace
    borrow_uid, return_uid = str(uuid.uuid4()), str(uuid.uuid4())
    original = planted("planted-borrow", team, borrow_uid)
    replacement = json.loads(json.dumps(original))
    replacement["metadata"]["annotations"] = {REPLACED_UID_ANNOTATION: borrow_uid}
    replacement["spec"]["nodeName"] = f"gpu-{team}-none"
    entries = [
        forged_entry("borrow", original, replacement),
        forged_entry("return", planted("planted-return", team, return_uid), planted("planted-return", team, "")),
    ]
    names = [entry["metadata"]["name"] for entry in entries]
    rejected_before = cluster.metric("migchain_errors_total", component="journal", kind="rejected")
    try:
        for entry in entries:
            scenario.api.create(CONFIGMAPS, entry)
        # Both processes read the journal when they start (the extender also every minute, the returner
        # at the start of each lease term).
        started = time.monotonic()
        cluster.restart_extender(kill=False)
        returner = cluster.plane.processes["returner-returner-a"]  # the session's (others may have come and gone)
        returner.stop()
        returner.start()

        def outcome() -> tuple[list[str], bool]:
            created = [p["metadata"]["name"] for p in scenario.pods() if p["metadata"]["name"].startswith("planted-")]
            reported = all(rejections(scenario, name) for name in names)
            return created, reported

        def decided() -> bool:
            created, reported = outcome()
            return bool(created) or reported

        wait_until(decided, 90, "the forged entries to be reported (or executed)")
        reported_after = time.monotonic() - started
        time.sleep(3)  # a second recovery pass, or a late create, would show now
        created, reported = outcome()
        assert created == [], f"the forged journal entries were executed: {created} created in {team}"
        assert reported
        for name in names:  # once per process that read it (the extender's sweep may have come before its restart)
            messages = rejections(scenario, name)
            assert 1 <= len(messages) <= 2 and all("signature" in message for message in messages), messages
        assert cluster.metric("migchain_errors_total", component="journal", kind="rejected") >= rejected_before + 1
        # The entries are left for an admin to look at: never executed, never silently deleted.
        left = {item["metadata"]["name"] for item in scenario.api.list_all(CONFIGMAPS, labelSelector=JOURNAL_LABEL)[0]}
        assert set(names) <= left
        print(f"\nforged entries reported {reported_after:.1f}s after the restarts; no pod created")
    finally:
        for name in names:
            with contextlib.suppress(ApiError):
                scenario.api.delete(f"{CONFIGMAPS}/{name}")
        wait_until(lambda: cluster.lease_holder() == "returner-a", 60, "the returner to hold its lease")
