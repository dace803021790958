"""The re-carve planner: scenarios (balanced fleet flooded with 1g.5gb) and properties (valid, idle only, limits)."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from extender.core.geometry import MODELS, fits_gpu, maximal_layouts, model_of, valid_layouts
from extender.core.mig import MIG_RESOURCE_PREFIX, short_name
from extender.core.recarve import HOUR, CarvableNode, RecarvePolicy, cooling, plan_recarves

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
    # 40 extra 1g per node: two nodes serve 60; a third would serve nothing.
    assert [r.node for r in plan] == ["n0", "n1"]
    assert sum(r.serves[G1] for r in plan) == 60


def test_a_small_demand_keeps_the_other_types():
    # 8 x 1g unmet: a layout that adds a little 1g and keeps 3g beats all-1g.
    plan = plan_recarves([balanced("n0")], {G1: 8}, now=10_000, policy=POLICY)
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
        layout = draw(st.sampled_from(valid_layouts(model)))
        nodes.append(
            CarvableNode(
                f"n{index}",
                model.products[0],
                draw(st.integers(1, 8)),
                {MIG_RESOURCE_PREFIX + p: n for p, n in layout.items()},
                idle=draw(st.booleans()),
                recarved_at=tuple(draw(st.lists(st.floats(0, now), max_size=3))),
                in_flight=draw(st.booleans()),
            )
        )
    profiles = sorted({p for model in MODELS for layout in model.layouts.values() for p in layout})
    unmet = draw(st.dictionaries(st.sampled_from(profiles).map(lambda p: MIG_RESOURCE_PREFIX + p), st.integers(-2, 80)))
    policy = RecarvePolicy(
        cooldown_seconds=draw(st.floats(0, 4_000)),
        max_per_hour=draw(st.integers(0, 3)),
        max_in_flight=draw(st.integers(0, 4)),
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
