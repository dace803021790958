"""What kube-scheduler's last filter call asked about each pod, kept in memory and bounded; no I/O, no decisions.

Two things need it after the call has been answered:
- the binder: "never borrow needlessly" at bind time needs the nodes that
  passed kube-scheduler's own filters (selectors, taints, CPU, ...), which
  migchain cannot redo; the node names of the last filter call are those;
- the requeuer: a pod refused on every node while migchain's view lagged the
  scheduler's is parked until an unrelated event comes; remembered, it can be
  retried once the view catches up.

Losing an entry (evicted, expired, a restart) only falls back to the
behaviour without it. Nothing here is ever the only record of anything.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from extender.core.cluster import PodRequest, Snapshot
from extender.store import SnapshotStore

# Bounds: pods remembered, and node names over all of them. A name is kept as
# the request parsed it, about 60 bytes: 500,000 of them ~30 MB, 500 pods on a
# 1,000-node cluster, 100 on 5,000. (Interning them to share one string per
# node cost a seventh of the extender's CPU at 70 pods/s: kube-scheduler sends
# its feasible nodes in a new order each time, so no call shares the last one's
# tuple.) The least recently filtered go first.
MAX_PODS = 10_000
MAX_NODE_NAMES = 500_000
# kube-scheduler retries every unschedulable pod within 5 minutes anyway
# (podMaxInUnschedulablePodsDuration): older entries help no one.
MAX_AGE_SECONDS = 600.0


@dataclass(frozen=True, eq=False)  # entries are told apart by identity: a newer call replaces the object
class Filtered:
    """One pod's last filter call: what it asked, which nodes were asked about, and whether all refused it."""

    pod: PodRequest
    candidates: tuple[str, ...]
    refused: bool  # no node passed
    at: float  # when (the memory's clock)
    # For a refused pod: the snapshot the requeuer last found it refused in
    # (first the one the filter decided on). Weak: never keeps a snapshot alive.
    seen: weakref.ref[Snapshot] | None = None
    due: float | None = None  # it fits now: retry it at this time, unless kube-scheduler asks again first
    attempts: int = 0  # retries that failed for now

    def seen_in(self, snapshot: Snapshot) -> bool:
        return self.seen is not None and self.seen() is snapshot


class FilterMemory:
    """Thread-safe. Request threads record and read it; the requeuer's thread updates entries it still owns."""

    def __init__(
        self,
        store: SnapshotStore,
        wake: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_pods: int = MAX_PODS,
        max_node_names: int = MAX_NODE_NAMES,
        max_age: float = MAX_AGE_SECONDS,
    ) -> None:
        self.store = store
        self.wake = wake  # set when a refusal may already be out of date: the requeuer looks at once
        self.clock = clock
        self.max_pods = max_pods
        self.max_node_names = max_node_names
        self.max_age = max_age
        self._entries: OrderedDict[str, Filtered] = OrderedDict()  # by pod UID, least recently filtered first
        self._node_names = 0
        self._lock = threading.Lock()

    def filtered(self, pod: PodRequest, node_names: Sequence[str], refused: bool, decided_on: Snapshot) -> None:
        """Remember a filter call; `decided_on` is the store's snapshot the answer came from."""
        if not pod.uid or not pod.mig:
            return  # nothing to retry or to refuse a borrow for
        entry = Filtered(
            pod, self._compact(node_names), refused, self.clock(), weakref.ref(decided_on) if refused else None
        )
        with self._lock:
            self._drop(pod.uid)
            self._entries[pod.uid] = entry
            self._node_names += len(entry.candidates)
            self._trim(entry.at)
        # The cache may have published a newer snapshot while the filter decided
        # on this one; the requeuer may even have looked before this entry was in.
        if refused and self.wake is not None and self.store.snapshot() is not decided_on:
            self.wake.set()

    def _compact(self, node_names: Sequence[str]) -> tuple[str, ...]:
        """The names as a tuple (the wire's already is: no copy), or none beyond the bound."""
        if len(node_names) > self.max_node_names:
            return ()
        return node_names if isinstance(node_names, tuple) else tuple(node_names)

    def candidates(self, uid: str) -> tuple[str, ...]:
        """The node names of the pod's last filter call; () if it is not remembered."""
        with self._lock:
            entry = self._entries.get(uid)
            if entry is None or self.clock() - entry.at > self.max_age:
                return ()
            return entry.candidates

    def refused(self) -> list[Filtered]:
        """The remembered pods that every node refused at their last filter call (expired ones dropped)."""
        with self._lock:
            self._trim(self.clock())
            return [entry for entry in self._entries.values() if entry.refused]

    def update(self, old: Filtered, new: Filtered) -> bool:
        """Put `new` in place of `old` unless a newer filter call replaced it meanwhile; whether it did."""
        with self._lock:
            if self._entries.get(old.pod.uid) is not old:
                return False
            self._node_names += len(new.candidates) - len(old.candidates)
            self._entries[old.pod.uid] = new
            return True

    def forget(self, uid: str, entry: Filtered | None = None) -> None:
        """Drop the pod's entry (with `entry`: only if it is still that one)."""
        with self._lock:
            if entry is None or self._entries.get(uid) is entry:
                self._drop(uid)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def node_names(self) -> int:
        return self._node_names

    def _drop(self, uid: str) -> None:
        entry = self._entries.pop(uid, None)
        if entry is not None:
            self._node_names -= len(entry.candidates)

    def _trim(self, now: float) -> None:
        """Evict the least recently filtered pods beyond the bounds, and every entry too old to help."""
        while self._entries:
            uid, oldest = next(iter(self._entries.items()))
            over = len(self._entries) > self.max_pods or self._node_names > self.max_node_names
            if not over and now - oldest.at <= self.max_age:
                return
            self._drop(uid)
