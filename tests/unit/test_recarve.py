"""The re-carve planner: scenarios (balanced fleet flooded with 1g.5gb) and properties (valid, idle only, limits)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from extender.config import load_rules
from extender.core.cluster import Demand, NodeState, PodRequest, Snapshot
from extender.core.constraints import NodeConstraints, Taint
from extender.core.geometry import MODELS, fits_gpu, maximal_layouts, model_of, valid_layouts
from extender.core.mig import MIG_RESOURCE_PREFIX, short_name
from extender.core.recarve import (
    GPU_COUNT_LABEL,
    HOUR,
    RECARVING_TAINT,
    CarvableNode,
    RecarvePolicy,
    carvable_node,
    cooling,
    plan_drains,
    plan_recarves,
    spare_slices,
    unmet_demand,
)

ROOT = Path(__file__).resolve().parents[2]
A100 = "NVIDIA-A100-SXM4-40GB"
G1, G2, G3, G7 = (MIG_RESOURCE_PREFIX + p for p in ("1g.5gb", "2g.10gb", "3g.20gb", "7g.40gb"))
BALANCED = {G1: 2, G2: 1, G3: 1}
POLICY = RecarvePolicy()


def balanced(name: str, **changes: Any) -> CarvableNode:
    return dataclasses.replace(CarvableNode(name, A100, 8, BALANCED, idle=True), **changes)


def test_a_flood_of_1g_re_carves_one_idle_node_to_all_1g():
    plan = plan_recarves([balanced("n0"), balanced("n1")], {G1: 40}, now=10_000, policy=POLICY)
    assert len(plan) == 1  # max_in_flight 1
    assert plan[0].node == "n0"
    assert plan[0].layout == {G1: 7}
    assert plan[0].serves == {G1: 40}
    assert "n0" in plan[0].reason and "1g.5gb" in plan[0].reason


def test_more_in_flight_re_carves_as_many_nodes_as_the_demand_needs():
    policy = RecarvePolicy(max_in_flight=5)
    plan = plan_recarves([balanced(f"n{i}") for i in range(5)], {G1: 60}, now=10_000, policy=policy)
    # all-1g adds 40 on the first node; the 20 left are better served by 4 x 1g + 1 x 3g (16 more, keeping the
    # 3g) than by taking more away; the last 4 are too few to pay for a third node (hysteresis).
    assert [(r.node, r.layout) for r in plan] == [("n0", {G1: 7}), ("n1", {G1: 4, G3: 1})]
    assert [r.serves[G1] for r in plan] == [40, 16]


def test_a_small_demand_keeps_the_other_types():
    # 16 x 1g unmet on 8 GPUs: a layout that adds two 1g per GPU and keeps the 3g beats all-1g.
    plan = plan_recarves([balanced("n0")], {G1: 16}, now=10_000, policy=POLICY)
    assert len(plan) == 1
    assert plan[0].layout[G1] < 7
    assert plan[0].layout.get(G3, 0) == 1


def test_hysteresis_a_trickle_of_demand_re_carves_nothing():
    assert plan_recarves([balanced("n0")], {G1: 2}, now=10_000, policy=POLICY) == ()


def test_busy_in_flight_cooling_and_rate_limited_nodes_are_left_alone():
    nodes = [
        balanced("busy", idle=False),
        balanced("cooling", recarved_at=(9_000.0,)),
        balanced("hourly", recarved_at=(7_000.0, 8_100.0)),
    ]
    assert plan_recarves(nodes, {G1: 40}, now=10_000, policy=RecarvePolicy(cooldown_seconds=1800, max_per_hour=2)) == ()
    # a node in flight uses up the fleet-wide budget
    assert plan_recarves([balanced("a", in_flight=True), balanced("b")], {G1: 40}, 10_000, POLICY) == ()


def test_unknown_products_odd_layouts_and_hostile_demand_are_skipped():
    nodes = [
        CarvableNode("unknown", "NVIDIA-X", 8, BALANCED, idle=True),
        CarvableNode("empty", A100, 8, {}, idle=True),  # MIG off or mid-change: never a mode change
        CarvableNode("overfull", A100, 8, {G1: 8}, idle=True),
        CarvableNode("foreign", A100, 8, {"nvidia.com/mig-1g.10gb": 7}, idle=True),
    ]
    assert plan_recarves(nodes, {G1: 40, "cpu": 3, G2: -4, "nvidia.com/mig-bogus": 2}, 10_000, POLICY) == ()


def test_every_maximal_layout_is_valid_and_named_layouts_are_among_the_valid_ones():
    for model in MODELS:
        valid = [dict(layout) for layout in valid_layouts(model)]
        assert all(fits_gpu(model, layout) for layout in valid)
        for layout in model.layouts.values():
            assert dict(layout) in valid
        assert set(map(str, maximal_layouts(model))) <= set(map(str, valid))
    assert len(maximal_layouts(model_of(A100))) > len(model_of(A100).layouts)


def test_cooling_reasons():
    node = balanced("n", recarved_at=(100.0,))
    assert "cooling down" in cooling(node, 200.0, POLICY)
    assert cooling(node, 100.0 + POLICY.cooldown_seconds, POLICY) == ""


# --- properties ---

PRODUCTS = [model.products[0] for model in MODELS]


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[CarvableNode], dict[str, int], float, RecarvePolicy]:
    now = draw(st.floats(0, 20_000))
    nodes = []
    for index in range(draw(st.integers(0, 6))):
        model = model_of(draw(st.sampled_from(PRODUCTS)))
        layout = {MIG_RESOURCE_PREFIX + p: n for p, n in draw(st.sampled_from(valid_layouts(model))).items()}
        gpus = draw(st.integers(1, 8))
        idle = draw(st.booleans())
        nodes.append(
            CarvableNode(
                f"n{index}",
                model.products[0],
                gpus,
                layout,
                idle=idle,
                recarved_at=tuple(draw(st.lists(st.floats(0, now), max_size=3))),
                in_flight=draw(st.booleans()),
                draining=draw(st.booleans()),
                held={} if idle else {r: draw(st.integers(0, n * gpus)) for r, n in layout.items()},
            )
        )
    profiles = sorted({p for model in MODELS for layout in model.layouts.values() for p in layout})
    unmet = draw(st.dictionaries(st.sampled_from(profiles).map(lambda p: MIG_RESOURCE_PREFIX + p), st.integers(-2, 80)))
    policy = RecarvePolicy(
        cooldown_seconds=draw(st.floats(0, 4_000)),
        max_per_hour=draw(st.integers(0, 3)),
        max_in_flight=draw(st.integers(0, 4)),
        drain=draw(st.booleans()),
    )
    return nodes, unmet, now, policy


@given(fleets())
def test_planned_layouts_are_valid_and_only_idle_nodes_within_limits_are_planned(
    case: tuple[list[CarvableNode], dict[str, int], float, RecarvePolicy],
) -> None:
    nodes, unmet, now, policy = case
    plan = plan_recarves(nodes, unmet, now, policy)
    by_name = {node.name: node for node in nodes}
    assert len({r.node for r in plan}) == len(plan)
    assert len(plan) <= max(0, policy.max_in_flight - sum(node.in_flight for node in nodes))
    for recarve in plan:
        node = by_name[recarve.node]
        model = model_of(node.product)
        # valid for its own model, never empty (no mode change), never the layout it has
        profiles = {short_name(r): n for r, n in recarve.layout.items()}
        assert profiles and fits_gpu(model, profiles)
        assert dict(recarve.layout) != dict(node.layout)
        # a busy node (slices in use) or one being re-carved never appears
        assert node.idle and not node.in_flight
        # cool-down and the hourly limit hold
        assert not node.recarved_at or now - max(node.recarved_at) >= policy.cooldown_seconds
        assert sum(1 for at in node.recarved_at if now - at < HOUR) < policy.max_per_hour
        # it serves only what was asked, and only with slices it adds
        for resource, count in recarve.serves.items():
            assert 0 < count <= unmet[resource]
            assert count <= node.gpus * (recarve.layout.get(resource, 0) - node.layout.get(resource, 0))
    # together the plan serves no type more than its unmet demand
    for resource in unmet:
        assert sum(r.serves.get(resource, 0) for r in plan) <= max(0, unmet[resource])


@given(fleets())
def test_the_plan_is_a_function_of_its_inputs_whatever_the_node_order(
    case: tuple[list[CarvableNode], dict[str, int], float, RecarvePolicy],
) -> None:
    nodes, unmet, now, policy = case
    first = plan_recarves(nodes, unmet, now, policy)
    assert plan_recarves(list(reversed(nodes)), dict(reversed(list(unmet.items()))), now, policy) == first


def test_drains_pick_the_least_held_busy_node_and_keep_those_draining_already():
    policy = RecarvePolicy(drain=True)
    nodes = [
        balanced("full", idle=False, held={G1: 16, G2: 8, G3: 8}),
        balanced("light", idle=False, held={G3: 1}),
    ]
    assert plan_drains(nodes, {G1: 40}, 10_000, RecarvePolicy()) == ()  # off unless the policy asks
    (drain,) = plan_drains(nodes, {G1: 40}, 10_000, policy)
    assert (drain.node, drain.serves) == ("light", {G1: 40})
    nodes[0] = dataclasses.replace(nodes[0], draining=True)
    assert [d.node for d in plan_drains(nodes, {G1: 40}, 10_000, policy)] == ["full"]
    # once drained, the node is re-carved before an idle one that serves as much
    drained = [dataclasses.replace(nodes[0], idle=True, held={}), balanced("a-idle")]
    assert [r.node for r in plan_recarves(drained, {G1: 40}, 10_000, policy)] == ["full"]


def test_carvable_node_reads_gpus_from_the_label_and_refuses_what_it_cannot_split():
    node = NodeState("n", A100, "success", {G1: 16, G2: 8, G3: 8}, labels={GPU_COUNT_LABEL: "8"})
    carvable = carvable_node(node, idle=True)
    assert carvable is not None and (carvable.gpus, carvable.layout) == (8, BALANCED)
    assert carvable_node(dataclasses.replace(node, labels={}), idle=True) is None
    assert carvable_node(dataclasses.replace(node, labels={GPU_COUNT_LABEL: "x8"}), idle=True) is None
    assert carvable_node(dataclasses.replace(node, labels={GPU_COUNT_LABEL: "3"}), idle=True) is None
    for odd in ("\u0668", "8" * 400, "-8", "0"):  # an Arabic-Indic 8, too long, negative, none
        assert carvable_node(dataclasses.replace(node, labels={GPU_COUNT_LABEL: odd}), idle=True) is None


def test_unmet_demand_counts_only_sustained_pods_that_fit_nowhere_even_by_borrowing():
    rules = load_rules([ROOT / "chains" / "a100-40gb.yaml"])
    full = NodeState("n", A100, "success", {G1: 1, G2: 1}, {G1: 1}, labels={GPU_COUNT_LABEL: "1"})
    snapshot = Snapshot.of([full])
    one_g = PodRequest("d", "a", "a", ((G1, 1),))
    three_g = PodRequest("d", "b", "b", ((G3, 1),))
    fresh = PodRequest("d", "c", "c", ((G3, 2),))
    waited = {"d/a": 400.0, "d/b": 400.0, "d/c": 10.0}
    # the 1g pod may borrow the free 2g: not unmet; the 3g pod fits nowhere; the fresh one has not waited enough
    assert unmet_demand(snapshot, [one_g, three_g, fresh], rules, waited, POLICY) == {G3: 1}
    # A pod the chain's policy does not let borrow (kube-system is excluded) fits nowhere, whatever a pod alike
    # in another namespace may do.
    system = PodRequest("kube-system", "s", "s", ((G1, 1),))
    waited["kube-system/s"] = 400.0
    assert unmet_demand(snapshot, [one_g, system], rules, waited, POLICY) == {G1: 1}


def test_unmet_demand_counts_only_pods_that_may_run_on_a_node_it_may_re_carve():
    rules = load_rules([ROOT / "chains" / "a100-40gb.yaml"])
    pool = {"pool": "a"}
    opted = NodeState("opted", A100, "success", {G1: 1}, {G1: 1}, labels={GPU_COUNT_LABEL: "1", **pool})
    snapshot = Snapshot.of([opted])
    anywhere = PodRequest("d", "a", "a", ((G1, 1),))
    elsewhere = PodRequest("d", "b", "b", ((G1, 1),), constraints=NodeConstraints(selector=(("pool", "b"),)))
    waited = {"d/a": 400.0, "d/b": 400.0}
    # Pinned to a pool with no node migchain may re-carve: no re-carve of `opted` can serve it.
    assert unmet_demand(snapshot, [anywhere, elsewhere], rules, waited, POLICY, carvable=[opted]) == {G1: 1}
    # The re-carve taint of a node being drained or re-carved keeps nobody's demand from it: it is the re-carver's.
    tainted = dataclasses.replace(opted, taints=(Taint(RECARVING_TAINT, "x", "NoSchedule"),))
    assert unmet_demand(snapshot, [anywhere], rules, waited, POLICY, carvable=[tainted]) == {G1: 1}
    assert unmet_demand(snapshot, [anywhere], rules, waited, POLICY, carvable=[]) == {}


@given(fleets())
def test_drains_are_valid_busy_nodes_within_the_limits(
    case: tuple[list[CarvableNode], dict[str, int], float, RecarvePolicy],
) -> None:
    nodes, unmet, now, policy = case
    drains = plan_drains(nodes, unmet, now, policy)
    by_name = {node.name: node for node in nodes}
    assert policy.drain or not drains
    assert len(drains) <= max(0, policy.max_in_flight - sum(node.in_flight for node in nodes))
    for drain in drains:
        node = by_name[drain.node]
        assert not node.idle and not node.in_flight and not cooling(node, now, policy)
        assert fits_gpu(model_of(node.product), {short_name(r): n for r, n in drain.layout.items()})
    for resource in unmet:
        assert sum(d.serves.get(resource, 0) for d in drains) <= max(0, unmet[resource])
    assert plan_drains(list(reversed(nodes)), unmet, now, policy) == drains


def test_types_pods_wait_for_now_are_not_taken_away_cheaply():
    # With eight 2g.10gb slices asked for by pods waiting (not yet sustained), all-1g would take the node's eight
    # 2g away at their full worth: the plan keeps a 2g per GPU instead. One waiting pod is not worth that much.
    (plan,) = plan_recarves([balanced("n0")], {G1: 40}, 10_000, POLICY, waiting={G2: 8, G1: 40})
    assert plan.layout == {G1: 5, G2: 1}
    (plain,) = plan_recarves([balanced("n0")], {G1: 40}, 10_000, POLICY, waiting={G2: 1})
    assert plain.layout == {G1: 7}


def test_a_re_carve_takes_no_slice_of_a_type_its_own_pods_are_about_to_ask_for():
    # 2g.10gb pods asked for 5 slices lately and 8 are free: only 3 are spare, and every layout without 2g takes 8.
    # The plan keeps one 2g per GPU and takes the 3g, of which 8 are spare.
    (plan,) = plan_recarves([balanced("n0")], {G1: 40}, 10_000, POLICY, spare={G2: 3, G3: 8})
    assert plan.layout == {G1: 5, G2: 1}
    # with nothing spare of either, no re-carve at all; without the forecast, all-1g as before
    assert plan_recarves([balanced("n0")], {G1: 40}, 10_000, POLICY, spare={}) == ()
    assert [r.layout for r in plan_recarves([balanced("n0")], {G1: 40}, 10_000, POLICY)] == [{G1: 7}]


def test_spare_slices_are_the_free_and_lent_ones_beyond_recent_arrivals_and_pending_pods():
    # 8 x 2g free on n, and the one in use on m is lent to a borrower (a return gives it back); 2g pods asked for 3
    # in the last half hour (an older bucket is out of the window) and one pending asks for 2 more: 9 - 3 - 2 = 4
    # spare. 3g: 8 free, nobody asked: 8 spare. 1g: far more asked than there are.
    nodes = [
        NodeState("n", A100, "success", {G1: 16, G2: 8, G3: 8}, labels={GPU_COUNT_LABEL: "8"}),
        NodeState("m", A100, "success", {G2: 1}, {G2: 1}, labels={GPU_COUNT_LABEL: "1"}),
    ]
    demand = Demand(10_000.0, {(9_000, G2): 3, (8_000, G2): 50, (9_990, G1): 100})
    snapshot = Snapshot({node.name: node for node in nodes}, demand=demand)
    pending = [PodRequest("d", "a", "a", ((G2, 2),))]
    policy = RecarvePolicy(forecast_seconds=1800)
    assert spare_slices(snapshot, pending, [((G2, 1),)], policy) == {G1: 16 - 100, G2: 4, G3: 8}
    assert spare_slices(snapshot, pending, [], policy) == {G1: 16 - 100, G2: 3, G3: 8}  # the used one, not lent
    assert spare_slices(snapshot, pending, [], RecarvePolicy(forecast_seconds=0)) is None


@given(fleets(), st.dictionaries(st.sampled_from([G1, G2, G3, G7]), st.integers(-8, 64)))
def test_no_plan_takes_more_of_a_type_than_is_spare(
    case: tuple[list[CarvableNode], dict[str, int], float, RecarvePolicy], spare: dict[str, int]
) -> None:
    nodes, unmet, now, policy = case
    by_name = {node.name: node for node in nodes}
    for plan in (
        plan_recarves(nodes, unmet, now, policy, spare=spare),
        plan_drains(nodes, unmet, now, policy, spare=spare),
    ):
        left = dict(spare)
        for recarve in plan:  # in plan order: slices a re-carve adds are free for the next one
            node = by_name[recarve.node]
            for resource in set(node.layout) | set(recarve.layout):
                change = node.gpus * (recarve.layout.get(resource, 0) - node.layout.get(resource, 0))
                assert change >= 0 or -change <= left.get(resource, 0)
                left[resource] = left.get(resource, 0) + change
    # a spare large enough for everything changes nothing
    plenty = {resource: 10**6 for node in nodes for resource in node.layout}
    assert plan_recarves(nodes, unmet, now, policy, spare=plenty) == plan_recarves(nodes, unmet, now, policy)


def test_a_drain_starts_only_with_room_for_twice_what_it_takes_and_goes_on_with_room_for_it():
    policy = RecarvePolicy(drain=True)
    busy = balanced("n0", idle=False, held={G3: 1})
    assert plan_drains([busy], {G1: 40}, 10_000, policy, spare={G2: 8, G3: 8}) == ()
    (going_on,) = plan_drains(
        [dataclasses.replace(busy, draining=True)], {G1: 40}, 10_000, policy, spare={G2: 8, G3: 8}
    )
    assert going_on.layout == {G1: 7}
    (started,) = plan_drains([busy], {G1: 40}, 10_000, policy, spare={G2: 16, G3: 16})
    assert started.layout == {G1: 7}
