"""The cache publishes a new view only when something migchain reads changed (issue 22).

Every pod goes through several updates migchain does not read (the kubelet's
or kwok's status: Running, its IP, its conditions), and every node reports
heartbeats. Each publish copies the view and wakes the requeuer; an update
that changes nothing must cost neither.
"""

from __future__ import annotations

import copy
from typing import Any, cast

from extender.kube.api import KubeApi
from extender.kube.cache import ClusterCache
from extender.loan_guard import LoanGuard
from extender.store import SnapshotStore
from tests.unit.objects import G1, LOAN_KEY, node, pod


def cache_with(nodes: list[dict[str, Any]], pods: list[dict[str, Any]]) -> ClusterCache:
    cache = ClusterCache(cast(KubeApi, None), SnapshotStore(), loans=LoanGuard(LOAN_KEY))
    cache._list_nodes(nodes)
    cache._list_pods(pods)
    cache.changed.clear()
    return cache


def with_status(obj: dict[str, Any], **status: Any) -> dict[str, Any]:
    changed = copy.deepcopy(obj)
    changed["status"] = {**changed.get("status", {}), **status}
    changed["metadata"]["resourceVersion"] = "2"
    return changed


def test_a_pod_update_that_changes_nothing_migchain_reads_publishes_no_new_view():
    running = pod("p", {G1: 1}, "gpu-a")
    cache = cache_with([node("gpu-a", {G1: 2})], [running])
    before = cache.store.snapshot()
    cache._pod_event("MODIFIED", with_status(running, podIP="10.0.0.7", conditions=[{"type": "Ready"}]))
    assert cache.store.snapshot() is before
    assert not cache.changed.is_set()


def test_a_node_heartbeat_that_changes_nothing_migchain_reads_publishes_no_new_view():
    gpu = node("gpu-a", {G1: 2})
    cache = cache_with([gpu], [])
    before = cache.store.snapshot()
    cache._node_event("MODIFIED", with_status(gpu, conditions=[{"type": "Ready", "lastHeartbeatTime": "now"}]))
    assert cache.store.snapshot() is before
    assert not cache.changed.is_set()


def test_an_update_that_changes_what_migchain_reads_is_published_and_wakes_its_readers():
    pending = pod("p", {G1: 1}, phase="Pending")
    gpu = node("gpu-a", {G1: 2})
    cache = cache_with([gpu], [pending])
    before = cache.store.snapshot()
    cache._pod_event("MODIFIED", pod("p", {G1: 1}, "gpu-a"))
    bound = cache.store.snapshot()
    assert bound is not before and bound.nodes["gpu-a"].free[G1] == 1
    assert cache.changed.is_set()
    cache.changed.clear()
    cache._node_event("MODIFIED", node("gpu-a", {G1: 3}))
    assert cache.store.snapshot().nodes["gpu-a"].free[G1] == 2
    assert cache.changed.is_set()


def test_an_unchanged_pod_that_confirms_a_reservation_made_since_its_last_update_is_published():
    # A bind retried for a pod the API server had bound already: the same record
    # confirms the new reservation, which must stop counting twice.
    bound = pod("p", {G1: 1}, "gpu-a")
    cache = cache_with([node("gpu-a", {G1: 2})], [bound])
    uid = bound["metadata"]["uid"]
    cache.reserve(uid, "gpu-a", ((G1, 1),))
    assert cache.store.snapshot().nodes["gpu-a"].free[G1] == 0
    cache.changed.clear()
    cache._pod_event("MODIFIED", with_status(bound, podIP="10.0.0.7"))
    assert cache.store.snapshot().nodes["gpu-a"].free[G1] == 1
    assert cache.changed.is_set()
