"""The renewal planner (extender/core/renewal.py): what is renewed when, and a timeline of years with no outage."""

from __future__ import annotations

import bisect
import datetime
import itertools
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extender.core.renewal import Authority, CertState, Leaf, RenewalPlan, RenewalPolicy, plan_renewal

POLICY = RenewalPolicy()
DAY = datetime.timedelta(days=1)
HOUR = datetime.timedelta(hours=1)
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
LEAVES = ("client", "serving")


def leaf(issuer: str, issued: datetime.datetime, life: datetime.timedelta = POLICY.leaf_life, **changes) -> Leaf:
    return replace(Leaf(issuer, issued, issued + life, as_wanted=True), **changes)


def steady(now: datetime.datetime = T0, issued: datetime.datetime = T0) -> CertState:
    """One CA signing both leaves, issued at `issued`."""
    return CertState(
        trusted=(Authority("ca1", T0 + POLICY.ca_life),),
        leaves={name: leaf("ca1", issued) for name in LEAVES},
        signer="ca1",
        bundle_changed=T0,
    )


# -- the renewal window -------------------------------------------------------------


@pytest.mark.parametrize(
    ("days_after_issue", "renewed"),
    [(0, False), (59, False), (59.99, False), (60, True), (75, True), (89.9, True), (95, True)],
)
def test_a_leaf_is_renewed_once_it_is_within_30_days_of_its_90_day_life(days_after_issue, renewed):
    now = T0 + datetime.timedelta(days=days_after_issue)
    plan = plan_renewal(steady(), now, POLICY)
    assert plan.reissue == (LEAVES if renewed else ())
    assert plan.new_ca == "" and not plan.promote and not plan.retire


def test_only_the_leaf_that_is_due_is_renewed():
    state = steady()
    state = replace(state, leaves={"client": leaf("ca1", T0), "serving": leaf("ca1", T0 + 20 * DAY)})
    plan = plan_renewal(state, T0 + 65 * DAY, POLICY)
    assert plan.reissue == ("client",)
    assert any("client: expires 2026-04-01" in reason for reason in plan.reasons)


@pytest.mark.parametrize(
    ("broken", "why"),
    [
        (None, "missing or unreadable"),
        (leaf("ca1", T0, as_wanted=False), "names or usages"),
        (leaf("someone-else", T0), "signed by a CA that no longer signs"),
    ],
)
def test_a_missing_wrong_or_foreign_leaf_is_issued_again(broken, why):
    state = replace(steady(), leaves={"client": broken, "serving": leaf("ca1", T0)})
    plan = plan_renewal(state, T0 + DAY, POLICY)
    assert plan.reissue == ("client",)
    assert any(why in reason for reason in plan.reasons)


def test_on_install_a_new_ca_signs_at_once_and_both_leaves_are_issued():
    plan = plan_renewal(CertState(trusted=(), leaves=dict.fromkeys(LEAVES)), T0, POLICY)
    assert (plan.new_ca, plan.promote, plan.reissue, plan.retire) == ("signer", False, LEAVES, ())


# -- the CA's rotation ---------------------------------------------------------------


def test_the_ca_rotates_in_three_runs_with_an_overlap():
    due = T0 + POLICY.ca_life - POLICY.ca_renew_before
    # 1. Within the CA's window: a new CA joins the bundle, signs nothing yet.
    state = steady(issued=due - 10 * DAY)
    assert plan_renewal(state, due - HOUR, POLICY) == RenewalPlan()
    first = plan_renewal(state, due, POLICY)
    assert (first.new_ca, first.promote, first.reissue, first.retire) == ("next", False, (), ())
    # 2. The bundle [ca1, ca2] must settle and kube-scheduler run with it before ca2 signs.
    state = replace(
        state,
        trusted=(*state.trusted, Authority("ca2", due + POLICY.ca_life)),
        next="ca2",
        bundle_changed=due,
        bundle_loaded=False,
    )
    assert not plan_renewal(state, due + 30 * DAY, POLICY).changes  # the scheduler never restarted: wait
    assert not plan_renewal(replace(state, bundle_loaded=True), due + POLICY.settle - HOUR / 60, POLICY).changes
    second = plan_renewal(replace(state, bundle_loaded=True), due + POLICY.settle, POLICY)
    assert (second.new_ca, second.promote, second.reissue, second.retire) == ("", True, LEAVES, ())
    # 3. ca1 leaves the bundle once both leaves signed by ca2 have had time to reach their readers.
    promoted = due + POLICY.settle
    state = replace(
        state, signer="ca2", next="", bundle_loaded=True, leaves={name: leaf("ca2", promoted) for name in LEAVES}
    )
    assert not plan_renewal(state, promoted + POLICY.settle - HOUR / 60, POLICY).changes
    third = plan_renewal(state, promoted + POLICY.settle, POLICY)
    assert (third.new_ca, third.promote, third.reissue, third.retire) == ("", False, (), ("ca1",))


