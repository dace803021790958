"""The returner loop: on every change of the cluster, while leading, plan returns and carry them out.

Planning is the pure `plan_returns`; this module reads the cache, checks the
lease before every action, and turns each Restore into an eviction (owned
pods) or a journaled evict-and-recreate (bare pods). A borrower whose eviction
a PodDisruptionBudget refuses is retried after a pause, never forced, and the
round plans again without it, so it holds no other return back. A pod whose
loan record cannot be read is no borrower: counted, and reported once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from extender.core.claims import Claim, claim_for, open_claims
from extender.core.cluster import (
    BORROW_ANNOTATION,
    MIGCHAIN_SCHEDULER,
    MigCounts,
    ObjectError,
    PodRecord,
    PodRequest,
    Snapshot,
    controller_of,
)
from extender.core.loan import Loan, restored_pod
from extender.core.returns import (
    Borrower,
    Restore,
    TurnedAway,
    borrowers_of,
    pending_requests,
    plan_returns,
    turned_away_borrowers,
    waiting_times,
)
from extender.core.rules import ChainRules, ReturnOrder
from extender.kube.api import ApiError
from extender.kube.cache import ClusterCache
from extender.kube.events import EventRecorder, JournalRejections, pod_reference
from extender.kube.executor import (
    RESTORE_JOURNALED,
    Abandoned,
    BorrowError,
    CopyRefused,
    EvictionBlocked,
    Executor,
    FellBack,
    StillTerminating,
    pod_path,
)
from extender.kube.lease import LeaderElection
from extender.kube.once import Once
from extender.kube.overdue import OVERDUE_AFTER_SECONDS, OverdueJournal
from extender.kube.preemptor import Preemptor
from extender.kube.recarver import Recarver
from extender.loan_guard import MAX_QUEUED_REPORTS
from extender.metrics import ReturnerMetrics
from extender.reload import RulesInForce

log = logging.getLogger(__name__)

PDB_RETRY_SECONDS = 10.0
# After a return the pod takes a moment to come back (a controller's new pod,
# or the watch showing our recreated one); until then its slice is held for it
# (extender/core/claims.py), at most this long: a controller may never make one.
CLAIM_SECONDS = 30.0
# A borrower whose loan record cannot be read back (its owner edited it) is
# not restored; it is looked at again this much later, should it be fixed.
UNREADABLE_RETRY_SECONDS = 300.0
# Events on pods whose loan record migchain does not believe, at most this many a round.
REJECTED_LOANS_PER_ROUND = 20
# A borrower whose restored pod the API server refuses (a quota, PodSecurity, an
# admission policy) is not evicted; it is looked at again this much later.
REFUSED_RETRY_SECONDS = 60.0
# A journaled return that could not be finished (its pod not gone yet, an API
# error) is tried again this soon, then less often while it cannot (a finalizer
# may hold a pod for hours), up to RECOVERY_RETRY_MAX_SECONDS apart.
RECOVERY_RETRY_SECONDS = 1.0
RECOVERY_RETRY_MAX_SECONDS = 8.0
# Journaled returns are finished this many at a time: one whose API calls are
# slow holds up no other, nor the round for long.
RECOVERY_WORKERS = 4
# Borrowers their node turned away, brought back (or reported) at most this many a round.
TURNED_AWAY_PER_ROUND = 20
# A round plans again without the borrowers whose return was just refused, at
# most this many times: each plan leaves out every refusal of the one before.
PLANS_PER_ROUND = 4
# The least time from the start of one round to the start of the next. A round
# follows every change of the cluster, and a busy cluster changes many times a
# second: the changes that come meanwhile are planned for in one round. A round
# at 2,000 nodes takes tens of milliseconds; a return waits this much at most.
MIN_ROUND_GAP = 0.2


class Returner:
    def __init__(
        self,
        cache: ClusterCache,
        rules: RulesInForce,
        executor: Executor,
        events: EventRecorder,
        election: LeaderElection,
        *,
        interval: float = 2.0,
        min_round_gap: float = MIN_ROUND_GAP,
        metrics: ReturnerMetrics | None = None,
        dry_run: bool = False,
        schedulers: tuple[str, ...] = (MIGCHAIN_SCHEDULER,),
        journal_overdue_after: float = OVERDUE_AFTER_SECONDS,
        order: ReturnOrder = ReturnOrder.LEAST_WORK_LOST,
        clock: Callable[[], float] = time.time,
        recarver: Recarver | None = None,
    ) -> None:
        self.recarver = recarver  # --recarve: idle opted-in nodes re-carved for sustained unmet demand
        self.order = order  # --return-order: which borrower goes first
        self.clock = clock  # wall clock: how long pending pods have waited, from their creationTimestamp
        self.schedulers = schedulers  # --scheduler-name: pending pods for these are demand; others never cost a return
        self.dry_run = dry_run  # --dry-run: returns only announced; the chains' policy can add namespaces
        self._announced = Once[str]()  # borrower UIDs already told "would return"
        self._turned_away_told = Once[str]()  # UIDs of turned-away borrowers already reported (owned, dry run)
        self.cache = cache
        self.rules = rules
        self.executor = executor
        self.events = events
        self.election = election
        self.interval = interval
        self.min_round_gap = min_round_gap
        self.metrics = metrics if metrics is not None else ReturnerMetrics()
        self._rejected_entries = JournalRejections(events, self.metrics.errors)  # forged journal entries
        self._blocked: dict[str, float] = {}  # borrower key -> when to try again
        # Returns under way whose pod is not back yet hold their target slices, by borrower key.
        self._claims: dict[str, Claim] = {}
        self._recover_at: float | None = 0.0  # when to (re)read the journal; None once it is clean
        self._recover_retry = RECOVERY_RETRY_SECONDS  # the pause after a pass that left entries waiting
        # Bare borrowers evicted but not gone yet (uid -> namespace, name): the journal recreates each as soon as
        # the cache shows it gone.
        self._leaving: dict[str, tuple[str, str]] = {}
        self.overdue = OverdueJournal(executor, events, self.metrics.journal, "return", journal_overdue_after)
        self.preemptor = Preemptor(
            executor, events, self.metrics, schedulers=schedulers, dry_run=dry_run, recover_soon=self._recover_soon
        )

    def run(self, stop: threading.Event) -> None:
        while not self.cache.wait_ready(timeout=60):
            log.warning("cluster cache not in sync yet; the returner waits")
        while not stop.is_set():
            self.cache.changed.wait(self.interval)
            self.cache.changed.clear()
            if not self.election.leading():
                self._recover_at = 0.0  # a new term starts with the journal
                if self.recarver is not None:
                    self.recarver.new_term()  # and with the re-carve records read afresh from the Nodes
                self.cache.loans.take_reports(MAX_QUEUED_REPORTS)  # the leader reports them
                continue
            started = time.monotonic()
            try:
                self.round()
            except Exception:  # one bad round must not stop the returner
                self.metrics.errors.count("returner", "round")
                log.exception("return round failed")
            # Changes meanwhile set `changed`: the next round, right after the gap, plans for them all.
            stop.wait(max(0.0, self.min_round_gap - (time.monotonic() - started)))

    def round(self) -> None:
        self.report_rejected_loans()
        if self._gone_since_evicted():
            self._recover_soon(at_once=True)
        if self._recover_at is not None and time.monotonic() >= self._recover_at:
            clean = self.recover()
            if clean:
                self._recover_at, self._recover_retry = None, RECOVERY_RETRY_SECONDS
            else:
                self._recover_at = time.monotonic() + self._recover_retry
                self._recover_retry = min(2 * self._recover_retry, RECOVERY_RETRY_MAX_SECONDS)
            try:
                self.overdue.check(clean)
            except Exception as error:
                log.warning("cannot read the age of the return journal's entries: %s", error)
        snapshot, records = self.cache.view()
        rules = self.rules.current()  # once: a round plans on one version of the rules
        self.bring_back_turned_away(records, rules)
        borrowers = borrowers_of(records, rules)
        pending = pending_requests(records, self.schedulers)
        now = time.monotonic()
        self._forget_gone(borrowers, now)
        # A claim ends as soon as its pod is back: from then on it counts as pending or bound.
        self._claims = {claim.key: claim for claim in open_claims(self._claims.values(), records, now)}
        claims = [(claim.node, claim.slices) for claim in self._claims.values()]
        returning = self.return_borrowers(
            snapshot=snapshot, records=records, rules=rules, borrowers=borrowers, pending=pending, claims=claims
        )
        if returning is None:
            return  # the lease may pass to another replica: stop before acting
        # Preemption comes after returns: a pod a return makes room for waits for it, and a borrower on its
        # way back is no victim.
        self.preemptor.round(
            snapshot,
            records,
            rules,
            leading=self.election.leading,
            claims=[*claims, *((r.target, r.borrower.loan.original) for r in returning if r.target)],
            waiting={r.unblocks for r in returning if r.unblocks},
            spared={r.borrower.record.request.uid for r in returning},
        )
        if self.recarver is not None:
            # Last: a pod a return or a preemption serves is no demand for a re-carve next round.
            try:
                self.recarver.round(snapshot, records, rules, schedulers=self.schedulers, leading=self.election.leading)
            except Exception:  # the returns must go on whatever a re-carve meets
                self.metrics.errors.count("recarver", "round")
                log.exception("re-carve round failed")

    def return_borrowers(
        self,
        *,
        snapshot: Snapshot,
        records: Sequence[PodRecord],
        rules: ChainRules,
        borrowers: Sequence[Borrower],
        pending: Sequence[PodRequest],
        claims: Sequence[tuple[str, MigCounts]],
    ) -> list[Restore] | None:
        """Plan this round's returns and carry them out; the returns under way, or None if the lease was lost.

        A borrower whose return is refused (a PodDisruptionBudget, an unreadable
        record) is left out and the round plans again, so the slice it was
        planned for goes to the next borrower at once: a pod that can never be
        evicted must not hold every other return back. Borrowers still waiting
        out such a refusal are left out from the start.
        """
        now = time.monotonic()
        waited = waiting_times(records, self.clock())
        done: set[str] = set()
        returning: list[Restore] = []
        for _ in range(PLANS_PER_ROUND):
            movable = [b for b in borrowers if b.key not in done and self._blocked.get(b.key, 0.0) <= now]
            served = {restore.unblocks for restore in returning}
            waiting = [pod for pod in pending if pod.key not in served]
            under_way = [(r.target, r.borrower.loan.original) for r in returning if r.target]
            refused = False
            for restore in plan_returns(
                snapshot,
                movable,
                waiting,
                rules,
                [*claims, *under_way, *self.preemptor.claims()],
                order=self.order,
                waited=waited,
            ):
                if not self.election.leading():
                    return None
                key = restore.borrower.key
                done.add(key)
                if self.dry_run or rules.dry_run(
                    restore.borrower.loan.chains, restore.borrower.record.request.namespace
                ):
                    self.announce(restore)
                else:
                    self.execute(restore, records)
                if self._blocked.get(key, 0.0) > now:
                    refused = True
                else:
                    returning.append(restore)
            if not refused:
                break
        return returning

    def report_rejected_loans(self) -> None:
        """One Event on each pod whose loan record the cache did not believe (a few a round: they are cheap, not
        free, and a tenant may forge many)."""
        for rejected in self.cache.loans.take_reports(REJECTED_LOANS_PER_ROUND):
            key = f"{rejected.namespace}/{rejected.name}"
            log.warning("loan of %s not believed (%s): %s", key, rejected.reason, rejected.message, extra={"pod": key})
            reference = {"metadata": {"name": rejected.name, "namespace": rejected.namespace, "uid": rejected.uid}}
            self.events.record(reference, "LoanRejected", rejected.message, "Warning")

    def bring_back_turned_away(self, records: Sequence[PodRecord], rules: ChainRules) -> None:
        """Borrowing copies their node's kubelet refused at admission: a bare one is brought back, pending under
        its name with its original request; an owned one is left to its controller. Each is reported once, with
        an Event and a count; their slices were never theirs (a Failed pod holds none)."""
        turned_away = turned_away_borrowers(records, rules)
        self._turned_away_told.keep_only({item.borrower.record.request.uid for item in turned_away})
        now = time.monotonic()
        for item in turned_away[:TURNED_AWAY_PER_ROUND]:
            if not self.election.leading():
                return
            record = item.borrower.record
            request = record.request
            why = f"node {record.node} refused the borrowed slices at admission ({record.turned_away})"
            if item.owned or self.dry_run or rules.dry_run(item.borrower.loan.chains, request.namespace):
                if self._turned_away_told.first(request.uid):
                    outcome = "left-to-controller" if item.owned else "dry-run"
                    message = (
                        f"{why}; left to its controller, which creates a pod with its original request"
                        if item.owned
                        else f"dry run: {why}; would bring it back pending under its name"
                    )
                    self._report_turned_away(item, outcome, message)
                continue
            if self._blocked.get(request.key, 0.0) <= now:
                self._bring_back(item, why)

    def _bring_back(self, item: TurnedAway, why: str) -> None:
        """Recreate a turned-away bare borrower from its loan record, as a return does (journaled): its Failed
        pod goes at once (the API server deletes an ended pod without a grace period)."""
        request = item.borrower.record.request
        try:
            pod = self.executor.api.get(pod_path(request.namespace, request.name))
        except ApiError as error:
            log.info("turned-away borrower %s is gone (%s)", request.key, error)
            return
        if pod["metadata"].get("uid") != request.uid or pod["metadata"].get("deletionTimestamp"):
            return  # gone or going already: the cache was behind
        try:
            restored = restored_pod(pod, item.borrower.restarts + 1, self.executor.loan_key)
        except ObjectError as error:
            self._blocked[request.key] = time.monotonic() + UNREADABLE_RETRY_SECONDS
            self._report_turned_away(item, "failed", f"{why}; not brought back: {error}", "Warning")
            return
        if not item.borrow_again:
            # Not signed, as on a fall back: the restore record's signature covers migchain's annotations only.
            restored["metadata"]["annotations"][BORROW_ANNOTATION] = "false"
        try:
            outcome = self.executor.restore(pod, restored, owned=False)
        except Abandoned as gone:
            log.info("turned-away borrower %s: %s", request.key, gone)
            return
        except CopyRefused as refusal:
            self._blocked[request.key] = time.monotonic() + REFUSED_RETRY_SECONDS
            self._report_turned_away(item, "failed", f"{why}; not brought back: {refusal}", "Warning")
            return
        except FellBack as fell_back:
            outcome = str(fell_back)
        except (ApiError, BorrowError, EvictionBlocked) as error:
            self.metrics.errors.count("returner", "api")
            self.metrics.turned_away.labels("failed").inc()
            log.warning("turned-away borrower %s not brought back yet: %s", request.key, error)
            self._blocked[request.key] = time.monotonic() + PDB_RETRY_SECONDS
            self._recover_soon()  # deleted, maybe, but not recreated: the journal holds it
            return
        if outcome == RESTORE_JOURNALED:
            self._leaving[request.uid] = (request.namespace, request.name)
            self._recover_soon()
        again = "" if item.borrow_again else f", not to borrow again (restarted {item.borrower.restarts} times)"
        self._report_turned_away(
            item,
            "brought-back",
            f"{why}; brought back pending under its name with its original request{again}: {outcome}",
            "Warning",
        )

    def _report_turned_away(self, item: TurnedAway, outcome: str, message: str, kind: str = "Warning") -> None:
        request = item.borrower.record.request
        self.metrics.turned_away.labels(outcome).inc()
        log.warning("%s: %s", request.key, message, extra={"pod": request.key, "node": item.borrower.record.node})
        self.events.record(pod_reference(request), "TurnedAway", message, kind)

    def _forget_gone(self, borrowers: Sequence[Borrower], now: float) -> None:
        """What was said or held back about borrowers is kept only while they borrow (and a pause only until it
        ends): pods come and go for as long as the returner runs."""
        self._announced.keep_only({borrower.record.request.uid for borrower in borrowers})
        keys = {borrower.key for borrower in borrowers}
        self._blocked = {key: until for key, until in self._blocked.items() if until > now and key in keys}

    def _recover_soon(self, *, at_once: bool = False) -> None:
        self._recover_at = time.monotonic() + (0.0 if at_once else RECOVERY_RETRY_SECONDS)
        self._recover_retry = RECOVERY_RETRY_SECONDS

    def _gone_since_evicted(self) -> bool:
        """Whether a bare borrower evicted and left to the journal is gone from the cache now (forgotten then)."""
        gone = []
        for uid, (namespace, name) in self._leaving.items():
            record = self.cache.pod(namespace, name)
            if record is None or record.request.uid != uid:
                gone.append(uid)
        for uid in gone:
            del self._leaving[uid]
        return bool(gone)

    def announce(self, restore: Restore) -> None:
        """Dry run: the return decided as usual, logged, counted and announced once; nothing evicted."""
        request = restore.borrower.record.request
        if not self._announced.first(request.uid):
            return
        original = ", ".join(resource for resource, _ in restore.borrower.loan.original)
        where = f"on {restore.target}" if restore.target else "pending (reclaimed)"
        message = f"dry run: would return to {original} {where}: {restore.reason}; nothing is evicted"
        self.metrics.count_return(restore.borrower.loan, "dry-run")
        log.info("%s %s", request.key, message, extra={"pod": request.key, "target": restore.target})
        self.events.record(pod_reference(request), "WouldReturn", message)

    def execute(self, restore: Restore, records: Sequence[PodRecord] = ()) -> None:
        """Return one borrower; `records`, the pods the plan was made on, tell its siblings from its successor."""
        request = restore.borrower.record.request
        loan = restore.borrower.loan
        try:
            borrower = self.executor.api.get(pod_path(request.namespace, request.name))
        except ApiError as error:
            log.info("borrower %s is gone (%s); nothing to return", request.key, error)
            self.metrics.count_return(loan, "gone")
            return
        if (
            borrower["metadata"].get("uid") != request.uid
            or borrower["metadata"].get("deletionTimestamp")
            or (borrower.get("status") or {}).get("phase") in ("Succeeded", "Failed")
        ):
            self.metrics.count_return(loan, "gone")
            return  # replaced, leaving or ended already (its slices are free): the cache was behind
        original = ", ".join(resource for resource, _ in restore.borrower.loan.original)
        message = f"returning to {original}: {restore.reason}"
        owned = controller_of(borrower["metadata"]) is not None
        try:
            # Its controller recreates an owned pod; a bare pod is recreated from its loan record.
            restored = {} if owned else restored_pod(borrower, restore.borrower.restarts + 1, self.executor.loan_key)
        except ObjectError as error:
            self._blocked[request.key] = time.monotonic() + UNREADABLE_RETRY_SECONDS
            self.metrics.count_return(loan, "failed")
            log.warning("return of %s skipped: %s", request.key, error)
            self.events.record(borrower, "ReturnFailed", f"not returned: {error}", "Warning")
            return
        if not restore.target and not self._nominate_for(restore, records):
            self.metrics.count_return(loan, "failed")
            return  # nothing evicted: the slice would not be kept for the pod it is taken back for
        try:
            self.events.record(borrower, "Returning", message)
            outcome = self.executor.restore(borrower, restored, owned)
        except (CopyRefused, Abandoned, FellBack) as refusal:
            self._not_returned(borrower, request, loan, refusal)
            return
        except EvictionBlocked as blocked:
            self._blocked[request.key] = time.monotonic() + PDB_RETRY_SECONDS
            self.metrics.count_return(loan, "blocked")
            log.info("return of %s blocked by a PodDisruptionBudget: %s; retrying later", request.key, blocked)
            self.events.record(borrower, "ReturnBlocked", f"eviction refused, will retry: {blocked}", "Warning")
            return
        except (ApiError, BorrowError) as error:
            self.metrics.count_return(loan, "failed")
            self.metrics.errors.count("returner", "api")
            log.warning("return of %s failed: %s", request.key, error)
            if not owned:
                # Evicted but not recreated, maybe: the journal holds the pod; finish it soon, not at the next start.
                self._recover_soon()
            return
        if outcome == RESTORE_JOURNALED:
            # Evicted, not gone yet: the journal recreates it once the cache shows it gone (or, failing that, soon).
            self._leaving[request.uid] = (request.namespace, request.name)
            self._recover_soon()
        self._blocked.pop(request.key, None)
        if restore.target:  # a reclaimed borrower waits, pending, for a slice of its own type: nothing to hold
            self._claims[request.key] = claim_for(
                restore.borrower.record, restore.target, loan.original, records, time.monotonic() + CLAIM_SECONDS
            )
        self.metrics.count_return(loan, "returned" if restore.target else "reclaimed")
        log.info(
            "returned %s: %s; %s",
            request.key,
            message,
            outcome,
            extra={"pod": request.key, "node": restore.borrower.record.node, "target": restore.target},
        )

    def _nominate_for(self, restore: Restore, records: Sequence[PodRecord]) -> bool:
        """Nominate the pod a reclaim is for to the borrower's node (status.nominatedNodeName), before the
        borrower goes: the extender then keeps the slices it frees for that pod against every pod of its
        priority or lower, the borrower back as Pending first among them (core/preempt.py yield_to_nominated)."""
        node = restore.borrower.record.node
        for record in records:
            if record.request.key == restore.unblocks and not record.node:
                reference = pod_reference(record.request)
                break
        else:
            return False  # bound or gone since the cache was read: no reclaim for it
        try:
            self.executor.nominate(reference, node)
        except ApiError as error:
            self.metrics.errors.count("returner", "api")
            log.warning("cannot nominate %s to %s for a reclaim: %s", restore.unblocks, node, error)
            return False
        return True

    def _not_returned(self, borrower: dict[str, Any], request: PodRequest, loan: Loan, refusal: BorrowError) -> None:
        """A bare borrower not returned: its restored pod refused (nothing evicted, or the borrower recreated as it
        was), or the borrower gone before its eviction (its user deleted it)."""
        if isinstance(refusal, Abandoned):
            outcome = "gone"
            log.info("return of %s: %s", request.key, refusal)
        else:
            outcome = "failed"
            if isinstance(refusal, CopyRefused):  # the borrower keeps running; tried again a while later
                self._blocked[request.key] = time.monotonic() + REFUSED_RETRY_SECONDS
            log.warning("return of %s: %s", request.key, refusal)
            self.events.record(borrower, "ReturnFailed", f"not returned: {refusal}", "Warning")
        self.metrics.count_return(loan, outcome)

    def recover(self) -> bool:
        """Finish bare-pod returns left journaled (a crash, a borrower slow to go); False if some must wait.

        A few at a time, and none waits for its pod to go: a slow one holds up no other.
        """
        entries = self.executor.journal("return", rejected=self._rejected_entries)
        if not entries:
            return True
        with ThreadPoolExecutor(min(RECOVERY_WORKERS, len(entries)), thread_name_prefix="journal") as pool:
            return all(list(pool.map(self._recover_one, *zip(*entries, strict=True))))

    def _recover_one(self, borrower: Mapping[str, Any], restored: Mapping[str, Any]) -> bool:
        name = f"{borrower['metadata'].get('namespace')}/{borrower['metadata']['name']}"
        try:
            outcome = self.executor.finish_return(borrower, restored)
        except StillTerminating as waiting:
            log.info("journaled return of %s waits: %s", name, waiting)
            return False
        except Exception as error:  # an API error or a broken connection: the entry waits for the next pass
            self.metrics.errors.count("journal", "recovery")
            log.warning("journaled return of %s cannot be finished yet: %s", name, error)
            return False
        log.warning("journaled return of %s finished: %s", name, outcome)
        return True
