"""Two extender replicas: the lease hand-over (properties on a simulated clock), the fenced binder, the follower's
answers, and the relist a new leader makes before it acts."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st

from extender.core.cluster import BindRequest
from extender.kube.api import ApiError, KubeApi
from extender.kube.cache import ClusterCache
from extender.kube.lease import LeaderElection, Leadership
from extender.loan_guard import LoanGuard
from extender.metrics import Metrics
from extender.reload import RulesInForce
from extender.store import SnapshotStore
from extender.web.app import WebSettings, create_app
from tests.unit.objects import G1, LOAN_KEY, RULES, node, pod
from tests.unit.test_needless_borrow import binder, cluster

LEASE = "/apis/coordination.k8s.io/v1/namespaces/ns/leases/migchain-extender"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LeaseServer:
    """One Lease as the API server keeps it: a resourceVersion per write, a PUT on a stale version refused (409).

    `latency` is drawn for each call: the clock moves on by it, half before the server acts, half after.
    """

    def __init__(self, clock: Clock, latency: Iterator[float] | None = None) -> None:
        self.clock = clock
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.latency = latency

    def _wait(self) -> None:
        if self.latency is not None:
            self.clock.now += next(self.latency) / 2

    def get(self, resource: str, **_: Any) -> dict[str, Any]:
        self._wait()
        try:
            if self.lease is None:
                raise ApiError(404, "NotFound", resource)
            copy: dict[str, Any] = json.loads(json.dumps(self.lease))
            return copy
        finally:
            self._wait()

    def create(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        self._wait()
        try:
            if self.lease is not None:
                raise ApiError(409, "AlreadyExists", resource)
            return self._store(body)
        finally:
            self._wait()

    def request(self, method: str, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        assert method == "PUT"
        self._wait()
        try:
            assert self.lease is not None
            if body["metadata"]["resourceVersion"] != self.lease["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", resource)
            return self._store(body)
        finally:
            self._wait()

    def _store(self, body: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        self.lease = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.version)}}
        return self.lease

    def write_as(self, holder: str, renew_time: str = "2020-01-01T00:00:00.000000Z", duration: int = 3) -> None:
        """Another replica's renewal, stamped with whatever its wall clock says."""
        spec = {"holderIdentity": holder, "leaseDurationSeconds": duration, "renewTime": renew_time}
        self._store({"metadata": {"name": "migchain-extender"}, "spec": spec})


def election(server: LeaseServer, clock: Clock, identity: str) -> LeaderElection:
    return LeaderElection(
        cast(KubeApi, server), "ns", "migchain-extender", identity, duration=3.0, renew=1.0, retry=0.5, clock=clock
    )


def test_a_lease_renewed_by_a_holder_whose_clock_is_behind_is_never_taken_over():
    clock = Clock()
    server = LeaseServer(clock)
    follower = election(server, clock, "b")
    # The holder renews every second, but its wall clock is a year behind: its renewTime always looks expired.
    for _ in range(30):
        server.write_as("a", renew_time="2020-01-01T00:00:00.000000Z")
        follower.try_once()
        assert not follower.leading()
        clock.now += 1.0
    assert server.lease is not None and server.lease["spec"]["holderIdentity"] == "a"


def test_a_lease_whose_holder_stopped_is_taken_over_one_whole_duration_after_its_last_version_was_seen():
    clock = Clock()
    server = LeaseServer(clock)
    follower = election(server, clock, "b")
    # Stamped with a renewTime far in the future by a holder whose clock is ahead: no matter.
    server.write_as("a", renew_time="2999-01-01T00:00:00.000000Z")
    seen = clock.now
    while clock.now < seen + 3.0:
        follower.try_once()
        assert not follower.leading()
        clock.now += 0.5
    follower.try_once()
    assert follower.leading()
    assert follower.term == 1
    assert server.lease is not None and server.lease["spec"]["holderIdentity"] == "b"