def test_certificates_of_an_older_migchain_without_a_ca_key_are_replaced_with_the_same_overlap():
    """Upgrading from `migchain certs` that threw the CA key away: nothing is re-issued until a new CA settled."""
    old = CertState(
        trusted=(Authority("old", T0 + 3650 * DAY),),
        leaves={name: leaf("old", T0, life=730 * DAY) for name in LEAVES},
    )
    plan = plan_renewal(old, T0 + DAY, POLICY)
    assert (plan.new_ca, plan.reissue, plan.retire) == ("next", (), ())
    assert "no CA key is kept" in plan.reasons[0]


def test_a_leaf_needed_while_no_kept_ca_may_sign_gets_a_new_ca_that_signs_at_once():
    old = CertState(trusted=(Authority("old", T0 + 3650 * DAY),), leaves={"client": None, "serving": leaf("old", T0)})
    plan = plan_renewal(old, T0 + DAY, POLICY)
    assert (plan.new_ca, plan.reissue) == ("signer", LEAVES)


def test_after_every_ca_expired_a_new_one_signs_at_once_and_the_expired_ones_leave():
    state = steady()
    plan = plan_renewal(state, T0 + POLICY.ca_life + DAY, POLICY)
    assert (plan.new_ca, plan.reissue, plan.retire) == ("signer", LEAVES, ("ca1",))
    assert "must restart" in plan.reasons[0]


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"leaf_renew_before": 90 * DAY}, "leaf renewal window"),
        ({"ca_renew_before": 60 * DAY}, "longer than a leaf's life"),
        ({"ca_renew_before": 6 * 365 * DAY}, "CA renewal window must be shorter"),
        ({"settle": -HOUR}, "settle time"),
    ],
)
def test_a_policy_whose_durations_cannot_work_together_is_refused(changes, problem):
    assert POLICY.problems() == []
    assert any(problem in line for line in replace(POLICY, **changes).problems())


# -- a timeline of years: no reader ever meets a certificate it cannot verify -----------------------------


@dataclass
class Store:
    """The Secrets as the model keeps them: CAs by id with their ends, the bundle, the leaves, and their past."""

    ends: dict[str, datetime.datetime]
    state: CertState
    times: list[datetime.datetime] = field(default_factory=list)
    states: list[CertState] = field(default_factory=list)

    def keep(self, now: datetime.datetime) -> None:
        self.times.append(now)
        self.states.append(self.state)

    def seen(self, at: datetime.datetime) -> CertState:
        """What a reader whose files lag by (now - at) sees: the last state stored at or before `at`."""
        return self.states[bisect.bisect_right(self.times, at) - 1]


def carry_out(store: Store, plan: RenewalPlan, now: datetime.datetime, names: itertools.count[int]) -> CertState:
    """What extender/certs.py renew() stores for `plan`, in the planner's terms."""
    state = store.state
    trusted, signer, upcoming = list(state.trusted), state.signer, state.next
    if plan.new_ca:
        made = Authority(f"ca{next(names)}", now + POLICY.ca_life)
        store.ends[made.id] = made.not_after
        trusted.append(made)
        signer, upcoming = (made.id, "") if plan.new_ca == "signer" else (signer, made.id)
    if plan.promote:
        signer, upcoming = upcoming, ""
    leaves = dict(state.leaves)
    for name in plan.reissue:
        leaves[name] = Leaf(signer, now, min(now + POLICY.leaf_life, store.ends[signer]), as_wanted=True)
    kept = tuple(a for a in trusted if a.id not in plan.retire)
    changed = now if kept != state.trusted else state.bundle_changed
    return CertState(kept, leaves, signer, upcoming, changed, state.bundle_loaded)


