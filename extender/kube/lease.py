"""Leader election on a coordination.k8s.io/v1 Lease, as client-go does it: one holder acts, the others wait.

A replica leads while its last successful renewal is younger than the lease
duration less one renewal period; it stops acting before any other replica
may take the lease over, so two replicas never act at once.

Another replica takes the lease over only once it has seen the same version
of it, unchanged, for a whole lease duration on its own clock (client-go's
observedTime), never by comparing the holder's renewTime with its own wall
clock: clocks of two nodes differ, their rates hardly do. So the old holder
has stopped for at least one renewal period when the new one starts.
"""

from __future__ import annotations

import datetime
import logging
import math
import threading
import time
from collections.abc import Callable
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
        retry: float | None = None,
        errors: Errors | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`renew`: how often the holder renews, and how long before its lease could expire it stops acting.
        `retry`: how often a replica that does not lead (or failed to renew) tries again; `renew` by default."""
        self.api = api
        self.errors = errors if errors is not None else Errors()
        self.resource = path("apis", "coordination.k8s.io", "v1", "namespaces", namespace, "leases", name)
        self.collection = path("apis", "coordination.k8s.io", "v1", "namespaces", namespace, "leases")
        self.name = name
        self.identity = identity
        self.duration = duration
        self.renew = renew
        self.retry = renew if retry is None else retry
        self.clock = clock
        self._valid_until = 0.0
        self._was_leading = False
        self.term = 0  # counts the times this replica started leading; each may follow another holder's acts
        self.holder = ""  # the holder as last read
        self._observed: tuple[str, float] = ("", 0.0)  # (resourceVersion, when first seen) of another's lease
        self._lapses_at = 0.0  # when that version, if it stays unchanged, may be taken over

    def leading(self) -> bool:
        return self.clock() < self._valid_until

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            stop.wait(self.try_once())

    def try_once(self) -> float:
        """One attempt to take or renew the lease; returns how long to wait before the next."""
        started = self.clock()
        try:
            won = self._acquire_or_renew()
        except Exception as error:  # a broken connection is a lost renewal, nothing worse
            self.errors.count("lease", "api")
            log.warning("lease %s: %s", self.name, error)
            won = False
        if won:
            if not self.leading():
                self.term += 1
            self._valid_until = started + self.duration - self.renew
            self.holder = self.identity
        if won != self._was_leading:
            log.info("%s %s the lease %s", self.identity, "holds" if won else "lost", self.name)
            self._was_leading = won
        if won:
            return self.renew
        # Look again right when another's lease would lapse, not up to a retry period later
        # (never sooner than a retry period once it has lapsed: a failing write is not hammered).
        until = self._lapses_at - self.clock()
        if self.holder and self.holder != self.identity and 0 < until < self.retry:
            return max(0.01, until)
        return self.retry

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
        self.holder = holder
        if holder == self.identity:
            acquired = spec.get("acquireTime")
            return self._write(lease, now, transitions=int(spec.get("leaseTransitions") or 0), acquired=acquired)
        if holder and not self._lapsed(lease, spec):
            return False
        return self._write(lease, now, transitions=int(spec.get("leaseTransitions") or 0) + 1, acquired=now)

    def _lapsed(self, lease: dict[str, Any], spec: dict[str, Any]) -> bool:
        """Whether this version of another's lease has been seen unchanged for its whole duration, on our clock."""
        version = str((lease.get("metadata") or {}).get("resourceVersion") or "")
        seen = self.clock()
        if self._observed[0] != version:
            self._observed = (version, seen)
        try:
            duration = max(float(spec.get("leaseDurationSeconds") or 0), self.duration)
        except (TypeError, ValueError):
            duration = self.duration
        self._lapses_at = self._observed[1] + duration
        return seen >= self._lapses_at

    def _write(self, lease: dict[str, Any] | None, now: datetime.datetime, *, transitions: int, acquired: Any) -> bool:
        metadata: dict[str, str] = {"name": self.name}
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": math.ceil(self.duration),
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


class Leadership:
    """Whether this extender replica may act (answer the verbs, bind, finish the journal).

    It acts while it holds the lease, and only once its cache has been listed
    again in the current term: the replica that led before may have bound pods
    until its fence, and those binds must be in this cache before this one
    places anything (the watch alone is no proof: it may lag or be broken).
    """

    def __init__(self, election: LeaderElection, relist: Callable[[], bool]) -> None:
        self.election = election
        self._relist = relist  # lists the cluster afresh; False if it could not
        self._caught_up = 0  # the term whose relist is done

    def acting(self) -> bool:
        return self.election.leading() and self._caught_up == self.election.term

    def why_not(self) -> str:
        """ "" while acting; else why not, for /readyz and the verbs' 503 answers."""
        if not self.election.leading():
            holder = self.election.holder
            held = f"held by {holder}" if holder and holder != self.election.identity else "not held by this replica"
            return f"follower: the lease {self.election.name} is {held}"
        if self._caught_up != self.election.term:
            return "new leader: relisting the cluster before acting"
        return ""

    def catch_up(self) -> None:
        """Relist once for the current term, if this replica leads and has not yet."""
        term = self.election.term
        if not self.election.leading() or self._caught_up == term:
            return
        if self._relist():
            self._caught_up = term
            log.info("%s leads (term %d): the cache is listed afresh, acting", self.election.identity, term)

    def run(self, stop: threading.Event, poll: float = 0.05) -> None:
        while not stop.wait(poll):
            try:
                self.catch_up()
            except Exception:  # a relist that broke: the next poll tries again
                log.exception("relisting after taking the lease failed")
