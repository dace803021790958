"""Claims end as soon as the returned pod is back, never later: by name for bare pods, by owner for owned ones."""

from __future__ import annotations

from extender.core.claims import Claim, claim_for, open_claims
from extender.core.cluster import PodRecord, PodRequest

G1 = "nvidia.com/mig-1g.5gb"
G2 = "nvidia.com/mig-2g.10gb"


def record(name: str, uid: str, node: str = "", *, owner: str = "", replaces: str = "", mig: str = G1) -> PodRecord:
    return PodRecord(PodRequest("ml", name, uid, ((mig, 1),)), node, False, replaces, owner=owner)


# A ReplicaSet with two replicas: b1 borrowed (and is returned), s1 fits exactly, p1 is pending.
B1 = record("web-b1", "uid-b1", "gpu-a", owner="rs", replaces="uid-old", mig=G2)
SIBLINGS = [B1, record("web-s1", "uid-s1", "gpu-a", owner="rs"), record("web-p1", "uid-p1", owner="rs")]
OTHERS = [record("db-x", "uid-x", "gpu-a", owner="other-rs"), record("bare", "uid-bare", "gpu-a")]


def returned_b1() -> list[Claim]:
    return [claim_for(B1, "gpu-a", ((G1, 1),), [*SIBLINGS, *OTHERS], until=30.0)]


def test_an_owned_pods_claim_holds_until_its_controllers_new_pod_shows_up_pending():
    claims = returned_b1()
    after_eviction = [r for r in SIBLINGS if r is not B1] + OTHERS
    assert open_claims(claims, after_eviction, now=1.0) == claims
    successor = record("web-n1", "uid-n1", owner="rs")
    assert open_claims(claims, [*after_eviction, successor], now=1.0) == []


def test_an_owned_pods_claim_ends_when_its_successor_shows_up_already_bound_or_borrowing():
    claims = returned_b1()
    assert open_claims(claims, [*SIBLINGS, record("web-n1", "uid-n1", "gpu-a", owner="rs")], now=1.0) == []
    borrowed = record("web-n1-x", "uid-n1b", "gpu-b", owner="rs", replaces="uid-n1", mig=G2)
    assert open_claims(claims, [*SIBLINGS, borrowed], now=1.0) == []


def test_a_sibling_that_borrows_meanwhile_or_another_owners_pod_is_not_the_successor():
    claims = returned_b1()
    sibling_borrowed = record("web-p1-x", "uid-p1b", "gpu-b", owner="rs", replaces="uid-p1", mig=G2)
    stranger = record("db-y", "uid-y", owner="other-rs")
    same_name_elsewhere = record("web-b1", "uid-b1-again", owner="")
    assert open_claims(claims, [*SIBLINGS, sibling_borrowed, stranger, same_name_elsewhere], now=1.0) == claims


def test_a_bare_pods_claim_ends_when_its_name_has_a_new_uid():
    bare = record("notebook", "uid-nb", "gpu-a", replaces="uid-nb-old", mig=G2)
    claims = [claim_for(bare, "gpu-a", ((G1, 1),), [bare, *OTHERS], until=30.0)]
    assert open_claims(claims, [bare, *OTHERS], now=1.0) == claims  # still the borrower
    assert open_claims(claims, OTHERS, now=1.0) == claims  # evicted, not recreated yet
    assert open_claims(claims, [*OTHERS, record("notebook", "uid-nb-new")], now=1.0) == []


def test_a_claim_whose_pod_never_comes_back_ends_in_time():
    claims = returned_b1()
    assert open_claims(claims, SIBLINGS, now=29.9) == claims
    assert open_claims(claims, SIBLINGS, now=30.0) == []
