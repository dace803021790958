"""The simulator: hand-computed numbers on a tiny trace, conservation over random traces, determinism, bounds."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extender.config import load_rules
from extender.core.cluster import MigCounts, NodeState, Snapshot
from extender.sim.bounds import bounds
from extender.sim.engine import Job, SimPolicy, simulate
from extender.sim.fleet import FleetError, load_fleet, nodes_of
from extender.sim.geometry import A100_40, all_layouts_valid, compute_of, fits_gpu
from extender.sim.workload import WorkloadSpec, generate, read_csv

ROOT = Path(__file__).resolve().parents[2]
RULES = load_rules([ROOT / "chains" / "a100-40gb.yaml"])
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
