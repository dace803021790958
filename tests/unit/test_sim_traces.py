"""Trace pods of several slices and types: the CSV format, their replay through the core, the bounds, the generator."""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extender.config import load_rules
from extender.core.cluster import MigCounts, NodeState, Snapshot
from extender.core.geometry import compute_of
from extender.core.rules import ChainRules
from extender.sim.bounds import bounds
from extender.sim.engine import Job, SimPolicy, _requested_type, simulate
from extender.sim.workload import DAY, WorkloadSpec, format_request, generate, parse_request, read_csv, write_csv

ROOT = Path(__file__).resolve().parents[2]
RULES = load_rules([ROOT / "chains" / "a100-40gb.yaml"])
# The same chain taking slices back at once and keeping none free: the moves of the return planner alone.
AT_ONCE = ChainRules(
    dataclasses.replace(chain, policy=dataclasses.replace(chain.policy, reclaim_after_seconds=0, headroom_seconds=0))
    for chain in RULES.chains
)
A100 = "NVIDIA-A100-SXM4-40GB"
G1, G1M, G2, G3 = (f"nvidia.com/mig-{p}" for p in ("1g.5gb", "1g.10gb", "2g.10gb", "3g.20gb"))


def node(name: str, **allocatable: int) -> NodeState:
    return NodeState(
        name, A100, "success", {f"nvidia.com/mig-{k.replace('_', '.')}": v for k, v in allocatable.items()}
    )


# -- the CSV format ------------------------------------------------------------


def test_the_type_column_reads_several_slices_and_types(tmp_path: Path):
    trace = tmp_path / "t.csv"
    trace.write_text(
        "name,arrival_s,type,runtime_s\n"
        "one,0,1g.5gb,10\n"
        "res,1,nvidia.com/mig-3g.20gb,10\n"
        "two,2,2x1g.5gb,10\n"
        "mixed,3,2g.10gb+1g.5gb,10\n"
        "spaced,4, 2 x 1g.5gb + nvidia.com/mig-3g.20gb ,10\n"
        "again,5,1g.5gb+1g.5gb,10\n"
    )
    assert [(job.name, job.mig) for job in read_csv(trace)] == [
        ("one", ((G1, 1),)),
        ("res", ((G3, 1),)),
        ("two", ((G1, 2),)),
        ("mixed", ((G1, 1), (G2, 1))),  # sorted, as PodRequest.mig is
        ("spaced", ((G1, 2), (G3, 1))),
        ("again", ((G1, 2),)),  # a type named twice adds up, as a pod's containers do
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("b,5,3x,10", r"t\.csv:3: type: '3x': .*nvidia\.com/mig-<N>g\.<M>gb"),
        ("b,5,0x1g.5gb,10", r"t\.csv:3: type: '0x1g\.5gb': 0 slices of 1g\.5gb \(at least 1\)"),
        ("b,5,1g.5gb+,10", r"t\.csv:3: type: '1g\.5gb\+': an empty part"),
        ("b,5,,10", r"t\.csv:3: type: '': an empty part"),
        ("b,5,1g.5gb+me,10", r"t\.csv:3: type: '1g\.5gb\+me': 'me' is no MIG profile.*1g\.5gb\.me"),
        ("b,5,2x2x1g.5gb,10", r"t\.csv:3: type: '2x2x1g\.5gb'"),
        ("b,5,gpu,10", r"t\.csv:3: type: 'gpu'"),
        ("b,oops,1g.5gb,10", r"t\.csv:3: arrival_s: 'oops' is not a number"),
        ("b,5,1g.5gb,-1", r"t\.csv:3: runtime_s: -1\.0 is below 0"),
        ("b,5,1g.5gb,nan", r"t\.csv:3: runtime_s: 'nan' is not a finite number"),
        ("b,5,1g.5gb", r"t\.csv:3: runtime_s: missing"),
        ("a,5,1g.5gb,10", r"t\.csv:3: name: 'a' is already the name of the pod on line 2"),
        (",5,1g.5gb,10", r"t\.csv:3: name: empty"),
    ],
)
def test_a_bad_trace_row_names_the_file_the_line_and_the_field(tmp_path: Path, row: str, message: str):
    trace = tmp_path / "t.csv"
    trace.write_text(f"name,arrival_s,type,runtime_s\na,0,1g.5gb,10\n{row}\n")
    with pytest.raises(ValueError, match=message):
        read_csv(trace)


PROFILES = ("1g.5gb", "1g.10gb", "2g.10gb", "3g.20gb", "4g.40gb", "7g.80gb", "1g.24gb-me")


