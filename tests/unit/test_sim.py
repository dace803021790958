"""The simulator: hand-computed numbers on a tiny trace, conservation over random traces, determinism, bounds."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extender.config import load_rules
from extender.core.cluster import MigCounts, NodeState, Snapshot
from extender.core.geometry import A100_40, all_layouts_valid, compute_of, fits_gpu
from extender.core.rules import ChainRules
from extender.sim.bounds import bounds
from extender.sim.engine import Job, SimPolicy, simulate
from extender.sim.fleet import FleetError, load_fleet, nodes_of
from extender.sim.report import run_policies
from extender.sim.workload import WorkloadSpec, generate, read_csv

ROOT = Path(__file__).resolve().parents[2]
RULES = load_rules([ROOT / "chains" / "a100-40gb.yaml"])
# The same chain taking slices back at once and keeping none free: the moves of the return planner alone.
AT_ONCE = ChainRules(
    dataclasses.replace(chain, policy=dataclasses.replace(chain.policy, reclaim_after_seconds=0, headroom_seconds=0))
    for chain in RULES.chains
)
A100 = "NVIDIA-A100-SXM4-40GB"
G1, G2, G3 = "nvidia.com/mig-1g.5gb", "nvidia.com/mig-2g.10gb", "nvidia.com/mig-3g.20gb"


def one_node(**allocatable: int) -> list[NodeState]:
    return [
        NodeState("n0", A100, "success", {f"nvidia.com/mig-{k.replace('_', '.')}": v for k, v in allocatable.items()})
    ]


TINY = [Job("a", 0, ((G1, 1),), 50), Job("b", 0, ((G1, 1),), 100), Job("c", 60, ((G2, 1),), 50)]


def test_static_on_a_tiny_trace_matches_hand_computation():
    # a runs [0,50] on the 1g; b waits for it, runs [50,150]; c runs [60,110] on the 2g.
    m = simulate(one_node(**{"1g.5gb": 1, "2g.10gb": 1}), RULES, TINY, SimPolicy.STATIC, horizon=160)
    assert m.mean_pending_s == pytest.approx(50 / 3)
    assert (m.borrows, m.restarts, m.never_placed) == (0, 0, 0)
    assert m.useful_utilisation == pytest.approx((50 + 100 + 2 * 50) / (3 * 160))
    assert m.utilisation_by_type == pytest.approx({G1: 150 / 160, G2: 50 / 160})


def test_on_demand_on_a_tiny_trace_returns_only_when_a_pod_waits():
    # b borrows the 2g at 0; at 50 the 1g frees but nobody waits: b stays. At 60 c needs the
    # 2g: b is returned (60 s of 1 slice lost) to the 1g [60,160], c runs [60,110].
    m = simulate(one_node(**{"1g.5gb": 1, "2g.10gb": 1}), RULES, TINY, SimPolicy.ON_DEMAND, horizon=160)
    assert (m.borrows, m.restarts) == (1, 1)
    assert m.mean_pending_s == 0
    assert m.lost_work_slice_hours == pytest.approx(60 / 3600)
    assert m.useful_utilisation == pytest.approx((50 + 100 + 2 * 50) / (3 * 160))
    assert m.held_utilisation == pytest.approx((50 + 2 * 60 + 100 + 2 * 50) / (3 * 160))


def test_eager_on_a_tiny_trace_returns_as_soon_as_the_1g_frees():
    m = simulate(one_node(**{"1g.5gb": 1, "2g.10gb": 1}), RULES, TINY, SimPolicy.EAGER, horizon=160)
    assert (m.borrows, m.restarts) == (1, 1)
    assert m.lost_work_slice_hours == pytest.approx(50 / 3600)  # b ran 50 s on the 2g


# What the largest node of the property's fleet has (2 all-balanced GPUs): no request asks for more.
LARGEST_NODE = {G1: 4, G2: 2, G3: 2}


@st.composite
def requests(draw: st.DrawFn) -> MigCounts:
    """Mostly one slice, as most pods ask; else several slices of one type, or several types."""
    if draw(st.booleans()):
        return ((draw(st.sampled_from((G1, G1, G2, G3))), 1),)
    types = draw(st.lists(st.sampled_from(sorted(LARGEST_NODE)), min_size=1, max_size=3, unique=True))
    return tuple(sorted((t, draw(st.integers(1, LARGEST_NODE[t]))) for t in types))


@st.composite
def traces(draw: st.DrawFn) -> list[Job]:
    count = draw(st.integers(1, 25))
    return [Job(f"p{i}", draw(st.integers(0, 300)), draw(requests()), draw(st.integers(10, 400))) for i in range(count)]


@given(jobs=traces(), policy=st.sampled_from(list(SimPolicy)))
def test_no_slice_is_double_used_and_every_pod_runs_at_most_once_at_a_time(jobs, policy):
    nodes = nodes_of(A100, 3, A100_40.layouts["all-balanced"], 2, "n")

    asked = {job.name: job.mig for job in jobs}

    def check(snapshot: Snapshot, running: Mapping[str, tuple[str, MigCounts]]) -> None:
        held: dict[str, Counter[str]] = {name: Counter() for name in snapshot.nodes}
        for pod, (host, slices) in running.items():  # one entry per pod: a pod runs in one place or none
            # A pod holds one slice for each it asked for: the same type, or a larger one it borrowed.
            assert sum(count for _, count in slices) == sum(count for _, count in asked[pod])
            assert compute_of(slices) >= compute_of(asked[pod])
            for resource, count in slices:
                held[host][resource] += count
        for name, node in snapshot.nodes.items():
            assert {r: n for r, n in node.used.items() if n} == {r: n for r, n in held[name].items() if n}
            for resource, count in node.used.items():
                assert 0 <= count <= node.allocatable.get(resource, 0)

    m = simulate(nodes, RULES, jobs, policy, horizon=300, observe=check)
    assert m.never_placed == 0  # every type of the trace exists in the fleet and nothing runs forever
    assert m.useful_utilisation <= m.held_utilisation + 1e-9 <= 1 + 1e-9
    if policy is SimPolicy.STATIC:
        assert m.borrows == m.restarts == 0


def test_the_same_seed_gives_the_same_trace_and_the_same_results():
    spec = WorkloadSpec(mix_a={"1g.5gb": 0.7, "2g.10gb": 0.3}, mix_b={"3g.20gb": 1.0}, load=0.9, duration_s=4 * 3600)
    first, again = generate(spec, 70, seed=3), generate(spec, 70, seed=3)
    assert first == again
    assert first != generate(spec, 70, seed=4)
    nodes = nodes_of(A100, 10, A100_40.layouts["all-balanced"], 8, "n")
    one = simulate(nodes, RULES, first, SimPolicy.ON_DEMAND)
    two = simulate(nodes, RULES, again, SimPolicy.ON_DEMAND)
    assert one == two


def test_bounds_on_a_hand_made_case():
    # One GPU-worth: 1 x 1g and 1 x 3g for 100 s; demand: 2 pods x 100 s of 1g. Capacity 4 slices x 100 s.
    jobs = [Job("a", 0, ((G1, 1),), 100), Job("b", 0, ((G1, 1),), 100)]
    b = bounds(one_node(**{"1g.5gb": 1, "3g.20gb": 1}), RULES, jobs, horizon=100)
    assert b.fluid == pytest.approx(200 / 400)
    assert b.static == pytest.approx(100 / 400)  # only one 1g slice serves 1g demand
    assert b.borrowing == pytest.approx(200 / 400)  # the 3g slice (3 steps up, allowed) serves the other


def test_every_named_layout_fits_its_gpu_and_impossible_ones_do_not():
    assert all_layouts_valid() == []
    assert not fits_gpu(A100_40, {"1g.5gb": 8})  # 7 compute slices
    assert not fits_gpu(A100_40, {"3g.20gb": 2, "1g.5gb": 1})  # memory slices all taken


def test_a_bad_fleet_file_names_the_field(tmp_path: Path):
    bad = tmp_path / "fleet.yaml"
    bad.write_text("gpus:\n  - product: NVIDIA-A100-SXM4-40GB\n    count: 4\n    layout: all-lopsided\n")
    with pytest.raises(FleetError, match=r"gpus\[0\]\.layout: 'all-lopsided' is not a layout of A100-40GB"):
        load_fleet(bad)
    assert len(load_fleet(ROOT / "bench" / "fleets" / "a100-balanced.yaml")) == 13


def test_a_bad_trace_row_names_the_line(tmp_path: Path):
    trace = tmp_path / "t.csv"
    trace.write_text("name,arrival_s,type,runtime_s\na,0,1g.5gb,10\nb,oops,1g.5gb,10\n")
    with pytest.raises(ValueError, match=r"t\.csv:3: "):
        read_csv(trace)


def test_never_on_a_tiny_trace_borrows_and_keeps_the_loan():
    # b borrows the 2g at 0 and keeps it: c waits for b to finish at 100 (40 s), nothing is thrown away.
    m = simulate(one_node(**{"1g.5gb": 1, "2g.10gb": 1}), RULES, TINY, SimPolicy.NEVER, horizon=160)
    assert (m.borrows, m.restarts, m.lost_work_slice_hours) == (1, 0, 0)
    assert m.mean_pending_s == pytest.approx(40 / 3)
    assert m.useful_utilisation == pytest.approx((50 + 100 + 2 * 50) / (3 * 160))


@given(jobs=traces())
def test_never_returns_nothing_and_borrows_as_on_demand_does_where_on_demand_returns_nothing(jobs):
    nodes = nodes_of(A100, 2, A100_40.layouts["all-balanced"], 2, "n")
    never = simulate(nodes, AT_ONCE, jobs, SimPolicy.NEVER, horizon=300)
    on_demand = simulate(nodes, AT_ONCE, jobs, SimPolicy.ON_DEMAND, horizon=300)
    assert never.restarts == 0 and never.lost_work_slice_hours == 0
    if on_demand.restarts == 0:  # then on-demand made the same moves as never: the same run
        assert never == on_demand


def test_a_pod_never_placed_counts_in_the_pending_figures_censored_at_the_end():
    # No 3g slice: c is never placed. The run ends at the horizon (100); c waited 100 - 10 = 90 s.
    jobs = [Job("a", 0, ((G1, 1),), 50), Job("c", 10, ((G3, 1),), 50)]
    m = simulate(one_node(**{"1g.5gb": 1, "2g.10gb": 1}), RULES, jobs, SimPolicy.STATIC, horizon=100)
    assert m.never_placed == 1
    assert m.mean_pending_s == pytest.approx(90 / 2)
    assert m.p95_pending_s == pytest.approx(90)


def test_the_time_aware_bound_sees_that_late_demand_cannot_be_served_early():
    # One 1g slice for 200 s; two pods of 50 s arrive at 150: only 50 s of the slice is left for them.
    jobs = [Job("a", 150, ((G1, 1),), 50), Job("b", 150, ((G1, 1),), 50)]
    assert bounds(one_node(**{"1g.5gb": 1}), RULES, jobs, horizon=200, bin_s=50).timed == pytest.approx(50 / 200)
    coarse = bounds(one_node(**{"1g.5gb": 1}), RULES, jobs, horizon=200, bin_s=100)
    assert coarse.borrowing == pytest.approx(100 / 200)  # the day-aggregated LP serves both
    assert coarse.timed == pytest.approx(100 / 200)  # a bin as long as [100, 200) cannot tell


def test_the_time_aware_bound_lets_demand_borrow_a_larger_slice_in_the_bins_after_its_arrival():
    # a and b (1g, 100 s) arrive at 0 on one 1g and one 2g slice for 100 s; c (2g, 50 s) arrives at 50.
    # At best a runs on the 1g, b on the 2g before 50 and c on it after: 100 + 50 + 2 x 50 of 300 slice-seconds.
    jobs = [Job("a", 0, ((G1, 1),), 100), Job("b", 0, ((G1, 1),), 100), Job("c", 50, ((G2, 1),), 50)]
    nodes = one_node(**{"1g.5gb": 1, "2g.10gb": 1})
    assert bounds(nodes, RULES, jobs, horizon=100, bin_s=25).timed == pytest.approx(250 / 300)
    # c cannot start before it arrives: with it at 75, b keeps the 2g until 75 and c gets 25 s of it.
    late = [*jobs[:2], Job("c", 75, ((G2, 1),), 50)]
    assert bounds(nodes, RULES, late, horizon=100, bin_s=25).timed == pytest.approx((100 + 75 + 2 * 25) / 300)


@st.composite
def fleets(draw: st.DrawFn) -> list[NodeState]:
    layouts = st.sampled_from(sorted(A100_40.layouts))
    parts = draw(st.lists(st.tuples(st.integers(1, 3), layouts), min_size=1, max_size=2))
    return [
        node
        for i, (count, layout) in enumerate(parts)
        for node in nodes_of(A100, count, A100_40.layouts[layout], 2, f"g{i}")
    ]


@settings(max_examples=150, deadline=None)
@given(nodes=fleets(), jobs=traces(), bin_s=st.sampled_from((20.0, 45.0, 100.0, 300.0, 900.0)))
def test_no_policy_beats_the_time_aware_bound_and_it_is_within_the_day_aggregated_one(nodes, jobs, bin_s):
    b = bounds(nodes, RULES, jobs, horizon=300, bin_s=bin_s)
    assert b.timed <= b.borrowing + 1e-9
    for policy in SimPolicy:
        if policy is SimPolicy.RECARVE:
            continue  # re-carving changes the geometry these bounds hold fixed
        assert simulate(nodes, RULES, jobs, policy, horizon=300).useful_utilisation <= b.timed + 1e-9, policy


def test_pending_per_requested_type_comes_from_the_same_censored_waits():
    # static on TINY: a waits 0 and b 50 (1g), c 0 (2g); d (3g, no such slice) is censored at the horizon.
    jobs = [*TINY, Job("d", 10, ((G3, 1),), 50)]
    m = simulate(one_node(**{"1g.5gb": 1, "2g.10gb": 1}), RULES, jobs, SimPolicy.STATIC, horizon=160)
    assert m.mean_pending_by_type_s == pytest.approx({G1: 25, G2: 0, G3: 150})
    assert m.p95_pending_by_type_s == pytest.approx({G1: 50, G2: 0, G3: 150})
    assert m.mean_pending_s == pytest.approx((0 + 50 + 0 + 150) / 4)


def test_the_report_prints_pending_per_type_per_policy(tmp_path: Path):
    trace = tmp_path / "t.csv"
    trace.write_text("name,arrival_s,type,runtime_s\na,0,1g.5gb,50\nb,0,1g.5gb,100\nc,60,2g.10gb,50\nd,160,1g.5gb,1\n")
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("gpus:\n  - product: NVIDIA-A100-SXM4-40GB\n    count: 1\n    layout: {1g.5gb: 1, 2g.10gb: 1}\n")
    report = run_policies(fleet, RULES, str(trace), None, [SimPolicy.STATIC, SimPolicy.NEVER])
    table = report.table()
    assert "pending per type, mean / p95 (min)" in table
    assert any(line.split()[:3] == ["static", "0.3", "/"] for line in table.splitlines()), table  # 1g: 50 s / 3 pods
    document = report.document()
    assert document["runs"]["never"]["mean_pending_by_type_s"] == pytest.approx({G1: 0, G2: 40})