def test_a_follower_looks_again_right_when_the_lease_would_lapse_and_never_hammers_a_failing_write():
    clock = Clock()
    server = LeaseServer(clock)
    follower = election(server, clock, "b")
    server.write_as("a")
    assert follower.try_once() == 0.5  # the lapse is 3 s away: the usual retry
    clock.now += 2.8
    assert abs(follower.try_once() - 0.2) < 1e-9  # not 0.5: right at the lapse
    clock.now += 0.2
    follower.try_once()
    assert follower.leading()

    class Refusing(LeaseServer):
        def request(self, method: str, resource: str, body: dict[str, Any]) -> dict[str, Any]:
            raise ApiError(500, "InternalError", "etcd is away")

    clock = Clock()
    refusing = Refusing(clock)
    follower = election(refusing, clock, "b")
    refusing.write_as("a")
    follower.try_once()
    clock.now += 3.0
    assert [follower.try_once() for _ in range(3)] == [0.5, 0.5, 0.5]  # the take-over fails: the retry period
    assert not follower.leading()


def test_the_term_counts_each_start_of_leading_and_a_lapse_of_renewals_ends_it():
    clock = Clock()
    server = LeaseServer(clock)
    leader = election(server, clock, "a")
    leader.try_once()
    assert leader.leading() and leader.term == 1
    clock.now += 1.0
    leader.try_once()  # renewed: the same term
    assert leader.term == 1
    clock.now += 2.0  # two renewal periods without a renewal: it has stopped leading
    assert not leader.leading()
    leader.try_once()  # the lease is still its own: it leads again, but in a new term (another may have acted)
    assert leader.leading() and leader.term == 2


@given(
    freezes=st.lists(st.tuples(st.sampled_from("ab"), st.floats(0.0, 40.0), st.floats(0.0, 12.0)), max_size=6),
    jitters=st.lists(st.floats(0.0, 0.3), min_size=1, max_size=10),
    latencies=st.lists(st.just(0.0) | st.floats(0.0, 0.6), min_size=1, max_size=10),
)
def test_two_replicas_never_lead_at_once_and_a_new_leader_starts_a_renewal_period_after_the_old_one_stopped(
    freezes, jitters, latencies
):
    """Two replicas run their election loops for a simulated minute; each is frozen (a pause, or kill -9 when
    long) at random moments; API calls take random time. Every span of leading of one replica ends at least
    one renewal period before a span of the other begins."""
    clock = Clock()
    server = LeaseServer(clock, itertools.cycle(latencies))
    replicas = {name: election(server, clock, name) for name in "ab"}
    jitter = itertools.cycle(jitters)
    due = {"a": clock.now, "b": clock.now + next(jitter)}
    spans: list[tuple[str, int, list[float]]] = []  # (replica, term, [first moment leading, end as last extended])
    while min(due.values()) < 1060.0:
        name = min(due, key=lambda key: due[key])
        clock.now = max(clock.now, due[name])
        frozen = [
            at + 1000.0 + length for who, at, length in freezes if who == name and 0 <= clock.now - at - 1000.0 < length
        ]
        if frozen:
            due[name] = max(*frozen, clock.now + 0.001)  # rounding must not keep it frozen forever
            continue
        replica = replicas[name]
        wait = replica.try_once()
        if replica.leading():
            if not spans or spans[-1][:2] != (name, replica.term):
                spans.append((name, replica.term, [clock.now, replica._valid_until]))
            spans[-1][2][1] = replica._valid_until
        due[name] = clock.now + wait + next(jitter)
    for (name, _, (_, end)), (other, _, (start, _)) in itertools.pairwise(spans):
        if other != name:
            assert start >= end + 1.0 - 1e-9, spans


# -- the fenced binder -------------------------------------------------------------


def test_a_replica_that_stopped_leading_between_its_decision_and_its_write_refuses_and_frees_the_slice():
    cache, api, pending = cluster()
    answers = iter([True, False])  # leading when the bind starts, no longer at the write
    fenced = binder(cache, api, None, Metrics())
    fenced.acting = lambda: next(answers)
    p = pending[0]["metadata"]
    outcome = fenced.bind(BindRequest("ml", p["name"], p["uid"], "gpu-b"))
    assert "not the leader" in outcome.error
    assert api.created == []  # no Binding written
    assert cache.ledger.reservations() == {}  # the slice is free again for the new leader's own binds


