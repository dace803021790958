"""The slices in use on every node, from bound pods and from the extender's own reservations; no I/O.

The cluster cache is its only writer (under the cache's lock); it publishes
`snapshot()` for readers. A reservation counts the slices of a pod the moment
the extender decides to bind it, before the watch reports the binding, so a
burst of binds never hands one free slice to two pods.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

from extender.core.cluster import (
    DEMAND_BUCKET_SECONDS,
    Demand,
    MigCounts,
    NodeState,
    ObjectError,
    PodRecord,
    PodRequest,
    Snapshot,
    demand_bucket,
    node_state,
    pod_record,
)
from extender.core.loan import Loan, record_loan, vouched
from extender.core.rules import MAX_HEADROOM_SECONDS

T = TypeVar("T")


def _arrival(record: PodRecord) -> tuple[float, MigCounts] | None:
    """When a pod arrived and the MIG slices it asked for, if it is demand to keep slices free for
    (core/headroom.py).

    A borrower stands for the pod it replaced: it asked for the loan's original types, not the ones lent to
    it (else every loan would hold back more of the type it borrowed). A pod held by a scheduling gate, or
    whose creationTimestamp cannot be read, asks for nothing yet. A pod that ended did arrive: it counts until
    it is deleted, so a burst of pods created and deleted at once keeps nothing free.
    """
    if not record.request.mig or record.gates:
        return None
    try:
        created = datetime.fromisoformat(record.created).timestamp()
    except ValueError:
        return None
    loan = record_loan(record)
    return created, (loan.original if isinstance(loan, Loan) else record.request.mig)


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
        self._signatures: dict[str, str] = {}  # their NodeState.signature: Snapshot.signatures
        self._nominated: dict[str, tuple[str, PodRequest]] = {}  # pending pods nominated to a node, by uid
        # Per type, (free, allocatable) over the nodes that offer slices: Snapshot.fleet, kept as states change.
        self._fleet: dict[str, tuple[int, int]] = {}
        # Slices asked for by pods as they arrived (core/headroom.py): (bucket, type) -> slices, and what each
        # pod added, taken off when it ends or goes. Only the last MAX_HEADROOM_SECONDS are kept.
        self._demand: dict[tuple[int, str], int] = {}
        self._asked: dict[str, tuple[tuple[tuple[int, str], int], ...]] = {}  # by uid

    # -- nodes ----------------------------------------------------------------

    def replace_nodes(self, nodes: Iterable[NodeState]) -> None:
        self._nodes = {node.name: node for node in nodes}
        self._states = {}
        self._signatures = {}
        self._fleet = {}
        for name in self._nodes:
            self._refresh(name)

    def put_node(self, node: NodeState) -> bool:
        """Keep `node`; False when it equals the one kept (a heartbeat): nothing a reader sees changed."""
        if self._nodes.get(node.name) == node:
            return False
        self._nodes[node.name] = node
        self._refresh(node.name)
        return True

    def remove_node(self, name: str) -> None:
        self._nodes.pop(name, None)
        self._signatures.pop(name, None)
        self._count(self._states.pop(name, None), -1)

    # -- pods -----------------------------------------------------------------

    def replace_pods(self, pods: Iterable[PodRecord]) -> None:
        self._pods = {}
        self._keys = {}
        self._holders = {}
        self._nominated = {}
        self._demand = {}
        self._asked = {}
        for record in pods:
            self._store(record)
        # A reservation whose pod (or replacement) the list shows bound is now
        # counted through that pod. Others stay until confirmed or expired: the
        # list may predate the bind, and dropping them could give a slice twice.
        for record in self._pods.values():
            for key in self._confirms(record):
                del self._reserved[key]
        self._states = {}
        self._signatures = {}
        self._fleet = {}
        for name in self._nodes:
            self._refresh(name)

    def put_pod(self, record: PodRecord) -> bool:
        """Keep `record`; False when it equals the one kept and confirms no reservation (a status update
        migchain does not read, such as Running or a pod IP): nothing a reader sees changed."""
        uid = record.request.uid
        before = self._pods.get(uid)
        confirmed = self._confirms(record)
        if before == record and not confirmed:
            return False
        self._store(record)
        touched = {record.node, before.node if before else ""}
        for key in confirmed:
            touched.add(self._reserved.pop(key).node)  # the watch confirmed the bind: the pod itself counts now
        self._refresh_all(touched)
        return True

    def remove_pod(self, uid: str) -> None:
        # A reservation outlives its pod: a borrow deletes the original before
        # the watch shows the replacement bound, and its slices must stay taken.
        before = self._pods.pop(uid, None)
        if before is not None:
            if self._keys.get(before.request.key) == uid:
                del self._keys[before.request.key]
            self._holders.get(before.node, set()).discard(uid)
            self._nominated.pop(uid, None)
            self._ask(uid, None)
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

    def snapshot(self, now: float | None = None) -> Snapshot:
        """The cluster as it stands; `now` (seconds since the epoch, the clock's if None) dates the demand."""
        now = time.time() if now is None else now
        oldest = demand_bucket(now - MAX_HEADROOM_SECONDS) - DEMAND_BUCKET_SECONDS
        for key in [key for key in self._demand if key[0] < oldest]:
            del self._demand[key]
        return Snapshot(
            dict(self._states),
            {uid: (reservation.node, reservation.slices) for uid, reservation in self._reserved.items()},
            dict(self.nominated()),
            Demand(now, dict(self._demand)),
            dict(self._fleet),
            dict(self._signatures),
        )

    def has_demand(self) -> bool:
        """Whether some pod asked for slices lately: then views of the cluster age as time goes by."""
        return bool(self._demand)

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
        self._ask(uid, record)

    def _ask(self, uid: str, record: PodRecord | None) -> None:
        """Count what pod `uid` asked for as it arrived, once; take it off when the pod goes (`record` None)."""
        if record is None:
            for key, count in self._asked.pop(uid, ()):
                left = self._demand.get(key, 0) - count
                if left > 0:
                    self._demand[key] = left
                else:
                    self._demand.pop(key, None)
            return
        came = _arrival(record) if uid not in self._asked else None
        if came is None:
            return
        created, slices = came
        if created < time.time() - MAX_HEADROOM_SECONDS:
            return  # long ago: no view will count it
        bucket = demand_bucket(created)
        asked = tuple(((bucket, resource), count) for resource, count in slices)
        self._asked[uid] = asked
        for key, count in asked:
            self._demand[key] = self._demand.get(key, 0) + count

    def _count(self, state: NodeState | None, sign: int) -> None:
        """Add (+1) or take off (-1) a node's slices in the fleet's totals."""
        if state is None or not state.offers_slices:
            return
        free = state.free
        for resource, allocatable in state.allocatable.items():
            had_free, had = self._fleet.get(resource, (0, 0))
            self._fleet[resource] = (had_free + sign * free[resource], had + sign * allocatable)

    def _refresh_all(self, names: Iterable[str]) -> None:
        for name in names:
            if name:
                self._refresh(name)

    def _refresh(self, name: str) -> None:
        node = self._nodes.get(name)
        if node is None:
            self._signatures.pop(name, None)
            self._count(self._states.pop(name, None), -1)
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
        self._signatures[name] = state.signature  # computed here, on the watch thread, not on a request's path
        self._count(self._states.get(name), -1)
        self._count(state, +1)
        self._states[name] = state
