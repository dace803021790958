"""Kubernetes Events on pods (and journal entries), so `kubectl describe` tells what migchain did and why."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from typing import Any

from extender.core.cluster import PodRequest
from extender.kube.api import ApiError, KubeApi, path
from extender.metrics import Errors

log = logging.getLogger(__name__)

COMPONENT = "migchain"


def pod_reference(request: PodRequest) -> dict[str, Any]:
    """What `EventRecorder.record` needs of a pod known only from the cache (no object read from the API)."""
    return {"metadata": {"name": request.name, "namespace": request.namespace, "uid": request.uid}}


class EventRecorder:
    def __init__(self, api: KubeApi, host: str = "", errors: Errors | None = None) -> None:
        self.api = api
        self.host = host
        self.errors = errors if errors is not None else Errors()

    def record(
        self, pod: Mapping[str, Any], reason: str, message: str, kind: str = "Normal", *, about: str = "Pod"
    ) -> None:
        """Best effort: an event that cannot be written is logged, never fails the action it reports.

        `about`: the kind of the object, a Pod unless said otherwise (a journal entry's ConfigMap).
        """
        metadata = pod["metadata"]
        namespace = metadata.get("namespace") or "default"
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            self.api.create(
                path("api", "v1", "namespaces", namespace, "events"),
                {
                    "apiVersion": "v1",
                    "kind": "Event",
                    "metadata": {"generateName": f"{metadata['name']}.", "namespace": namespace},
                    "involvedObject": {
                        "apiVersion": "v1",
                        "kind": about,
                        "name": metadata["name"],
                        "namespace": namespace,
                        "uid": metadata.get("uid", ""),
                    },
                    "reason": reason,
                    "message": message,
                    "type": kind,
                    "source": {"component": COMPONENT, "host": self.host},
                    "reportingComponent": COMPONENT,
                    "reportingInstance": self.host or COMPONENT,
                    "firstTimestamp": now,
                    "lastTimestamp": now,
                    "count": 1,
                },
            )
        except ApiError as error:
            self.errors.count("events", "api")
            log.warning("could not record event %s on %s/%s: %s", reason, namespace, metadata["name"], error)


# Entries reported at most: the names come from whoever wrote ConfigMaps, so the memory of them is bounded.
MAX_REPORTED_ENTRIES = 10_000


class JournalRejections:
    """Reports a journal entry migchain does not believe, once per entry and process: a Warning Event
    JournalEntryRejected on its ConfigMap and migchain_errors_total{component="journal", kind="rejected"}."""

    def __init__(self, events: EventRecorder, errors: Errors) -> None:
        self.events = events
        self.errors = errors
        self._reported: set[str] = set()

    def __call__(self, entry: Mapping[str, Any], why: str) -> None:
        uid = str(entry["metadata"].get("uid", ""))
        if uid in self._reported:
            return
        if len(self._reported) >= MAX_REPORTED_ENTRIES:
            self._reported.clear()
        self._reported.add(uid)
        self.errors.count("journal", "rejected")
        self.events.record(
            entry,
            "JournalEntryRejected",
            f"migchain does not act on this journal entry: {why}. Look at who wrote it, then delete it.",
            "Warning",
            about="ConfigMap",
        )
