"""When migchain renews its certificates and rotates its CA: a plan from expiry dates and now; no I/O, no clock.

migchain's CA signs two leaves: the extender's serving certificate and
kube-scheduler's client certificate. Both ends trust a bundle of CAs. A leaf
is renewed `leaf_renew_before` ahead of its expiry, so the one in use stays
valid while the new one reaches its reader. The CA is rotated with an overlap:
a new CA first joins the bundle without signing; it signs only once the bundle
has had `settle` to reach every reader and kube-scheduler (which reads its
CA file only at start) runs with it; the old CA leaves the bundle once every
leaf has been signed by the new one for `settle`. At no step does a reader
meet a certificate that its bundle cannot verify.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class RenewalPolicy:
    leaf_life: datetime.timedelta = 90 * DAY
    # A third of the life: a renewal that fails (API down, CronJob suspended)
    # is retried for weeks before anything expires.
    leaf_renew_before: datetime.timedelta = 30 * DAY
    ca_life: datetime.timedelta = 5 * 365 * DAY
    # Longer than a leaf's life: the rotation ends before a leaf would have
    # to outlive the CA that signed it.
    ca_renew_before: datetime.timedelta = 180 * DAY
    # How long a changed bundle or a new leaf is given to reach its readers
    # (kubelet refreshes mounted Secrets within a minute or two).
    settle: datetime.timedelta = datetime.timedelta(hours=1)

    def problems(self) -> list[str]:
        """Why these durations cannot work together; empty when they can."""
        found = []
        if not datetime.timedelta(0) < self.leaf_renew_before < self.leaf_life:
            found.append("the leaf renewal window must be shorter than a leaf's life (else every run renews)")
        if not datetime.timedelta(0) < self.ca_renew_before < self.ca_life:
            found.append("the CA renewal window must be shorter than the CA's life")
        if self.ca_renew_before <= self.leaf_life + self.settle:
            found.append("the CA renewal window must be longer than a leaf's life (and the settle time)")
        if self.settle < datetime.timedelta(0):
            found.append("the settle time cannot be negative")
        return found


@dataclass(frozen=True)
class Authority:
    """A CA of the trust bundle."""

    id: str  # its fingerprint
    not_after: datetime.datetime


@dataclass(frozen=True)
class Leaf:
    """A serving or client certificate as stored."""

    issuer: str  # id of the bundle's CA whose signature it bears; "" when none of them
    issued: datetime.datetime
    not_after: datetime.datetime
    as_wanted: bool  # its key matches, its names and usages are those that would be issued now


@dataclass(frozen=True)
class CertState:
    """What is stored now. `signer` and `next` are ids of CAs in `trusted` whose keys are kept."""

    trusted: tuple[Authority, ...]
    leaves: Mapping[str, Leaf | None]  # by name; None when missing or unreadable
    signer: str = ""  # the CA that issues leaves
    next: str = ""  # a CA in the bundle that does not sign yet
    bundle_changed: datetime.datetime | None = None
    # kube-scheduler runs with the current bundle (it reads its CA file only at start)
    bundle_loaded: bool = True


NewCa = Literal["", "signer", "next"]


@dataclass(frozen=True)
class RenewalPlan:
    """What to change, in this order: make a CA, promote `next`, issue leaves, drop CAs from the bundle."""

    new_ca: NewCa = ""  # "signer": a new CA signs at once (install, recovery); "next": it joins the bundle only
    promote: bool = False  # the next CA becomes the signer (the old signer's key is dropped)
    reissue: tuple[str, ...] = ()  # leaves to issue from the signer as it is after the above
    retire: tuple[str, ...] = ()  # CA ids that leave the bundle
    reasons: tuple[str, ...] = field(default=(), compare=False)  # one line per change or wait, for the log

    @property
    def changes(self) -> bool:
        return bool(self.new_ca or self.promote or self.reissue or self.retire)


def plan_renewal(state: CertState, now: datetime.datetime, policy: RenewalPolicy) -> RenewalPlan:
    """What to renew now. Idempotent: planning again on the state this plan produces changes nothing."""
    reasons: list[str] = []
    valid = {authority.id: authority for authority in state.trusted if authority.not_after > now}
    signer = valid.get(state.signer)
    upcoming = valid.get(state.next)
    new_ca: NewCa = ""
    promote = False

    if not valid:
        new_ca = "signer"
        reasons.append(
            "every CA of the bundle has expired: a new CA signs at once (kube-scheduler must restart to trust it)"
            if state.trusted
            else "no CA yet: a new CA signs at once"
        )
    elif upcoming is not None:
        settles = state.bundle_changed + policy.settle if state.bundle_changed else now
        if now >= settles and state.bundle_loaded:
            promote = True
            reasons.append(f"the new CA {_short(upcoming.id)} has reached every reader: it signs from now on")
        else:
            waiting = "kube-scheduler to restart with the new bundle" if not state.bundle_loaded else _when(settles)
            reasons.append(f"the new CA {_short(upcoming.id)} is in the bundle; it signs once it settles ({waiting})")
    elif signer is None:
        new_ca = "next"
        reasons.append("no CA key is kept (certificates of an older migchain): a new CA joins the bundle")
    elif now >= signer.not_after - policy.ca_renew_before:
        new_ca = "next"
        reasons.append(f"the CA {_short(signer.id)} expires {_when(signer.not_after)}: a new CA joins the bundle")

    issuer = "" if new_ca == "signer" else (upcoming.id if promote and upcoming else signer.id if signer else "")
    reissue = []
    blocked = False  # a leaf must be issued but no CA may sign yet
    for name, leaf in sorted(state.leaves.items()):
        problem = _leaf_problem(leaf, issuer, now, policy, signing=new_ca == "signer" or bool(issuer))
        if problem:
            reissue.append(name)
            reasons.append(f"{name}: {problem}")
            blocked = blocked or not (new_ca == "signer" or issuer)
    if blocked:
        # No CA with a key is settled in the bundle: sign with a new one at
        # once. The old bundle's readers refuse it until they reload: there
        # is no certificate left to keep them going anyway.
        new_ca, promote = "signer", False
        reissue = sorted(state.leaves)
        reasons.append("a certificate is needed and no kept CA may sign it: a new CA signs at once")

    keep = {state.next} if new_ca == "" and not promote else set()
    keep |= {issuer} if issuer and new_ca != "signer" else set()
    retire = []
    for authority in state.trusted:
        if authority.id in keep:
            continue
        if authority.not_after <= now:
            retire.append(authority.id)
            reasons.append(f"the CA {_short(authority.id)} has expired: it leaves the bundle")
        elif new_ca == "" and not promote and not reissue and _all_settled_under(state, issuer, now, policy):
            retire.append(authority.id)
            reasons.append(f"the CA {_short(authority.id)} signs no certificate in use: it leaves the bundle")
    return RenewalPlan(new_ca, promote, tuple(reissue), tuple(retire), tuple(reasons))


def _leaf_problem(leaf: Leaf | None, issuer: str, now: datetime.datetime, policy: RenewalPolicy, signing: bool) -> str:
    """Why this leaf must be issued again; "" when it may stay."""
    if leaf is None:
        return "missing or unreadable"
    if not leaf.as_wanted:
        return "its key, names or usages are not those wanted"
    if now >= leaf.not_after - policy.leaf_renew_before:
        return f"expires {_when(leaf.not_after)}, within the renewal window"
    if signing and leaf.issuer != issuer:
        return "signed by a CA that no longer signs"
    return ""


def _all_settled_under(state: CertState, issuer: str, now: datetime.datetime, policy: RenewalPolicy) -> bool:
    """Every leaf is signed by `issuer` and has had time to reach its reader."""
    return bool(issuer) and all(
        leaf is not None and leaf.issuer == issuer and now - leaf.issued >= policy.settle
        for leaf in state.leaves.values()
    )


def _short(fingerprint: str) -> str:
    return fingerprint[:12]


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
