"""The slices in use on every node, from bound pods and from the extender's own reservations; no I/O.

The cluster cache is its only writer (under the cache's lock); it publishes
`snapshot()` for readers. A reservation counts the slices of a pod the moment
the extender decides to bind it, before the watch reports the binding, so a
burst of binds never hands one free slice to two pods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from extender.core.cluster import (
    MigCounts,
    NodeState,
    ObjectError,
    PodRecord,
    PodRequest,
    Snapshot,
    node_state,
    pod_record,
)
from extender.core.loan import vouched

T = TypeVar("T")


def _readable(items: Iterable[Any], parse: Callable[[Any], T]) -> tuple[list[T], int]:
    """The items `parse` can read, and how many it could not."""
    parsed, skipped = [], 0
    for item in items:
        try:
            parsed.append(parse(item))
        except ObjectError:
            skipped += 1
    return parsed, skipped


@dataclass(frozen=True)
class Reservation:
    node: str
    slices: MigCounts
    expires_at: float


class Ledger:
    @classmethod
    def of_objects(cls, items: Iterable[Any]) -> Ledger:
        """A ledger of Node and Pod objects (as `kubectl get nodes,pods -A -o json` lists them)."""
        items = list(items)
        ledger = cls()
        ledger.replace_nodes(node_state(item) for item in items if item.get("kind") == "Node")
        ledger.replace_pods(pod_record(item) for item in items if item.get("kind") == "Pod")
        return ledger

    @classmethod
    def of_readable(
        cls, nodes: Iterable[Any], pods: Iterable[Any], loan_key: bytes | None = None
    ) -> tuple[Ledger, int]:
        """A ledger of the Node and Pod objects that parse, and how many did not (left out, as the cache does).

        With `loan_key`, loans are believed only if migchain signed them, as the cache does (core/loan.py vouched).
        """
        states, bad_nodes = _readable(nodes, node_state)
        records, bad_pods = _readable(pods, pod_record)
        ledger = cls()
        ledger.replace_nodes(states)
        ledger.replace_pods(vouched(record, loan_key)[0] for record in records)
        return ledger, bad_nodes + bad_pods

    def __init__(self) -> None:
        self._nodes: dict[str, NodeState] = {}  # as the API reports them, `used` empty
        self._pods: dict[str, PodRecord] = {}  # by uid
        self._keys: dict[str, str] = {}  # namespace/name -> uid
        self._reserved: dict[str, Reservation] = {}  # by the UID of the pod being bound
        self._writing: dict[str, int] = {}  # UID -> how many binds (or recoveries) of it are writing right now
        self._holders: dict[str, set[str]] = {}  # node -> uids of pods holding slices there
        self._states: dict[str, NodeState] = {}  # nodes with `used` filled: what readers see
        self._nominated: dict[str, tuple[str, PodRequest]] = {}  # pending pods nominated to a node, by uid

    # -- nodes ----------------------------------------------------------------

    def replace_nodes(self, nodes: Iterable[NodeState]) -> None:
        self._nodes = {node.name: node for node in nodes}
        self._states = {}
        for name in self._nodes:
            self._refresh(name)

    def put_node(self, node: NodeState) -> None:
        self._nodes[node.name] = node
        self._refresh(node.name)

    def remove_node(self, name: str) -> None:
        self._nodes.pop(name, None)
        self._states.pop(name, None)

    # -- pods -----------------------------------------------------------------

    def replace_pods(self, pods: Iterable[PodRecord]) -> None:
        self._pods = {}
        self._keys = {}
        self._holders = {}
        self._nominated = {}
        for record in pods:
            self._store(record)
        # A reservation whose pod (or replacement) the list shows bound is now
        # counted through that pod. Others stay until confirmed or expired: the
        # list may predate the bind, and dropping them could give a slice twice.
        for record in self._pods.values():
            for key in self._confirms(record):
                del self._reserved[key]
        self._states = {}
        for name in self._nodes:
            self._refresh(name)

    def put_pod(self, record: PodRecord) -> None:
        uid = record.request.uid
        before = self._pods.get(uid)
        self._store(record)
        touched = {record.node, before.node if before else ""}
        for key in self._confirms(record):
            touched.add(self._reserved.pop(key).node)  # the watch confirmed the bind: the pod itself counts now
        self._refresh_all(touched)

    def remove_pod(self, uid: str) -> None:
        # A reservation outlives its pod: a borrow deletes the original before
        # the watch shows the replacement bound, and its slices must stay taken.
        before = self._pods.pop(uid, None)
        if before is not None:
            if self._keys.get(before.request.key) == uid:
                del self._keys[before.request.key]
            self._holders.get(before.node, set()).discard(uid)
            self._nominated.pop(uid, None)
            self._refresh(before.node)

    def pod(self, namespace: str, name: str) -> PodRecord | None:
        uid = self._keys.get(f"{namespace}/{name}")
        return self._pods.get(uid) if uid is not None else None

    def pods(self) -> Iterable[PodRecord]:
        return self._pods.values()

    def nominated(self) -> Mapping[str, tuple[str, PodRequest]]:
        """Pending pods nominated to a node (uid -> node, request), but those being bound: their reservation
        counts for them already. Read under the cache's lock, as every read."""
        if not self._reserved:
            return self._nominated
        return {uid: nomination for uid, nomination in self._nominated.items() if uid not in self._reserved}

    # -- reservations ---------------------------------------------------------

    def reserve(self, key: str, node: str, slices: MigCounts, expires_at: float) -> None:
        """Count `slices` on `node` until a bound pod with UID `key`, or replacing UID `key`, shows up."""
        previous = self._reserved.get(key)
        self._reserved[key] = Reservation(node, slices, expires_at)
        self._refresh_all({node, previous.node if previous else ""})

    def reservation(self, key: str) -> Reservation | None:
        return self._reserved.get(key)

    def release(self, key: str) -> None:
        reservation = self._reserved.pop(key, None)
        if reservation is not None:
            self._refresh(reservation.node)

    def hold(self, key: str) -> None:
        """A bind (or a recovery) of pod `key` starts its writes: its reservation may not expire until `settle`.

        However long the API takes to answer a borrow's writes, the slices stay
        reserved: expiring them meanwhile would give them to a second pod.
        """
        self._writing[key] = self._writing.get(key, 0) + 1

    def settle(self, key: str, expires_at: float) -> None:
        """One writer of pod `key` is done (whatever the outcome): once none is left, its reservation, if any,
        expires no sooner than `expires_at` (the time the watch gets to confirm the last write)."""
        left = self._writing.get(key, 0) - 1
        if left > 0:
            self._writing[key] = left
            return
        self._writing.pop(key, None)
        reservation = self._reserved.get(key)
        if reservation is not None and reservation.expires_at < expires_at:
            self._reserved[key] = replace(reservation, expires_at=expires_at)

    def held(self, key: str) -> bool:
        """Whether a bind (or a recovery) of pod `key` is writing right now."""
        return key in self._writing

    def expire(self, now: float) -> list[str]:
        """Drop reservations the watch never confirmed, but those whose writes are still under way; returns their
        pod uids."""
        gone = [
            uid
            for uid, reservation in self._reserved.items()
            if reservation.expires_at <= now and uid not in self._writing
        ]
        for uid in gone:
            self.release(uid)
        return gone

    def reservations(self) -> dict[str, Reservation]:
        return dict(self._reserved)

    # -- what readers see -----------------------------------------------------

    def node_state(self, name: str, for_pod: str = "") -> NodeState | None:
        """The node as a decision for pod UID `for_pod` sees it: that pod's own reservation not counted."""
        state = self._states.get(name)
        reservation = self._reserved.get(for_pod) if for_pod else None
        if state is None or reservation is None or reservation.node != name:
            return state
        return state.without(reservation.slices)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            dict(self._states),
            {uid: (reservation.node, reservation.slices) for uid, reservation in self._reserved.items()},
            dict(self.nominated()),
        )

    # -- bookkeeping ----------------------------------------------------------

    def _confirms(self, record: PodRecord) -> list[str]:
        """The reservations this pod's record shows done: its own once it is bound, and the one of the pod it
        replaced, if it is bound where that was reserved.

        `replaces` comes from a loan record migchain signed (the cache drops any
        other, see core/loan.py vouched); the node must match as well, so no
        pod elsewhere can make a reserved slice look free while the bind it was
        held for may have happened.
        """
        if not record.node:
            return []
        keys = [record.request.uid] if record.request.uid in self._reserved else []
        held = self._reserved.get(record.replaces) if record.replaces else None
        if held is not None and held.node == record.node and record.replaces not in keys:
            keys.append(record.replaces)
        return keys

    def _store(self, record: PodRecord) -> None:
        uid = record.request.uid
        before = self._pods.get(uid)
        if before is not None:
            self._holders.get(before.node, set()).discard(uid)
        self._pods[uid] = record
        self._keys[record.request.key] = uid
        if record.holds_slices:
            self._holders.setdefault(record.node, set()).add(uid)
        if (
            record.nominated
            and not record.node
            and not record.terminal
            and not record.terminating
            and record.request.mig
        ):
            self._nominated[uid] = (record.nominated, record.request)
        else:
            self._nominated.pop(uid, None)

    def _refresh_all(self, names: Iterable[str]) -> None:
        for name in names:
            if name:
                self._refresh(name)

    def _refresh(self, name: str) -> None:
        node = self._nodes.get(name)
        if node is None:
            self._states.pop(name, None)
            return
        used: dict[str, int] = {}
        for uid in self._holders.get(name, ()):
            for resource, count in self._pods[uid].request.mig:
                used[resource] = used.get(resource, 0) + count
        # Reservations are few (binds the watch has not confirmed yet): a scan is cheap.
        for reservation in self._reserved.values():
            if reservation.node == name:
                for resource, count in reservation.slices:
                    used[resource] = used.get(resource, 0) + count
        state = replace(node, used=used)
        state.signature  # noqa: B018 - computed here, on the watch thread, not on a request's path
        self._states[name] = state
