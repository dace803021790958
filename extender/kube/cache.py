"""The cluster cache: list + watch of nodes and pods feeding the ledger, which publishes snapshots to the store.

Watch discipline (as kopf's continuous_watch and client-go's reflector): list,
remember the resourceVersion, watch from there with bookmarks; on 410 Gone
relist; on any other break, back off and watch again from the last version.
`/readyz` stays false until both first lists are in.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from extender.core.cluster import MigCounts, NodeState, ObjectError, PodRecord, Snapshot, node_state, pod_record
from extender.kube.api import ApiError, KubeApi
from extender.ledger import Ledger, Reservation
from extender.loan_guard import LoanGuard
from extender.metrics import Errors
from extender.store import SnapshotStore

log = logging.getLogger(__name__)

# A full relist this often, as client-go's resync: a safety net should an event
# ever be lost between watches (each watch stream is renewed every 5 minutes).
RESYNC_SECONDS = 1800.0

# How long a reservation may wait for the watch to show its pod bound, counted
# from the end of the bind's writes (it never expires while they run, however
# slow the API). The watch normally confirms within milliseconds; this only
# bounds the damage of a bind whose outcome was never learned, and outlasts a
# write the API server still applies after its client gave up on it.
RESERVATION_TTL = 60.0


class _Informer:
    """One list + watch loop in a daemon thread, for one kind of object."""

    def __init__(
        self,
        api: KubeApi,
        *,
        kind: str,
        resource: str,
        on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
        stop: threading.Event,
        errors: Errors,
    ) -> None:
        self.api = api
        self.kind = kind
        self.resource = resource
        self.on_list = on_list
        self.on_event = on_event
        self.stop = stop
        self.errors = errors
        self.listed = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"watch-{kind}", daemon=True)
        # A relist asked from another thread (a new leader): the list runs here, in
        # order with the watch's events, so no event newer than it is overwritten.
        self._turn = threading.Condition()
        self._wanted = False
        self._started = 0  # lists begun
        self._done = 0  # the number of the last list applied
        self._stream: Any = None  # the open watch response, shut down to cut a silent watch short

    def relist(self, timeout: float) -> bool:
        """List again, from a list begun after this call; False if none was applied within `timeout`."""
        with self._turn:
            after = self._started
            self._wanted = True
            stream = self._stream
        if stream is not None:
            _shut(stream)
        with self._turn:
            return self._turn.wait_for(lambda: self._done > after, timeout)

    def _opened(self, stream: Any) -> None:
        with self._turn:
            self._stream = stream
            wanted = self._wanted
        if wanted:
            _shut(stream)

    def _list(self) -> str:
        """List, apply, and tell whoever waits for a relist; returns the list's resourceVersion."""
        with self._turn:
            self._started += 1
            number = self._started
        items, version = self.api.list_all(self.resource)
        self.on_list(items)
        self.listed.set()
        with self._turn:
            self._done = number
            self._turn.notify_all()
        log.info("listed %d %s at resourceVersion %s", len(items), self.kind, version)
        return version

    def _run(self) -> None:
        backoff = 0.5
        version = ""
        listed_at = 0.0
        while not self.stop.is_set():
            try:
                with self._turn:
                    self._stream = None
                    relist, self._wanted = self._wanted, False
                if relist or not version or time.monotonic() - listed_at > RESYNC_SECONDS:
                    listed_at = time.monotonic()
                    version = self._list()
                for event in self.api.watch(self.resource, version, on_open=self._opened):
                    if self.stop.is_set():
                        return
                    if self._wanted:
                        break
                    kind, obj = str(event.get("type", "")), event.get("object") or {}
                    if kind == "ERROR":
                        code = obj.get("code")
                        log.info("watch of %s ended with %s %s; relisting", self.kind, code, obj.get("message"))
                        self.errors.count("watch", "expired")
                        version = ""  # 410 Gone (or worse): only a fresh list is safe
                        break
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if kind != "BOOKMARK":
                        self.on_event(kind, obj)
                backoff = 0.5
            except ApiError as error:
                if self._wanted:
                    continue  # cut short for a relist: no failure
                if error.status == 410:
                    self.errors.count("watch", "expired")
                    version = ""
                    continue
                self.errors.count("watch", "api")
                log.warning("watch of %s failed: %s; retrying in %.1fs", self.kind, error, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception as error:  # the watch must outlive any broken connection
                if self._wanted:
                    continue  # cut short for a relist: no failure
                self.errors.count("watch", "connection")
                log.warning("watch of %s broke: %s; retrying in %.1fs", self.kind, error, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)


class ClusterCache:
    """The one writer of cluster state. Readers use the store's snapshots; binds reserve through `lock`."""

    def __init__(
        self,
        api: KubeApi,
        store: SnapshotStore,
        clock: Callable[[], float] = time.monotonic,
        errors: Errors | None = None,
        *,
        loans: LoanGuard,
    ) -> None:
        self.api = api
        self.loans = loans  # every pod's loan is believed only if migchain signed it (see extender/loan_guard.py)
        self.store = store
        self.clock = clock
        self.errors = errors if errors is not None else Errors()
        self.ledger = Ledger()
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._listed: set[str] = set()  # kinds whose first list is in
        self.changed = threading.Event()  # set on every publish; a consumer clears it
        self._informers = [
            _Informer(
                api,
                kind="nodes",
                resource="/api/v1/nodes",
                on_list=self._list_nodes,
                on_event=self._node_event,
                stop=self._stop,
                errors=self.errors,
            ),
            _Informer(
                api,
                kind="pods",
                resource="/api/v1/pods",
                on_list=self._list_pods,
                on_event=self._pod_event,
                stop=self._stop,
                errors=self.errors,
            ),
        ]
        self._janitor = threading.Thread(target=self._expire_loop, name="reservations", daemon=True)
        store.publish(self.ledger.snapshot(), ready=False)

    def start(self) -> None:
        for informer in self._informers:
            informer.thread.start()
        self._janitor.start()

    def stop(self) -> None:
        self._stop.set()

    def relist(self, timeout: float = 120.0) -> bool:
        """List nodes and pods afresh (a new leader, before it acts); False if that took longer than `timeout`."""
        deadline = time.monotonic() + timeout
        return all(informer.relist(max(0.0, deadline - time.monotonic())) for informer in self._informers)

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(informer.listed.wait(max(0.0, deadline - time.monotonic())) for informer in self._informers)

    # -- writes from binds ----------------------------------------------------

    def reserve(self, uid: str, node: str, slices: MigCounts) -> None:
        with self.lock:
            self.ledger.reserve(uid, node, slices, self.clock() + RESERVATION_TTL)
            self._publish()

    def hold(self, uid: str) -> None:
        """Keep the reservation of pod `uid` from expiring while a bind (or a recovery) of it writes; pair with
        `settle` in a `finally`."""
        with self.lock:
            self.ledger.hold(uid)

    def settle(self, uid: str) -> None:
        """The writes `hold` was for are over: the reservation expires RESERVATION_TTL from now, unless the watch
        confirms it first."""
        with self.lock:
            self.ledger.settle(uid, self.clock() + RESERVATION_TTL)

    def release(self, uid: str, earlier: Reservation | None = None) -> None:
        """Drop the reservation for `uid`; with `earlier`, put that one back instead (see Binder.bind)."""
        with self.lock:
            if earlier is None:
                self.ledger.release(uid)
            else:
                self.ledger.reserve(uid, earlier.node, earlier.slices, earlier.expires_at)
            self._publish()

    def pod(self, namespace: str, name: str) -> PodRecord | None:
        with self.lock:
            return self.ledger.pod(namespace, name)

    # -- watch callbacks ------------------------------------------------------

    def _list_nodes(self, items: list[dict[str, Any]]) -> None:
        states = [state for state in map(_node, items) if state is not None]
        self._count_unreadable(len(items) - len(states))
        with self.lock:
            self.ledger.replace_nodes(states)
            self._listed.add("nodes")
            self._publish()

    def _node_event(self, kind: str, obj: dict[str, Any]) -> None:
        with self.lock:
            if kind == "DELETED":
                self.ledger.remove_node((obj.get("metadata") or {}).get("name", ""))
            else:
                state = _node(obj)
                if state is None:
                    self._count_unreadable(1)
                    return
                if not self.ledger.put_node(state):
                    return  # a heartbeat: no new view, no reader woken
            self._publish()

    def _list_pods(self, items: list[dict[str, Any]]) -> None:
        records = [record for record in map(_pod, items) if record is not None]
        self._count_unreadable(len(items) - len(records))
        with self.lock:
            records = [self.loans.vouch(record) for record in records]
            self.loans.keep_only({record.request.uid for record in records})
            self.ledger.replace_pods(records)
            self._listed.add("pods")
            self._publish()

    def _pod_event(self, kind: str, obj: dict[str, Any]) -> None:
        with self.lock:
            if kind == "DELETED":
                uid = (obj.get("metadata") or {}).get("uid", "")
                self.ledger.remove_pod(uid)
                self.loans.forget(uid)
            else:
                record = _pod(obj)
                if record is None:
                    self._count_unreadable(1)
                    return
                if not self.ledger.put_pod(self.loans.vouch(record)):
                    return  # a status migchain does not read (Running, an IP): no new view, no reader woken
            self._publish()

    def _expire_loop(self) -> None:
        while not self._stop.wait(5.0):
            with self.lock:
                gone = self.ledger.expire(self.clock())
                if gone:
                    self.errors.count("cache", "reservation_expired", len(gone))
                    log.warning("reservations of %d pod(s) expired unconfirmed: %s", len(gone), gone)
                # A view dates the recent demand (core/headroom.py): as arrivals age out of it, a type kept
                # free may be lent again, and a pod refused for that must be looked at again (kube/requeue.py).
                if gone or self.ledger.has_demand():
                    self._publish()

    def _count_unreadable(self, count: int) -> None:
        if count:
            self.errors.count("watch", "unreadable", count)

    def _publish(self) -> None:
        ready = self._listed >= {"nodes", "pods"}
        if ready and not self.store.in_sync():
            # The first lists are most of what this process will ever hold: keep the
            # cyclic collector from re-scanning them (its full passes were the p99 tail).
            gc.freeze()
        self.store.publish(self.ledger.snapshot(), ready=ready)
        self.changed.set()

    def view(self) -> tuple[Snapshot, list[PodRecord]]:
        """The current snapshot and every pod record, taken together."""
        with self.lock:
            return self.ledger.snapshot(), list(self.ledger.pods())


def _shut(stream: Any) -> None:
    """End a watch stream from another thread: its reader gets an error and goes on."""
    try:
        stream.shutdown()
    except Exception as error:  # already closed, or closing: either way it ends
        log.debug("shutting a watch stream: %s", error)


def _node(obj: dict[str, Any]) -> NodeState | None:
    try:
        return node_state(obj)
    except ObjectError as error:
        log.warning("ignoring unreadable node: %s", error)
        return None


def _pod(obj: dict[str, Any]) -> PodRecord | None:
    try:
        return pod_record(obj)
    except ObjectError as error:
        log.warning("ignoring unreadable pod: %s", error)
        return None
