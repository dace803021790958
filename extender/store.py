"""The holder of the current cluster snapshot: one writer swaps whole immutable snapshots in, readers take one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from extender.core.cluster import Snapshot


@dataclass(frozen=True)
class Readiness:
    ready: bool
    detail: str


class SnapshotStore:
    """Readers call `snapshot()` once per request and keep that object; a swap is one reference assignment.

    Standalone (no cluster) the store starts ready with an empty snapshot;
    a cluster cache starts it not ready and publishes after its first full list.
    """

    def __init__(self, snapshot: Snapshot | None = None, *, ready: bool = True, detail: str = "standalone") -> None:
        self._snapshot = snapshot if snapshot is not None else Snapshot()
        self._readiness = Readiness(ready, detail)
        self._gate: Callable[[], str] | None = None

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def gate(self, why_not: Callable[[], str]) -> None:
        """Hold readiness (and so the verbs) back while `why_not` says why: a replica that does not lead."""
        self._gate = why_not

    def in_sync(self) -> bool:
        """The cache's own state, whatever the gate says."""
        return self._readiness.ready

    def readiness(self) -> Readiness:
        readiness = self._readiness
        if readiness.ready and self._gate is not None:
            why = self._gate()
            if why:
                return Readiness(False, why)
        return readiness

    def publish(self, snapshot: Snapshot, *, ready: bool = True) -> None:
        self._snapshot = snapshot
        if ready != self._readiness.ready:
            detail = "cluster cache in sync" if ready else "waiting for the first list of nodes and pods"
            self._readiness = Readiness(ready, detail)
