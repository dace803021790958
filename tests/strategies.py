"""Hypothesis strategies for the core's inputs: chains with policies, nodes, pods, snapshots."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

from extender.core.cluster import NodeState, PodRequest, Snapshot
from extender.core.rules import Chain, ChainRules, NamespaceSelector, Policy

A100 = "NVIDIA-A100-SXM4-40GB"
H100 = "NVIDIA-H100-80GB-HBM3"
PRODUCTS = (A100, H100)
# Small, overlapping universes so generated chains share types and collide often.
TYPES = (
    "nvidia.com/mig-1g.5gb",
    "nvidia.com/mig-1g.10gb",
    "nvidia.com/mig-2g.10gb",
    "nvidia.com/mig-2g.20gb",
    "nvidia.com/mig-3g.20gb",
    "nvidia.com/mig-3g.40gb",
    "nvidia.com/mig-4g.40gb",
)
OFF_CHAIN = "nvidia.com/mig-7g.80gb"  # never on a generated chain: may only fit exactly
NAMESPACES = ("default", "team-a", "kube-system")


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    return Policy(
        borrowing=draw(st.booleans() | st.just(True)),
        max_steps=draw(st.none() | st.integers(0, 4)),
        allowed_types=draw(st.none() | st.frozensets(st.sampled_from(TYPES))),
        namespaces=NamespaceSelector(
            include=draw(st.frozensets(st.sampled_from(NAMESPACES), max_size=2)),
            exclude=draw(st.frozensets(st.sampled_from(NAMESPACES), max_size=1)),
        ),
    )


@st.composite
def chain_rules(draw: st.DrawFn) -> ChainRules:
    chains = []
    for index in range(draw(st.integers(1, 3))):
        # A sorted sample of the universe keeps chains ordered smallest first.
        picked = draw(st.lists(st.sampled_from(TYPES), min_size=2, max_size=5, unique=True))
        types = tuple(sorted(picked, key=TYPES.index))
        products = draw(st.frozensets(st.sampled_from(PRODUCTS), min_size=1))
        chains.append(Chain(f"chain-{index}", products, types, draw(policies())))
    return ChainRules(chains)


@st.composite
def nodes(draw: st.DrawFn, name: str) -> NodeState:
    allocatable = draw(st.dictionaries(st.sampled_from((*TYPES, OFF_CHAIN)), st.integers(0, 4), max_size=5))
    used = {t: draw(st.integers(0, n)) for t, n in allocatable.items()}
    return NodeState(
        name=name,
        gpu_product=draw(st.sampled_from((*PRODUCTS, ""))),
        mig_config_state=draw(st.sampled_from((None, "success", "success", "pending"))),
        allocatable=allocatable,
        used=used,
    )


@st.composite
def snapshots(draw: st.DrawFn, min_nodes: int = 1, max_nodes: int = 6) -> Snapshot:
    count = draw(st.integers(min_nodes, max_nodes))
    return Snapshot.of(draw(nodes(f"node-{index}")) for index in range(count))


@st.composite
def pods(draw: st.DrawFn, name: str = "pod") -> PodRequest:
    mig = draw(st.dictionaries(st.sampled_from((*TYPES, OFF_CHAIN)), st.integers(1, 3), min_size=1, max_size=3))
    return PodRequest(
        namespace=draw(st.sampled_from(NAMESPACES)),
        name=name,
        uid=f"uid-{name}",
        mig=tuple(sorted(mig.items())),
        no_borrow=draw(st.sampled_from(("", "", "pod annotation migchain.io/borrow=false"))),
    )


def _paths(node: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Every place in a JSON-like document, as the keys and indexes leading to it."""
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


@st.composite
def one_value_replaced(
    draw: st.DrawFn, document: object, replacements: st.SearchStrategy[object]
) -> tuple[tuple[object, ...], object]:
    """A deep copy of `document` with one value anywhere in it replaced by a drawn one; and where."""
    mutated = copy.deepcopy(document)
    where = draw(st.sampled_from(_paths(mutated)[1:]))
    parent: Any = mutated
    for step in where[:-1]:
        parent = parent[step]
    parent[where[-1]] = draw(replacements)
    return where, mutated
