"""Carries out the core's preemption plans in the returner's rounds: nominate, then evict; never forced.

kube-scheduler cannot preempt for a MIG slice (see extender/core/preempt.py),
so the returner does, planning with `plan_preemptions`. Each plan is checked
first: the preemptor and every victim read again, and a dry-run eviction of
each victim, so that a PodDisruptionBudget refusing one spares the whole plan
rather than leaving it half done (that victim is spared a while and the next
round plans around it). Then the preemptor is nominated to the node
(status.nominatedNodeName), so the slices its victims free are kept for it
against pods of lower priority, and each victim goes through the Eviction API:
a borrower restored to its own request, as a return restores it (a bare one
journaled and recreated under its name), any other pod evicted, as
kube-scheduler's preemption deletes it (its controller, if any, recreates it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from extender.core.claims import Claim, claim_for, open_claims
from extender.core.cluster import (
    MIGCHAIN_SCHEDULER,
    MigCounts,
    ObjectError,
    PodRecord,
    PodRequest,
    Snapshot,
    controller_of,
)
from extender.core.loan import restored_pod
from extender.core.preempt import Preemption, Victim, plan_preemptions
from extender.core.rules import ChainRules
from extender.kube.api import ApiError
from extender.kube.events import EventRecorder, pod_reference
from extender.kube.executor import RESTORE_JOURNALED, BorrowError, EvictionBlocked, Executor, pod_path
from extender.kube.once import Once
from extender.metrics import ReturnerMetrics

log = logging.getLogger(__name__)

# A victim whose eviction a PodDisruptionBudget refused is left alone this long.
PDB_RETRY_SECONDS = 10.0
# After a preemption its pod is left this long to be scheduled before it may
# preempt again; it also waits while its victims are still leaving (the core
# sees them terminating on its nominated node).
WAIT_SECONDS = 30.0


class Preemptor:
    def __init__(
        self,
        executor: Executor,
        events: EventRecorder,
        metrics: ReturnerMetrics,
        *,
        schedulers: tuple[str, ...] = (MIGCHAIN_SCHEDULER,),
        dry_run: bool = False,
        recover_soon: Callable[[], None] = lambda: None,
    ) -> None:
        self.executor = executor
        self.events = events
        self.metrics = metrics
        self.schedulers = schedulers  # pods of these schedulers preempt; others have their own
        self.dry_run = dry_run
        self.recover_soon = recover_soon  # a bare borrower evicted but maybe not recreated: finish its journal
        self._announced = Once[str]()  # preemptor UIDs already told "would preempt"
        self._told_blocked = Once[tuple[str, str]]()  # (preemptor, victim) UIDs: one Event per pair
        self._waiting: dict[str, tuple[str, float]] = {}  # preemptor key -> (uid, until)
        self._spared: dict[str, float] = {}  # victim uid -> until
        self._homes: dict[str, Claim] = {}  # returned victims' slices, held until they are back (core/claims.py)
        self._records: Sequence[PodRecord] = ()  # the pods this round plans with: tell a victim's siblings

    def claims(self) -> list[tuple[str, MigCounts]]:
        """Slices promised to borrowers a preemption restored, until they are back: not free to plan with."""
        return [(claim.node, claim.slices) for claim in self._homes.values()]

    def round(
        self,
        snapshot: Snapshot,
        records: Iterable[PodRecord],
        rules: ChainRules,
        *,
        leading: Callable[[], bool],
        claims: Iterable[tuple[str, MigCounts]] = (),
        waiting: Collection[str] = (),
        spared: Collection[str] = (),
    ) -> None:
        """Plan the preemptions this state of the cluster calls for and carry them out while leading."""
        records = list(records)
        now = time.monotonic()
        pending = {r.request.key: r.request.uid for r in records if not r.node and not r.terminal}
        # A preemptor stops waiting once bound or gone; a returned victim's claim once it is back.
        self._waiting = {k: w for k, w in self._waiting.items() if w[1] > now and pending.get(k) == w[0]}
        self._homes = {claim.key: claim for claim in open_claims(self._homes.values(), records, now)}
        self._records = records
        self._spared = {uid: until for uid, until in self._spared.items() if until > now}
        waiting_uids = set(pending.values())  # what was said once about a pod is forgotten when it is placed
        self._announced.keep_only(waiting_uids)
        self._told_blocked.keep_only(lambda pair: pair[0] in waiting_uids)
        plans = plan_preemptions(
            snapshot,
            records,
            rules,
            schedulers=self.schedulers,
            claims=[*claims, *self.claims()],
            waiting={*waiting, *self._waiting},
            spared={*spared, *self._spared},
        )
        for plan in plans:
            if not leading():
                return  # the lease may pass to another replica: stop before acting
            if self.dry_run or _dry_run(plan, rules):
                self.announce(plan)
            else:
                self.execute(plan)

    def announce(self, plan: Preemption) -> None:
        """Dry run: the preemption decided as usual, logged, counted and announced once; nothing evicted."""
        request = plan.preemptor.request
        if not self._announced.first(request.uid):
            return
        message = f"dry run: would be {plan.describe()}; nothing is evicted"
        self.metrics.preemptions.labels("dry-run").inc()
        log.info("%s %s", request.key, message, extra={"pod": request.key, "node": plan.node})
        self.events.record(pod_reference(request), "WouldPreempt", message)

    def execute(self, plan: Preemption) -> None:
        request = plan.preemptor.request
        preemptor = self._current(request, "")
        victims = [(victim, self._current(victim.record.request, plan.node)) for victim in plan.victims]
        if preemptor is None or any(current is None for _, current in victims):
            self.metrics.preemptions.labels("gone").inc()
            log.info("preemption for %s dropped: the pod or a victim changed first", request.key)
            return
        found = [(victim, current) for victim, current in victims if current is not None]
        for victim, current in found:
            try:
                self.executor.evict(current, dry_run=True)
            except EvictionBlocked as blocked:
                self._blocked(preemptor, victim, str(blocked))
                return
            except ApiError as error:
                self._failed(request, f"cannot check the eviction of {victim.record.request.key}: {error}")
                return
        try:
            self.executor.nominate(preemptor, plan.node)
        except ApiError as error:
            self._failed(request, f"cannot nominate it to {plan.node}: {error}")
            return
        self._waiting[request.key] = (request.uid, time.monotonic() + WAIT_SECONDS)
        message = plan.describe()
        log.info("%s", message, extra={"pod": request.key, "node": plan.node})
        self.events.record(preemptor, "Preempting", message)
        # Bare borrowers last: each is recreated only once it is gone (by the journal, if it is slow to go).
        for victim, current in sorted(found, key=lambda pair: pair[0].loan is not None and _bare(pair[1])):
            if not self._preempt(plan, preemptor, victim, current):
                return
        self.metrics.preemptions.labels("preempted").inc()

    def _preempt(self, plan: Preemption, preemptor: Mapping[str, Any], victim: Victim, pod: dict[str, Any]) -> bool:
        """Evict one victim (a borrower: restore it); False when that failed and the rest must wait."""
        key = victim.record.request.key
        try:
            if victim.loan is None:
                self.executor.evict(pod)
                outcome = "evicted"
            else:
                # Its controller recreates an owned pod; a bare pod is recreated from its loan record.
                restored = restored_pod(pod, victim.loan.restarts + 1, self.executor.loan_key) if _bare(pod) else {}
                outcome = self.executor.restore(pod, restored, not _bare(pod))
                if outcome == RESTORE_JOURNALED:
                    self.recover_soon()  # evicted, not gone yet: the journal recreates it once it is
        except EvictionBlocked as blocked:
            # The budget changed since the dry run: the rest stays, the next round plans again.
            self._blocked(preemptor, victim, str(blocked))
            return False
        except ObjectError as error:  # its loan record was edited since the cache read it: nothing was done
            self._failed(plan.preemptor.request, f"{key} cannot be restored: {error}")
            return False
        except (ApiError, BorrowError) as error:
            self._failed(plan.preemptor.request, f"evicting {key} failed: {error}")
            if victim.loan is not None and _bare(pod):
                self.recover_soon()
            return False
        if victim.loan is not None and victim.home:
            self._homes[key] = claim_for(
                victim.record, victim.home, victim.loan.original, self._records, time.monotonic() + WAIT_SECONDS
            )
        self.metrics.preempted.labels(victim.fate).inc()
        name = f"{plan.preemptor.request.key} ({plan.preemptor.request.uid})"
        self.events.record(
            pod,
            "Preempted",
            f"Preempted by pod {name} of priority {plan.preemptor.request.priority} on node {plan.node}: {outcome}",
        )
        log.info("preempted %s for %s: %s", key, plan.preemptor.request.key, outcome, extra={"pod": key})
        return True

    def _current(self, request: PodRequest, node: str) -> dict[str, Any] | None:
        """The pod as the API server has it now, if it is still the one planned with (same UID, not leaving,
        bound to `node`; "" for unbound)."""
        try:
            pod = self.executor.api.get(pod_path(request.namespace, request.name))
        except ApiError:
            return None
        metadata = pod.get("metadata") or {}
        if metadata.get("uid") != request.uid or metadata.get("deletionTimestamp"):
            return None
        return pod if (pod.get("spec") or {}).get("nodeName", "") == node else None

    def _blocked(self, preemptor: Mapping[str, Any], victim: Victim, why: str) -> None:
        uid = victim.record.request.uid
        self._spared[uid] = time.monotonic() + PDB_RETRY_SECONDS
        self.metrics.preemptions.labels("blocked").inc()
        log.info("preemption of %s blocked by a PodDisruptionBudget: %s", victim.record.request.key, why)
        if self._told_blocked.first((preemptor["metadata"]["uid"], uid)):
            self.events.record(
                preemptor,
                "PreemptionBlocked",
                f"the eviction of {victim.record.request.key} was refused ({why}); it is spared, others are tried",
                "Warning",
            )

    def _failed(self, request: PodRequest, why: str) -> None:
        self.metrics.preemptions.labels("failed").inc()
        self.metrics.errors.count("returner", "api")
        log.warning("preemption for %s failed: %s", request.key, why)


def _bare(pod: Mapping[str, Any]) -> bool:
    return controller_of(pod["metadata"]) is None


def _dry_run(plan: Preemption, rules: ChainRules) -> bool:
    """Whether a chain the plan touches (the preemptor's borrow, a victim's loan) is in dry run for that pod."""
    chains = {grant.chain for grant in plan.placement.grants if grant.chain}
    if rules.dry_run(chains, plan.preemptor.request.namespace):
        return True
    return any(
        victim.loan is not None and rules.dry_run(victim.loan.chains, victim.record.request.namespace)
        for victim in plan.victims
    )
