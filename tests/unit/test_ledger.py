"""The ledger against a brute-force model: usage per node is always bound pods plus unconfirmed reservations."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from extender.core.cluster import DEMAND_BUCKET_SECONDS, NodeState, PodRecord, PodRequest, demand_bucket, fleet_slices
from extender.ledger import Ledger

NODES = ("n0", "n1", "n2")
TYPES = ("nvidia.com/mig-1g.5gb", "nvidia.com/mig-2g.10gb")
UIDS = tuple(f"uid-{index}" for index in range(6))

slices = st.dictionaries(st.sampled_from(TYPES), st.integers(1, 3), min_size=1).map(lambda d: tuple(sorted(d.items())))


# Creation times a minute apart, all within the last hour: the demand a view counts (core/headroom.py).
NOW = time.time()
CREATED = tuple(datetime.fromtimestamp(NOW - 60 * ago, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") for ago in range(4))


def record(
    uid: str, node: str, mig: tuple[tuple[str, int], ...], terminal: bool, replaces: str = "", *, created: str = ""
) -> PodRecord:
    return PodRecord(PodRequest("ns", f"pod-{uid}", uid, mig), node, terminal, replaces, created=created)


class LedgerModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()
        self.ledger.replace_nodes(NodeState(name, allocatable=dict.fromkeys(TYPES, 8)) for name in NODES)
        self.pods: dict[str, PodRecord] = {}
        self.reserved: dict[str, tuple[str, tuple[tuple[str, int], ...], float]] = {}
        self.writing: dict[str, int] = {}  # binds of each uid whose writes are under way
        self.now = 0.0
        self.asked: dict[str, PodRecord] = {}  # each pod as first seen (since the last relist): what it asked for

    @rule(
        uid=st.sampled_from(UIDS),
        node=st.sampled_from(("", *NODES)),
        mig=slices,
        terminal=st.booleans(),
        replaces=st.sampled_from(("", *UIDS)),
        created=st.sampled_from(CREATED),
    )
    def pod_event(
        self, uid: str, node: str, mig: tuple[tuple[str, int], ...], terminal: bool, *, replaces: str, created: str
    ) -> None:
        self.ledger.put_pod(record(uid, node, mig, terminal, replaces, created=created))
        self.pods[uid] = record(uid, node, mig, terminal, replaces, created=created)
        self.asked.setdefault(uid, self.pods[uid])
        if node:  # the watch confirmed the bind of this pod, or of the one it replaces on the reserved node
            self.reserved.pop(uid, None)
            if replaces in self.reserved and self.reserved[replaces][0] == node:
                del self.reserved[replaces]

    @rule(uid=st.sampled_from(UIDS))
    def pod_deleted(self, uid: str) -> None:
        self.ledger.remove_pod(uid)
        self.pods.pop(uid, None)  # its reservation, if any, stays: a borrow deletes the original first
        self.asked.pop(uid, None)

    @rule(uid=st.sampled_from(UIDS), node=st.sampled_from(NODES), mig=slices, ttl=st.floats(1, 10))
    def reserve(self, uid: str, node: str, mig: tuple[tuple[str, int], ...], ttl: float) -> None:
        self.ledger.reserve(uid, node, mig, self.now + ttl)
        self.reserved[uid] = (node, mig, self.now + ttl)

    @rule(uid=st.sampled_from(UIDS))
    def release(self, uid: str) -> None:
        self.ledger.release(uid)
        self.reserved.pop(uid, None)

    @rule(uid=st.sampled_from(UIDS))
    def writes_start(self, uid: str) -> None:
        self.ledger.hold(uid)
        self.writing[uid] = self.writing.get(uid, 0) + 1

    @rule(uid=st.sampled_from(UIDS), ttl=st.floats(1, 10))
    def writes_end(self, uid: str, ttl: float) -> None:
        if not self.writing.get(uid):
            return
        self.ledger.settle(uid, self.now + ttl)
        self.writing[uid] -= 1
        if not self.writing[uid]:
            del self.writing[uid]
            if uid in self.reserved:  # the watch gets `ttl` from now to confirm the last write, never less
                node, mig, expires_at = self.reserved[uid]
                self.reserved[uid] = (node, mig, max(expires_at, self.now + ttl))

    @rule(step=st.floats(0, 5))
    def time_passes(self, step: float) -> None:
        self.now += step
        self.ledger.expire(self.now)
        # A reservation whose writes are under way never expires, however long they take.
        self.reserved = {uid: r for uid, r in self.reserved.items() if r[2] > self.now or uid in self.writing}

    @rule(keep=st.sets(st.sampled_from(UIDS)))
    def relist(self, keep: set[str]) -> None:
        listed = [pod for uid, pod in self.pods.items() if uid in keep]
        self.ledger.replace_pods(listed)
        self.pods = {pod.request.uid: pod for pod in listed}
        self.asked = dict(self.pods)
        # A reservation survives a relist unless the list shows its pod bound, or its replacement bound where
        # it was reserved.
        bound = [pod for pod in self.pods.values() if pod.node]
        self.reserved = {
            uid: r
            for uid, r in self.reserved.items()
            if not any(pod.request.uid == uid or (pod.replaces == uid and pod.node == r[0]) for pod in bound)
        }

    @invariant()
    def usage_is_bound_pods_plus_unconfirmed_reservations(self) -> None:
        for name in NODES:
            expected: dict[str, int] = {}
            for pod in self.pods.values():
                if pod.node == name and not pod.terminal:
                    for resource, count in pod.request.mig:
                        expected[resource] = expected.get(resource, 0) + count
            for node, mig, _ in self.reserved.values():
                if node == name:
                    for resource, count in mig:
                        expected[resource] = expected.get(resource, 0) + count
            state = self.ledger.node_state(name)
            assert state is not None
            assert {t: n for t, n in state.used.items() if n} == expected
            assert self.ledger.snapshot().nodes[name] == state

    @invariant()
    def the_fleet_and_the_demand_are_what_the_nodes_and_the_pods_add_up_to(self) -> None:
        snapshot = self.ledger.snapshot(NOW)
        kept = {t: totals for t, totals in (snapshot.fleet or {}).items() if totals != (0, 0)}
        assert kept == fleet_slices(snapshot.nodes.values())
        assert snapshot.signatures == {name: node.signature for name, node in snapshot.nodes.items()}
        for seconds in (30, 90, 3600):
            expected: dict[str, int] = {}
            for pod in self.asked.values():
                created = datetime.fromisoformat(pod.created).timestamp()
                if demand_bucket(created) + DEMAND_BUCKET_SECONDS > NOW - seconds:
                    for resource, count in pod.request.mig:
                        expected[resource] = expected.get(resource, 0) + count
            assert snapshot.demand.since(seconds) == expected

    @invariant()
    def a_pod_sees_every_reservation_but_its_own(self) -> None:
        snapshot = self.ledger.snapshot()
        for uid in UIDS:
            own = self.reserved.get(uid)
            for name in NODES:
                expected = dict(self.ledger.node_state(name).used)  # type: ignore[union-attr]
                if own is not None and own[0] == name:
                    for resource, count in own[1]:
                        expected[resource] -= count
                seen = self.ledger.node_state(name, for_pod=uid)
                assert seen is not None
                assert {t: n for t, n in seen.used.items() if n} == {t: n for t, n in expected.items() if n}
                assert snapshot.for_pod(uid).nodes[name].used == seen.used


TestLedger = LedgerModel.TestCase


def test_a_removed_node_leaves_the_snapshot():
    ledger = Ledger()
    ledger.replace_nodes([NodeState("a"), NodeState("b")])
    ledger.remove_node("a")
    assert set(ledger.snapshot().nodes) == {"b"}


def test_lookup_by_namespace_and_name_follows_the_latest_uid():
    ledger = Ledger()
    ledger.put_pod(record("old", "", (), False))
    ledger.remove_pod("old")
    ledger.put_pod(record("new", "", (), False))
    found = ledger.pod("ns", "pod-new")
    assert found is not None
    assert found.request.uid == "new"
    assert ledger.pod("ns", "pod-old") is None


def test_pending_pods_nominated_to_a_node_are_in_the_snapshot_until_bound_or_gone():
    nominee = replace(record("p", "", ((TYPES[0], 1),), False), nominated="n0")
    ledger = Ledger()
    ledger.replace_pods([nominee, replace(record("q", "n1", ((TYPES[0], 1),), False), nominated="n1")])
    assert ledger.snapshot().nominated == {"p": ("n0", nominee.request)}  # a bound pod's nomination is over
    ledger.reserve("p", "n0", ((TYPES[0], 1),), 60.0)  # being bound: its reservation holds its slices
    assert ledger.snapshot().nominated == {}
    ledger.put_pod(replace(nominee, node="n0"))
    assert ledger.nominated() == {}
    ledger.put_pod(nominee)
    ledger.remove_pod("p")
    assert ledger.snapshot().nominated == {}


def test_a_replacement_confirms_a_reservation_only_where_it_is_bound():
    """A reservation held for a bind of unknown outcome is confirmed by the pod itself, or by the pod that replaced
    it on the reserved node; a pod bound elsewhere that names it (a tenant can write `replaced-uid` on any pod)
    confirms nothing, or the slice would look free while the bind may have happened."""
    g1 = ((TYPES[0], 1),)
    ledger = Ledger()
    ledger.replace_nodes(NodeState(name, allocatable=dict.fromkeys(TYPES, 1)) for name in NODES)
    ledger.reserve("uid-0", "n0", g1, 60.0)
    ledger.put_pod(record("uid-9", "n1", (), False, replaces="uid-0"))
    assert ledger.reservation("uid-0") is not None
    ledger.replace_pods([record("uid-9", "n1", (), False, replaces="uid-0")])
    assert ledger.reservation("uid-0") is not None
    assert ledger.snapshot().nodes["n0"].free[TYPES[0]] == 0
    ledger.put_pod(record("uid-1", "n0", g1, False, replaces="uid-0"))  # the replacement, where it was reserved
    assert ledger.reservation("uid-0") is None
    assert ledger.snapshot().nodes["n0"].free[TYPES[0]] == 0  # counted once: through the replacement now
