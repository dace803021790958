"""Kubernetes Events on pods, so `kubectl describe pod` tells what migchain did and why."""

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

    def record(self, pod: Mapping[str, Any], reason: str, message: str, kind: str = "Normal") -> None:
        """Best effort: an event that cannot be written is logged, never fails the action it reports."""
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
                        "kind": "Pod",
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