def test_a_follower_asked_to_bind_refuses_with_an_error_and_writes_nothing():
    cache, api, pending = cluster()
    follower = binder(cache, api, None, Metrics())
    follower.acting = lambda: False
    p = pending[0]["metadata"]
    outcome = follower.bind(BindRequest("ml", p["name"], p["uid"], "gpu-b"))
    assert outcome.error and "not the leader" in outcome.error
    assert api.created == []
    assert cache.ledger.reservations() == {}


# -- the follower's answers -----------------------------------------------------------


def test_a_follower_is_not_ready_and_answers_every_verb_503_until_it_leads():
    store = SnapshotStore()
    why = ["follower: the lease migchain-system/migchain-extender is held by extender-a"]
    store.gate(lambda: why[0])
    app = create_app(WebSettings(), RulesInForce.fixed(RULES), store).test_client()
    body = {"Pod": pod("p", {G1: 1}, phase="Pending"), "NodeNames": ["gpu-a"]}
    for verb in ("/filter", "/prioritize"):
        answer = app.post(verb, json=body)
        assert answer.status_code == 503
        assert "follower" in cast(dict[str, str], answer.json)["Error"]
    bind = app.post("/bind", json={"PodName": "p", "PodNamespace": "ml", "PodUID": "u", "Node": "gpu-a"})
    assert bind.status_code == 503 and "follower" in cast(dict[str, str], bind.json)["Error"]
    assert not store.readiness().ready and "follower" in store.readiness().detail
    why[0] = ""  # it leads, and has relisted
    assert store.readiness().ready
    assert app.post("/filter", json=body).status_code == 200


# -- the relist before acting ------------------------------------------------------------


class Stream:
    """A watch stream that blocks until shut down, as urllib3's response does."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    def shutdown(self) -> None:
        self.closed.set()


class WatchingApi:
    """Lists count; each watch blocks, silent, until its stream is shut down."""

    def __init__(self) -> None:
        self.lists: dict[str, int] = {}

    def list_all(self, resource: str, **_: Any) -> tuple[list[dict[str, Any]], str]:
        self.lists[resource] = self.lists.get(resource, 0) + 1
        if resource.endswith("nodes"):
            return [node("gpu-a", {G1: 1})], "1"
        return [pod("p", {G1: 1}, phase="Pending")], "1"

    def watch(self, resource: str, version: str, on_open: Any = None, **_: Any) -> Iterator[dict[str, Any]]:
        stream = Stream()
        if on_open is not None:
            on_open(stream)
        if not stream.closed.wait(30):
            return
        raise ApiError(0, "NoAnswer", "stream shut down")
        yield {}  # a generator


def test_a_relist_cuts_a_silent_watch_and_returns_once_both_kinds_are_listed_again():
    api = WatchingApi()
    cache = ClusterCache(cast(KubeApi, api), SnapshotStore(ready=False), loans=LoanGuard(LOAN_KEY))
    cache.start()
    try:
        assert cache.wait_ready(10)
        started = time.monotonic()
        assert cache.relist(timeout=10)
        assert time.monotonic() - started < 5  # not the watch's own 5-minute end
        assert api.lists == {"/api/v1/nodes": 2, "/api/v1/pods": 2}
    finally:
        cache.stop()


def test_leadership_acts_only_after_a_relist_made_in_its_current_term():
    clock = Clock()
    server = LeaseServer(clock)
    lease = election(server, clock, "a")
    relists: list[int] = []

    def relist() -> bool:
        relists.append(lease.term)
        return True

    leadership = Leadership(lease, relist=relist)
    assert not leadership.acting() and "follower" in leadership.why_not()
    lease.try_once()
    assert lease.leading()
    assert not leadership.acting() and "relisting" in leadership.why_not()
    leadership.catch_up()
    assert relists == [1] and leadership.acting() and leadership.why_not() == ""
    clock.now += 2.0  # renewals lapsed: it stops acting at once
    assert not leadership.acting()
    lease.try_once()  # back, in a new term: another replica may have acted meanwhile
    assert not leadership.acting()
    leadership.catch_up()
    assert relists == [1, 2] and leadership.acting()