@settings(max_examples=25, deadline=None)
@given(
    # Hours between runs: the CronJob's six, or longer when runs were missed (up to a week).
    gaps=st.lists(st.integers(min_value=6, max_value=7 * 24), min_size=1, max_size=40),
    scheduler_delay=st.integers(min_value=0, max_value=48),  # hours from a restart request to a complete rollout
    extender_lag=st.integers(min_value=0, max_value=20),  # minutes for kubelet to refresh a mounted Secret
    scheduler_lag=st.integers(min_value=0, max_value=20),
    upgrade=st.booleans(),  # start from certificates of an older migchain, CA key thrown away
)
def test_over_twelve_years_of_runs_every_handshake_verifies(
    gaps, scheduler_delay, extender_lag, scheduler_lag, upgrade
):
    names = itertools.count(1)
    if upgrade:
        old = Authority("old", T0 + 3650 * DAY)
        start = CertState(trusted=(old,), leaves={n: leaf("old", T0, life=730 * DAY) for n in LEAVES})
        store = Store({"old": old.not_after}, start)
    else:
        store = Store({}, CertState(trusted=(), leaves=dict.fromkeys(LEAVES)))
        store.state = carry_out(store, plan_renewal(store.state, T0, POLICY), T0, names)
    store.keep(T0)
    # kube-scheduler trusts the bundle it read when its pod last started.
    scheduler_trusts = {a.id for a in store.state.trusted}
    restart_at: datetime.datetime | None = None
    now = T0
    e_lag, s_lag = datetime.timedelta(minutes=extender_lag), datetime.timedelta(minutes=scheduler_lag)

    def check(at: datetime.datetime) -> None:
        extender, scheduler = store.seen(at - e_lag), store.seen(at - s_lag)
        serving, client = extender.leaves["serving"], scheduler.leaves["client"]
        assert serving is not None and client is not None
        assert serving.not_after > at and client.not_after > at, f"a leaf expired by {at}"
        assert serving.issuer in scheduler_trusts, f"{at}: kube-scheduler cannot verify the extender"
        assert client.issuer in {a.id for a in extender.trusted}, f"{at}: the extender cannot verify kube-scheduler"
        assert store.ends[serving.issuer] > at and store.ends[client.issuer] > at

    horizon = T0 + 12 * 365 * DAY
    for gap in itertools.cycle(gaps):
        if now > horizon:
            break
        step = datetime.timedelta(hours=gap)
        for k in range(1, 9):  # readers between two runs, kubelet's refresh and the rollout included
            moment = now + step * k / 8
            if restart_at is not None and moment >= restart_at:
                # A new pod: kubelet mounts the Secret as it is then.
                scheduler_trusts = {a.id for a in store.seen(restart_at).trusted}
                restart_at = None
            check(moment)
        now += step
        if restart_at is not None and now >= restart_at:
            scheduler_trusts = {a.id for a in store.seen(restart_at).trusted}
            restart_at = None
        loaded = scheduler_trusts == {a.id for a in store.state.trusted} and restart_at is None
        state = replace(store.state, bundle_loaded=loaded)
        plan = plan_renewal(state, now, POLICY)
        store.state = carry_out(Store(store.ends, state), plan, now, names)
        store.keep(now)
        # The run restarts kube-scheduler whenever the bundle it trusts is not the stored one.
        if {a.id for a in store.state.trusted} != scheduler_trusts and restart_at is None:
            restart_at = now + datetime.timedelta(hours=scheduler_delay)
        again = plan_renewal(replace(store.state, bundle_loaded=loaded), now, POLICY)
        assert not again.changes, f"planning twice at {now} changes again: {again}"
    assert len({a.id for state in store.states for a in state.trusted}) >= 3  # two rotations at least
