"""Leader election on a coordination.k8s.io/v1 Lease, as client-go does it: one holder acts, the others wait.

A replica leads while its last successful renewal is younger than the lease
duration less one renewal period; it stops acting before any other replica
may take the lease over, so two replicas never act at once.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from typing import Any

from extender.kube.api import ApiError, KubeApi, path
from extender.metrics import Errors

log = logging.getLogger(__name__)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _micro(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElection:
    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        name: str,
        identity: str,
        *,
        duration: float = 15.0,
        renew: float = 5.0,
        errors: Errors | None = None,
    ) -> None:
        self.api = api
        self.errors = errors if errors is not None else Errors()
        self.resource = path("apis", "coordination.k8s.io", "v1", "namespaces", namespace, "leases", name)
        self.collection = path("apis", "coordination.k8s.io", "v1", "namespaces", namespace, "leases")
        self.name = name
        self.identity = identity
        self.duration = duration
        self.renew = renew
        self._valid_until = 0.0
        self._was_leading = False

    def leading(self) -> bool:
        return time.monotonic() < self._valid_until

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                won = self._acquire_or_renew()
            except Exception as error:  # a broken connection is a lost renewal, nothing worse
                self.errors.count("lease", "api")
                log.warning("lease %s: %s", self.name, error)
                won = False
            if won:
                self._valid_until = started + self.duration - self.renew
            if won != self._was_leading:
                log.info("%s %s the lease %s", self.identity, "holds" if won else "lost", self.name)
                self._was_leading = won
            stop.wait(self.renew)

    def _acquire_or_renew(self) -> bool:
        now = _now()
        try:
            lease = self.api.get(self.resource)
        except ApiError as error:
            if error.status != 404:
                raise
            return self._write(None, now, transitions=0, acquired=now)
        spec: dict[str, Any] = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        if holder == self.identity:
            acquired = spec.get("acquireTime")
            return self._write(lease, now, transitions=int(spec.get("leaseTransitions") or 0), acquired=acquired)
        renewed = spec.get("renewTime")
        expires = (
            datetime.datetime.fromisoformat(renewed)
            + datetime.timedelta(seconds=int(spec.get("leaseDurationSeconds") or 0))
            if renewed
            else now
        )
        if holder and expires > now:
            return False
        return self._write(lease, now, transitions=int(spec.get("leaseTransitions") or 0) + 1, acquired=now)

    def _write(self, lease: dict[str, Any] | None, now: datetime.datetime, *, transitions: int, acquired: Any) -> bool:
        metadata: dict[str, str] = {"name": self.name}
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(self.duration),
                "acquireTime": acquired if isinstance(acquired, str) else _micro(acquired),
                "renewTime": _micro(now),
                "leaseTransitions": transitions,
            },
        }
        try:
            if lease is None:
                self.api.create(self.collection, body)
            else:
                # resourceVersion makes the write lose any race with another replica.
                metadata["resourceVersion"] = lease["metadata"]["resourceVersion"]
                self.api.request("PUT", self.resource, body)
        except ApiError as error:
            if error.status == 409:
                return False
            raise
        return True
