"""The simulator's recarve policy: a re-carve through the core on a tiny fleet, the device plugin's drop, drains."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extender.core.cluster import MigCounts, Snapshot
from extender.core.geometry import A100_40
from extender.core.recarve import RecarvePolicy
from extender.core.rules import ChainRules
from extender.sim.engine import Job, SimPolicy, simulate
from extender.sim.fleet import nodes_of

A100 = "NVIDIA-A100-SXM4-40GB"
G1, G3 = "nvidia.com/mig-1g.5gb", "nvidia.com/mig-3g.20gb"
NO_CHAINS = ChainRules([])  # no borrowing: only a re-carve serves what fits nowhere
FAST = RecarvePolicy(sustained_seconds=60)


def fleet() -> list:  # type: ignore[type-arg]
    # n-000: one balanced GPU (2 x 1g, 1 x 2g, 1 x 3g); m-000: one GPU carved all-3g.20gb, which 1g pods cannot use.
    return [
        *nodes_of(A100, 1, A100_40.layouts["all-balanced"], 1, "n"),
        *nodes_of(A100, 1, A100_40.layouts["all-3g.20gb"], 1, "m"),
    ]


FIVE_1G = [Job(f"p{i}", 0, ((G1, 1),), 1000) for i in range(5)]


def test_an_idle_node_is_re_carved_for_sustained_demand_and_offers_nothing_meanwhile():
    # 2 of the 1g pods run on n at 0; 3 fit nowhere. At 60 s (a round, 60 s waited) m is re-carved, keeping
    # one 3g (4 x 1g + 1 x 3g beats 7 x 1g: it serves the same and takes less away); 120 s later they run.
    m = simulate(fleet(), NO_CHAINS, FIVE_1G, SimPolicy.RECARVE, horizon=2000, recarve=FAST)
    assert m.recarves == 1 and m.max_recarves_node_hour == 1
    assert m.mean_pending_s == pytest.approx(3 * 180 / 5)
    assert m.reconfiguring_gpu_hours == pytest.approx(120 / 3600)
    # m offered 2 x 3g for 60 s, nothing for 120 s, then 4 x 1g and 1 x 3g
    assert m.utilisation_by_type[G1] == pytest.approx((2 * 1000 + 3 * 1000) / (2 * 2000 + 4 * 1820))


def test_without_recarve_the_same_pods_wait_for_the_balanced_slices():
    m = simulate(fleet(), NO_CHAINS, FIVE_1G, SimPolicy.ON_DEMAND, horizon=2000)
    assert m.recarves == 0
    assert m.mean_pending_s == pytest.approx((2 * 1000 + 1 * 2000) / 5)


def test_a_slow_reconfiguration_is_a_parameter():
    m = simulate(fleet(), NO_CHAINS, FIVE_1G, SimPolicy.RECARVE, horizon=2000, recarve=FAST, reconfigure_seconds=600)
    assert m.mean_pending_s == pytest.approx(3 * 660 / 5)


def test_a_busy_node_is_drained_only_when_the_policy_says_so_then_re_carved():
    # n: one GPU of 7 x 1g, full until 5000; 8 more 1g pods wait. m: two GPUs of 2 x 3g, running A, B, E until
    # 500 and F until 4000. Without drains m idles at 4000, is re-carved at the 4020 round, offers 1g at 4140.
    # With drains m is cordoned at the 60 s round; from 500 its three free 3g (9 compute slices) sit unused, and
    # at 750 that waste (9 x 250) reaches what evicting F loses (3 x 750): F is evicted, m re-carved to
    # 4 x 1g + 1 x 3g per GPU (8 x 1g: all the demand; keeping 3g) and offers at 870, where F runs again.
    jobs = [
        *(Job(f"long{i}", 0, ((G1, 1),), 5000) for i in range(7)),
        *(Job(f"p{i}", 0, ((G1, 1),), 1000) for i in range(8)),
        *(Job(name, 0, ((G3, 1),), 500) for name in ("a", "b", "e")),
        Job("f", 0, ((G3, 1),), 4000),
    ]
    nodes = [
        *nodes_of(A100, 1, A100_40.layouts["all-1g.5gb"], 1, "n"),
        *nodes_of(A100, 2, A100_40.layouts["all-3g.20gb"], 2, "m"),
    ]
    without = simulate(nodes, NO_CHAINS, jobs, SimPolicy.RECARVE, horizon=5000, recarve=FAST)
    assert (without.recarves, without.restarts) == (1, 0)
    assert without.mean_pending_s == pytest.approx(8 * 4140 / 19)
    # The forecast is off: the 3g pods that arrived at 0 would otherwise keep m's 3g for half an hour
    # (test_re_carving_makes_no_type_wait_longer_than_without_it); this test is about the drain's timing.
    drain = RecarvePolicy(sustained_seconds=60, drain=True, forecast_seconds=0)
    drained = simulate(nodes, NO_CHAINS, jobs, SimPolicy.RECARVE, horizon=5000, recarve=drain)
    assert (drained.recarves, drained.restarts) == (1, 1)
    assert drained.mean_pending_s == pytest.approx((8 * 870 + 120) / 19)
    assert drained.lost_work_slice_hours == pytest.approx(3 * 750 / 3600)


@settings(max_examples=60, deadline=None)
@given(
    jobs=st.lists(
        st.tuples(st.integers(0, 600), st.sampled_from((G1, G1, G1, G3)), st.integers(10, 400)), min_size=1, max_size=25
    ),
    drain=st.booleans(),
)
def test_re_carving_never_double_uses_a_slice_nor_loses_a_pod(jobs: list[tuple[int, str, int]], drain: bool):
    trace = [Job(f"p{i}", at, ((kind, 1),), runtime) for i, (at, kind, runtime) in enumerate(jobs)]

    def check(snapshot: Snapshot, running: Mapping[str, tuple[str, MigCounts]]) -> None:
        for node in snapshot.nodes.values():
            for resource, count in node.used.items():
                assert 0 <= count <= node.allocatable.get(resource, 0), node

    policy = RecarvePolicy(sustained_seconds=30, cooldown_seconds=100, max_in_flight=2, drain=drain)
    m = simulate(fleet(), NO_CHAINS, trace, SimPolicy.RECARVE, horizon=900, recarve=policy, observe=check)
    assert m.finished + m.running_at_end + m.pending_at_end == m.pods
    assert m.max_recarves_node_hour <= policy.max_per_hour


def test_re_carving_makes_no_type_wait_longer_than_without_it():
    # m, one GPU carved all-3g.20gb, serves pairs of 3g pods arriving every 300 s for 100 s. Five 1g pods fit
    # nowhere. Re-carving m for them (idle at the 120 s round) would take a 3g its own pods ask for every 300 s:
    # the 3g pods' recent arrivals leave no 3g spare, so m keeps its layout and the 3g pods never wait.
    jobs = [*FIVE_1G, *(Job(f"t{i}{k}", 300 * i, ((G3, 1),), 100) for i in range(6) for k in "ab")]
    nodes = nodes_of(A100, 1, A100_40.layouts["all-3g.20gb"], 1, "m")
    without = simulate(nodes, NO_CHAINS, jobs, SimPolicy.ON_DEMAND, horizon=2000)
    recarved = simulate(nodes, NO_CHAINS, jobs, SimPolicy.RECARVE, horizon=2000, recarve=FAST)
    assert without.mean_pending_by_type_s[G3] == 0
    assert recarved.mean_pending_by_type_s[G3] == 0
    assert recarved.recarves == 0