@st.composite
def jobs(draw: st.DrawFn) -> list[Job]:
    count = draw(st.integers(0, 12))
    found = []
    for index in range(count):
        profiles = draw(st.lists(st.sampled_from(PROFILES), min_size=1, max_size=3, unique=True))
        mig = tuple(sorted((f"nvidia.com/mig-{p}", draw(st.integers(1, 12))) for p in profiles))
        arrival = draw(st.floats(0, 1e7, allow_nan=False, allow_infinity=False))
        runtime = draw(st.floats(0, 1e6, allow_nan=False, allow_infinity=False))
        found.append(Job(f"pod-{index}", arrival, mig, runtime))
    return found


@given(jobs=jobs())
def test_write_csv_then_read_csv_gives_the_same_jobs(tmp_path_factory: pytest.TempPathFactory, jobs: list[Job]):
    path = tmp_path_factory.mktemp("round") / "trace.csv"
    write_csv(jobs, path)
    assert read_csv(path) == jobs


@given(jobs=jobs())
def test_parse_request_reads_what_format_request_writes(jobs: list[Job]):
    for job in jobs:
        assert parse_request(format_request(job.mig)) == job.mig


@pytest.mark.parametrize("trace", ["drifting-mix", "small-heavy"])
def test_one_type_rows_read_and_write_back_unchanged(tmp_path: Path, trace: str):
    shipped = ROOT / "bench" / "traces" / f"{trace}.csv"
    jobs = read_csv(shipped)
    assert all(len(job.mig) == 1 and job.mig[0][1] == 1 for job in jobs)
    write_csv(jobs, tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_bytes() == shipped.read_bytes()


def test_a_job_takes_counts_not_a_resource_name():
    with pytest.raises(TypeError, match=r"\(\(resource, count\), \.\.\.\)"):
        Job("a", 0, G1, 10)  # type: ignore[arg-type]
    assert Job("a", 0, ((G2, 1), (G1, 2)), 10).mig == ((G1, 2), (G2, 1))  # sorted, as PodRequest.mig is
    assert Job("a", 0, ((G1, 1), (G2, 1), (G1, 1)), 10).mig == ((G1, 2), (G2, 1))  # and merged


def test_a_pods_requested_type_is_its_largest():
    assert _requested_type(Job("a", 0, ((G1, 3),), 10)) == G1
    assert _requested_type(Job("a", 0, ((G1, 3), (G3, 1), (G2, 2)), 10)) == G3
    assert _requested_type(Job("a", 0, ((G1, 1), (G1M, 1)), 10)) == G1M  # same compute: more memory is larger


# -- the replay ----------------------------------------------------------------


def test_a_multi_slice_pod_holds_all_its_slices_or_waits():
    seen: list[dict[str, tuple[str, MigCounts]]] = []

    def observe(_: Snapshot, running: Mapping[str, tuple[str, MigCounts]]) -> None:
        seen.append(dict(running))

    # "big" asks for 3 x 1g, on a node of 3: it waits till "small" ends at 100, then runs [100, 150].
    jobs = [Job("a-small", 0, ((G1, 1),), 100), Job("b-big", 0, ((G1, 3),), 50)]
    m = simulate([node("n0", **{"1g.5gb": 3})], RULES, jobs, SimPolicy.ON_DEMAND, horizon=150, observe=observe)
    assert "b-big" not in seen[0] and any(running.get("b-big") == ("n0", ((G1, 3),)) for running in seen)
    assert all(pod != "b-big" or slices == ((G1, 3),) for running in seen for pod, (_, slices) in running.items())
    assert (m.never_placed, m.finished, m.borrows) == (0, 2, 0)
    assert m.mean_pending_s == pytest.approx(100 / 2)
    assert m.useful_utilisation == pytest.approx((100 + 3 * 50) / (3 * 150))


def test_a_multi_slice_pod_that_no_node_can_hold_is_never_placed():
    m = simulate(
        [node("n0", **{"1g.5gb": 2}), node("n1", **{"1g.5gb": 2})],
        RULES,
        [Job("big", 0, ((G1, 3),), 50)],
        SimPolicy.ON_DEMAND,
    )
    assert (m.never_placed, m.borrows) == (1, 0)


def test_a_multi_type_pod_borrows_per_type_and_a_return_loses_all_its_work():
    # "x" asks for 1g + 2g, for 150 s. At 0 the only 2g (on n1) is taken by "blocker" till 100, so x runs on
    # n0: its 1g exactly, its 2g on the 3g (one step). At 50 "c" asks for that 3g: it takes it back (x back
    # to Pending: 50 s of 1 + 2 compute slices lost); at 100 n1 is free and x runs there on its own types.
    seen: list[dict[str, tuple[str, MigCounts]]] = []

    def observe(_: Snapshot, running: Mapping[str, tuple[str, MigCounts]]) -> None:
        seen.append(dict(running))

    jobs = [Job("a-blocker", 0, ((G2, 1),), 100), Job("b-x", 0, ((G1, 1), (G2, 1)), 150), Job("c", 50, ((G3, 1),), 60)]
    nodes = [node("n0", **{"1g.5gb": 1, "3g.20gb": 1}), node("n1", **{"1g.5gb": 1, "2g.10gb": 1})]
    m = simulate(nodes, AT_ONCE, jobs, SimPolicy.ON_DEMAND, horizon=200, observe=observe)
    assert seen[0]["b-x"] == ("n0", ((G1, 1), (G3, 1)))
    assert seen[-1] == {} and any(running.get("b-x") == ("n1", ((G1, 1), (G2, 1))) for running in seen)
    assert (m.borrows, m.restarts, m.never_placed) == (1, 1, 0)
    assert m.lost_work_slice_hours == pytest.approx(3 * 50 / 3600)
    assert m.mean_pending_s == pytest.approx(50 / 3)  # x waited from 50 to 100
    # Useful within [0, 200]: blocker 2 x 100, x 3 x 100 (its first 50 s thrown away), c 3 x 60, over 7 x 200.
    assert m.useful_utilisation == pytest.approx((2 * 100 + 3 * 100 + 3 * 60) / (7 * 200))
    # Held: x held 1g + 3g (4 slices) on its loan for 50 s, then 1g + 2g (3 slices).
    assert m.held_utilisation == pytest.approx((2 * 100 + 4 * 50 + 3 * 100 + 3 * 60) / (7 * 200))


def test_the_bounds_count_every_slice_a_pod_asks_for():
    # 1 x 1g and 1 x 3g for 100 s; one pod of 2 x 1g for 100 s.
    b = bounds([node("n0", **{"1g.5gb": 1, "3g.20gb": 1})], RULES, [Job("a", 0, ((G1, 2),), 100)], horizon=100)
    assert b.fluid == pytest.approx(200 / 400)
    assert b.static == pytest.approx(100 / 400)  # one of its 1g slices fits the 1g
    assert b.borrowing == pytest.approx(200 / 400)  # the other the 3g, up the chain
    assert b.timed == pytest.approx(200 / 400)  # both slices work from its arrival on: 2 x 100 slice-seconds


# -- the generator -------------------------------------------------------------


def test_the_generator_draws_multi_slice_pods_at_the_asked_for_load():
    spec = WorkloadSpec(mix_a={"2x1g.5gb": 0.5, "1g.5gb+2g.10gb": 0.5}, mix_b={"2x1g.5gb": 1.0}, load=0.8)
    jobs = generate(spec, 700, seed=5)
    assert {job.mig for job in jobs} == {((G1, 2),), ((G1, 1), (G2, 1))}
    demanded = sum(compute_of(job.mig) * job.runtime for job in jobs) / (700 * DAY)
    assert demanded == pytest.approx(0.8, rel=0.1)


def test_a_daily_cycle_and_bursts_shape_the_arrivals_and_keep_the_load():
    spec = WorkloadSpec(
        mix_a={"1g.5gb": 1.0},
        mix_b={"1g.5gb": 1.0},
        load=0.8,
        duration_s=2 * DAY,
        cycle_amplitude=0.6,
        cycle_peak_h=14.0,
        bursts_per_day=4,
        burst_factor=4.0,
        burst_s=1800,
    )
    jobs = generate(spec, 700, seed=2)
    assert jobs == generate(spec, 700, seed=2)
    hour = [0] * 24
    for job in jobs:
        hour[int(job.arrival // 3600) % 24] += 1
    assert sum(hour[12:17]) > 2.5 * (sum(hour[0:5]))  # the afternoon peak against the night
    half_hours = [0] * 96
    for job in jobs:
        half_hours[int(job.arrival // 1800)] += 1
    assert max(half_hours) > 3 * statistics.median(half_hours)  # a burst
    demanded = sum(compute_of(job.mig) * job.runtime for job in jobs) / (700 * spec.duration_s)
    assert demanded == pytest.approx(0.8, rel=0.15)


def _make_traces() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_traces", ROOT / "bench" / "make_traces.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_shipped_traces_are_what_make_traces_generates(tmp_path: Path):
    make_traces = _make_traces()
    assert {path.stem for path in (ROOT / "bench" / "traces").glob("*.csv")} == set(make_traces.TRACES)
    for name, trace in make_traces.TRACES.items():
        write_csv(generate(trace.spec, make_traces.capacity(trace), trace.seed), tmp_path / "t.csv")
        assert (tmp_path / "t.csv").read_bytes() == (ROOT / "bench" / "traces" / f"{name}.csv").read_bytes(), name
