"""Claims: the slices a returned pod comes back to, held for it until the cache shows it again; pure.

A return evicts a borrower, and the pod comes back asking for its original
request: a bare pod recreated under its name, an owned pod as its controller's
new pod, under a new name. Until the cache shows that pod nothing counts the
slices it will take, and the next round could plan another return onto them.
Once the cache shows it, pending or bound, the return planner counts it: the
claim must end then, or those slices are counted twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from extender.core.cluster import MigCounts, PodRecord


@dataclass(frozen=True)
class Claim:
    """`slices` on `node`, held for the pod that returned borrower `key` (UID `uid`) becomes, until `until`."""

    key: str
    uid: str
    node: str
    slices: MigCounts
    until: float
    owner: str = ""  # the borrower's controller UID; "" for a bare pod
    # The owner's pods when the borrower was returned, the borrower among them:
    # none of them is the controller's new pod, nor is a borrower replacing one.
    siblings: frozenset[str] = frozenset()


def claim_for(borrower: PodRecord, node: str, slices: MigCounts, records: Iterable[PodRecord], until: float) -> Claim:
    """The claim of a borrower just returned to `node`; `records` are the pods the cache showed before the return."""
    siblings = {borrower.request.uid}
    if borrower.owner:
        siblings.update(record.request.uid for record in records if record.owner == borrower.owner)
    return Claim(borrower.request.key, borrower.request.uid, node, slices, until, borrower.owner, frozenset(siblings))


def open_claims(claims: Iterable[Claim], records: Iterable[PodRecord], now: float) -> list[Claim]:
    """The claims still to hold: not expired, and their pod not back in `records` yet.

    A bare pod is back when a pod of its name has another UID. An owned pod is
    back when its controller has a pod that is neither one of its siblings nor
    a borrower replacing one of them (a sibling that borrowed in the meantime).
    """
    claims = [claim for claim in claims if claim.until > now]
    if not claims:
        return []
    owners = {claim.owner for claim in claims if claim.owner}
    names = {claim.key for claim in claims if not claim.owner}
    uid_by_name: dict[str, str] = {}
    pods_by_owner: dict[str, list[PodRecord]] = {}
    for record in records:
        if record.owner in owners:
            pods_by_owner.setdefault(record.owner, []).append(record)
        if record.request.key in names:
            uid_by_name[record.request.key] = record.request.uid
    return [claim for claim in claims if not _back(claim, uid_by_name, pods_by_owner)]


def _back(claim: Claim, uid_by_name: Mapping[str, str], pods_by_owner: Mapping[str, list[PodRecord]]) -> bool:
    if not claim.owner:
        return uid_by_name.get(claim.key, claim.uid) != claim.uid
    return any(
        record.request.uid not in claim.siblings and record.replaces not in claim.siblings
        for record in pods_by_owner.get(claim.owner, ())
    )
