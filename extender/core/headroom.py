"""Headroom: slices of a type kept free for the pods that ask for it; pure functions, no I/O.

A loan ends when its borrower finishes or when the slice is taken back, which
restarts the borrower. Lending every free slice of a type leaves the next pod
that asks for it two choices, both bad: wait for some loan to end, or take a
slice back. So a type is lent only while more of its slices are free,
fleet-wide, than its own pods asked for in the last `headroomSeconds` of the
chain that would lend it, and never more than half its slices are kept so:
the recent arrivals of a type are the best guess of the next ones, and a
burst of requests, real or not, holds back at most half a type. On the
simulator's traces this (with reclaimAfterSeconds 120) cut restarts to 0.5 to
8 % of eager's, every type's mean pending time within 0.7 minutes of what the
plain mixed strategy gives it (docs/simulator-and-performance.md).

Only lending is limited: a pod that asks for the type itself takes any free
slice of it, and a pod that must borrow still borrows the next type up the
chain that is not kept free.
"""

from __future__ import annotations

from extender.core.cluster import Snapshot
from extender.core.rules import ChainRules


def kept_free(snapshot: Snapshot, rules: ChainRules) -> frozenset[tuple[str, str]]:
    """The (chain, type) pairs no borrow may take in this view of the cluster: types of which no more slices are
    free than their pods asked for in the chain's last headroomSeconds (never more than half a type's slices)."""
    memo = snapshot.memo.get("kept_free")
    if memo is not None and memo[0] is rules:
        return memo[1]  # type: ignore[no-any-return]
    kept: set[tuple[str, str]] = set()
    asked_within: dict[int, dict[str, int]] = {}
    fleet = snapshot.fleet_slices() if any(chain.policy.headroom_seconds for chain in rules.chains) else {}
    for chain in rules.chains:
        seconds = chain.policy.headroom_seconds
        if not seconds or not chain.policy.borrowing:
            continue
        asked = asked_within.get(seconds)
        if asked is None:
            asked = asked_within[seconds] = snapshot.demand.since(seconds)
        for resource in chain.types[1:]:
            free, allocatable = fleet.get(resource, (0, 0))
            if free and free <= min(asked.get(resource, 0), allocatable // 2):
                kept.add((chain.name, resource))
    answer = frozenset(kept)
    snapshot.memo["kept_free"] = (rules, answer)
    return answer


def lending_rules(snapshot: Snapshot, rules: ChainRules) -> ChainRules:
    """`rules` as they stand in this view: the types kept free lent by no chain."""
    return rules.keeping_free(kept_free(snapshot, rules))
