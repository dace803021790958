"""The binder: re-decides the placement on the current state, reserves its slices, then binds or borrows.

Deciding and reserving happen under the cache's lock, so two binds can never
take the same free slice; the API calls happen outside it. An exact fit is a
Binding; a borrow is a replacement pod run by the executor.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from extender.core.cluster import (
    REPLACED_UID_ANNOTATION,
    BindRequest,
    ObjectError,
    PodRecord,
    PodRequest,
    controller_of,
    pod_record,
    pod_request,
)
from extender.core.decide import Placement, Rejection, place, refuse_needless_borrow
from extender.core.headroom import lending_rules
from extender.core.loan import plan_borrow
from extender.core.preempt import node_after_nominated
from extender.core.rules import ChainRules
from extender.filter_memory import FilterMemory
from extender.kube.api import ApiError, KubeApi
from extender.kube.cache import ClusterCache
from extender.kube.events import EventRecorder, JournalRejections, pod_reference
from extender.kube.executor import Abandoned, BorrowError, Executor, FellBack, StillTerminating, pod_path
from extender.kube.once import Once
from extender.kube.overdue import OVERDUE_AFTER_SECONDS, OverdueJournal
from extender.metrics import Metrics
from extender.reload import RulesInForce

log = logging.getLogger(__name__)

# The journal is read again as soon as a borrow failed; while an entry cannot
# be finished (the API server away, an original still terminating), every
# second, doubling up to 8 s: a pod there exists nowhere else. And once a
# minute anyway.
RECOVERY_RETRY_SECONDS = 1.0
RECOVERY_RETRY_MAX_SECONDS = 8.0
RECOVERY_SWEEP_SECONDS = 60.0
# Journal entries are finished this many at a time: one whose API calls are
# slow (a webhook timing out, say) holds up no other.
RECOVERY_WORKERS = 4
NOT_LEADING = "this migchain-extender replica is not the leader (or is handing over): kube-scheduler retries the pod"
# The dry run's announced pods are looked over once they are this many (and again each time they double):
# those no longer pending are forgotten.
ANNOUNCED_LOOK_OVER = 1024


@dataclass(frozen=True)
class BindOutcome:
    error: str  # "" on success: the field kube-scheduler reads
    placement: Placement | None = None  # what was placed; on a refusal, a needless borrow refused, if that was why


class Binder:
    def __init__(
        self,
        api: KubeApi,
        cache: ClusterCache,
        rules: RulesInForce,
        executor: Executor,
        events: EventRecorder,
        *,
        metrics: Metrics | None = None,
        memory: FilterMemory | None = None,
        dry_run: bool = False,
        journal_overdue_after: float = OVERDUE_AFTER_SECONDS,
        acting: Callable[[], bool] = lambda: True,
    ) -> None:
        # Whether this replica leads (extender.kube.lease.Leadership.acting): checked
        # before a bind starts, and again right before its write.
        self.acting = acting
        self.dry_run = dry_run  # --dry-run: every borrow only announced; the chains' policy can add namespaces
        # (UID, namespace, name) of pods already told "would borrow": one Event each, not one a retry.
        self._announced = Once[tuple[str, str, str]]()
        self._look_over_at = ANNOUNCED_LOOK_OVER
        self.api = api
        self.cache = cache
        self.rules = rules
        self.executor = executor
        self.events = events
        self.metrics = metrics if metrics is not None else Metrics()
        self._rejected_entries = JournalRejections(events, self.metrics.errors)  # forged journal entries
        self.memory = memory  # the nodes each pod's last filter call named: where it may run instead
        self._journal_dirty = threading.Event()  # a borrow failed: its journal entry may need finishing
        self.overdue = OverdueJournal(executor, events, self.metrics.journal, "borrow", journal_overdue_after)

    def bind(self, args: BindRequest) -> BindOutcome:
        if not self.acting():
            return self._refuse(NOT_LEADING)
        record = self._pod(args)
        if isinstance(record, str):
            return self._refuse(record)
        if record.request.uid != args.pod_uid:
            return self._refuse(
                f"pod {args.pod_namespace}/{args.pod_name} now has UID {record.request.uid}, not {args.pod_uid}: "
                "it was replaced; not binding"
            )
        if record.node:
            if record.node == args.node:
                return BindOutcome("")  # a retried bind that already succeeded
            return self._refuse(f"pod {record.request.key} is already bound to {record.node}")
        with self.cache.lock:
            # Once: the whole bind decides on one version of the rules, with the types kept free as the filter
            # saw them (core/headroom.py).
            rules = lending_rules(self.cache.store.snapshot(), self.rules.current())
            state = self.cache.ledger.node_state(args.node, for_pod=record.request.uid)
            state = node_after_nominated(state, record.request, self.cache.ledger.nominated(), rules)
            verdict = place(record.request, state, args.node, rules)
            if isinstance(verdict, Rejection):
                return self._refuse(f"node {args.node} no longer fits pod {record.request.key}: {verdict.reason}")
            needless = self._needless_borrow(record.request, verdict, rules)
            if needless is not None:
                return self._refuse(
                    f"not binding {record.request.key} to {args.node}: {needless.reason}; migchain never borrows "
                    "needlessly: kube-scheduler retries the pod",
                    verdict,
                )
            if verdict.borrows and self._dry_run(rules, record.request.namespace, verdict):
                return self._would_borrow(record, verdict)
            # A reservation left by an earlier try of unknown outcome: that try may
            # still have placed the pod, so a failure of this one puts it back.
            earlier = self.cache.ledger.reservation(record.request.uid)
            self.cache.reserve(record.request.uid, args.node, verdict.slices)
            self.cache.hold(record.request.uid)  # however slow the writes, the slices stay reserved meanwhile
        if not self.acting():
            # The lease may pass on while this bind decided: another replica may
            # give the slice away, so this one writes nothing.
            self.cache.settle(record.request.uid)
            self.cache.release(record.request.uid, earlier)
            return self._refuse(NOT_LEADING)
        try:
            if verdict.borrows:
                self._borrow(args, verdict)
            else:
                self._bind(args)
        except (ApiError, BorrowError) as error:
            if not isinstance(error, ApiError) or error.definitive:
                self.cache.release(record.request.uid, earlier)
            self.metrics.errors.count("binder", "api")
            if verdict.borrows:
                self._journal_dirty.set()
            return BindOutcome(f"placing {record.request.key} on {args.node} failed: {error}")
        except Exception as error:
            # The write may or may not have happened: keep the reservation until
            # the watch tells (or it expires), so its slices are not given twice.
            log.exception("placing %s on %s failed", record.request.key, args.node)
            self.metrics.errors.count("binder", "unexpected")
            if verdict.borrows:
                self._journal_dirty.set()
            return BindOutcome(f"placing {record.request.key} on {args.node} failed: {error}")
        finally:
            self.cache.settle(record.request.uid)
        if verdict.borrows:
            self.metrics.count_borrow(verdict)
        if self.memory is not None:
            self.memory.forget(record.request.uid)
        # A borrow is worth a line at info; an exact fit is the common case, one a pod: debug only.
        log.log(
            logging.INFO if verdict.borrows else logging.DEBUG,
            "placed %s on %s: %s",
            record.request.key,
            args.node,
            verdict.describe(),
            extra={"pod": record.request.key, "node": args.node, "borrowed": verdict.borrows},
        )
        return BindOutcome("", verdict)

    def _dry_run(self, rules: ChainRules, namespace: str, placement: Placement) -> bool:
        chains = {grant.chain for grant in placement.grants if grant.chain}
        return self.dry_run or rules.dry_run(chains, namespace)

    def _would_borrow(self, record: PodRecord, placement: Placement) -> BindOutcome:
        """Dry run: the borrow decided as usual, logged, counted and announced; no pod replaced, nothing bound.

        The refusal goes back to kube-scheduler, which puts it in the pod's
        FailedScheduling event and retries: the pod stays Pending, the would-be
        decision in plain sight.
        """
        message = f"would borrow on {placement.node}: {placement.describe()}"
        self.metrics.count_borrow(placement, dry_run=True)
        request = record.request
        if self._announced.first((request.uid, request.namespace, request.name)):
            if len(self._announced) >= self._look_over_at:
                self._forget_placed()
            log.info("dry run: %s %s", record.request.key, message, extra={"pod": record.request.key})
            self.events.record(
                pod_reference(record.request), "WouldBorrow", f"dry run: {message}; migchain replaces no pod in dry-run"
            )
        return BindOutcome(f"dry run: {message}; migchain replaces no pod in dry-run, so the pod stays pending")

    def _forget_placed(self) -> None:
        """Forget the announced pods that are no longer pending (placed, gone, replaced): a dry run lasts."""

        def pending(announced: tuple[str, str, str]) -> bool:
            uid, namespace, name = announced
            record = self.cache.pod(namespace, name)
            return record is not None and record.request.uid == uid and not record.node and not record.terminal

        self._announced.keep_only(pending)
        self._look_over_at = max(ANNOUNCED_LOOK_OVER, 2 * len(self._announced))

    def _needless_borrow(self, pod: PodRequest, placement: Placement, rules: ChainRules) -> Rejection | None:
        """Why a borrow on the chosen node would be needless now, or None. Call under the cache's lock.

        Only the nodes kube-scheduler named in the pod's last filter call count
        as elsewhere: those passed its own filters, which migchain cannot redo.
        Without them (the pod is not remembered) the bind borrows as before.
        """
        candidates = self.memory.candidates(pod.uid) if self.memory is not None and placement.borrows else ()
        if not candidates:
            return None
        snapshot = self.cache.ledger.snapshot().for_pod(pod.uid)
        verdict = refuse_needless_borrow(pod, placement, candidates, snapshot, rules)
        return verdict if isinstance(verdict, Rejection) else None

    def _refuse(self, reason: str, refused: Placement | None = None) -> BindOutcome:
        """A bind this state of the cluster does not allow (the pod changed, the node filled up, a needless borrow)."""
        self.metrics.errors.count("binder", "refused")
        return BindOutcome(reason, refused)

    def _bind(self, args: BindRequest) -> None:
        self.api.create(
            pod_path(args.pod_namespace, args.pod_name) + "/binding",
            {
                "apiVersion": "v1",
                "kind": "Binding",
                # The UID makes the API server refuse the bind if the pod was replaced meanwhile.
                "metadata": {"name": args.pod_name, "namespace": args.pod_namespace, "uid": args.pod_uid},
                "target": {"apiVersion": "v1", "kind": "Node", "name": args.node},
            },
        )

    def _borrow(self, args: BindRequest, placement: Placement) -> None:
        pod = self.api.get(pod_path(args.pod_namespace, args.pod_name))
        if pod["metadata"].get("uid") != args.pod_uid or pod["spec"].get("nodeName"):
            raise BorrowError(f"pod {args.pod_namespace}/{args.pod_name} changed before it could borrow")
        if controller_of(pod["metadata"]) is None and pod["metadata"].get("finalizers"):
            raise BorrowError(
                f"pod {args.pod_namespace}/{args.pod_name} gained finalizers: a bare pod with finalizers never borrows"
            )
        plan = plan_borrow(pod, placement, self.executor.loan_key)
        try:
            replacement = self.executor.borrow(plan)
        except FellBack as fell_back:
            self.events.record(pod, "BorrowFellBack", str(fell_back), "Warning")
            raise
        except Abandoned as abandoned:
            self.events.record(pod, "BorrowAbandoned", str(abandoned))
            raise
        message = plan.describe()
        self.events.record(pod, "Borrowed", f"{message}; replaced by pod {plan.replacement_name}")
        self.events.record(
            replacement, "Borrowed", f"{message}; replaces pod {plan.original_name} ({plan.original_uid})"
        )

    def _pod(self, args: BindRequest) -> PodRecord | str:
        record = self.cache.pod(args.pod_namespace, args.pod_name)
        if record is not None and record.request.uid == args.pod_uid:
            return record
        # The watch may be behind the scheduler's own informer: ask the API server.
        try:
            return pod_record(self.api.get(pod_path(args.pod_namespace, args.pod_name)))
        except (ApiError, ObjectError) as error:
            return f"cannot read pod {args.pod_namespace}/{args.pod_name}: {error}"

    # -- recovery -------------------------------------------------------------

    def keep_journal_finished(self, stop: threading.Event) -> None:
        """Finish journaled bare-pod borrows: once the cache is in sync, soon after a borrow fails, and every minute.

        A bare pod between its delete and its recreation exists only in the
        journal; whatever cut the borrow short (a crash, an API error, an
        original slow to go), this brings the pod back without a restart.
        """
        while not self.cache.wait_ready(timeout=60):
            log.warning("cluster cache not in sync yet; journal recovery waits")
        retry = RECOVERY_RETRY_SECONDS
        while not stop.is_set():
            if not self.acting():
                # The leader finishes the journal: a follower would race its borrows under way.
                stop.wait(RECOVERY_RETRY_SECONDS)
                continue
            self._journal_dirty.clear()  # before reading: a failure meanwhile brings another pass
            try:
                clean = self.recover()
            except Exception as error:  # the API server unreachable: this loop must outlive it
                self.metrics.errors.count("journal", "recovery")
                log.warning("cannot read the borrow journal: %s", error)
                clean = False
            try:
                self.overdue.check(clean)
            except Exception as error:
                log.warning("cannot read the age of the borrow journal's entries: %s", error)
            if clean:
                retry = RECOVERY_RETRY_SECONDS
                self._journal_dirty.wait(RECOVERY_SWEEP_SECONDS)
            else:
                # Not woken by failing borrows meanwhile: the next pass reads the whole journal anyway.
                stop.wait(retry)
                retry = min(retry * 2, RECOVERY_RETRY_MAX_SECONDS)

    def recover(self) -> bool:
        """Finish every journaled bare-pod borrow not under way in this process; False if one must wait.

        Entries are finished a few at a time, and none waits for its original
        to go: a slow one holds up no other.
        """
        entries = [
            (original, replacement)
            for original, replacement in self.executor.journal(rejected=self._rejected_entries)
            # Under way in this process right now: a failure sets the journal dirty.
            if not self.executor.in_flight(original["metadata"]["uid"])
        ]
        if not entries:
            return True
        with ThreadPoolExecutor(min(RECOVERY_WORKERS, len(entries)), thread_name_prefix="journal") as pool:
            return all(list(pool.map(self._recover_one, *zip(*entries, strict=True))))

    def _recover_one(self, original: Mapping[str, Any], replacement: Mapping[str, Any]) -> bool:
        """Finish one journaled borrow; False if it must wait (it stays journaled)."""
        metadata = original["metadata"]
        key = f"{metadata.get('namespace')}/{metadata['name']}"
        self.cache.hold(metadata["uid"])  # a recreation's reservation lasts as long as its writes
        try:
            outcome = self.executor.finish(original, replacement, functools.partial(self._reserve_for, replacement))
        except StillTerminating as waiting:
            log.info("journaled borrow of %s waits: %s", key, waiting)
            return False
        except Exception as error:  # an API error or a broken connection: the entry waits for the next pass
            if isinstance(error, ApiError) and error.definitive:
                self.cache.release(metadata["uid"])  # reserved for a recreation that certainly failed
            self.metrics.errors.count("journal", "recovery")
            log.error("journaled borrow of %s cannot be finished yet: %s; it stays journaled", key, error)
            return False
        finally:
            self.cache.settle(metadata["uid"])
        log.warning("journaled borrow of %s finished: %s", key, outcome)
        if outcome.startswith("recreated"):
            self.events.record(replacement, "BorrowRecovered", f"a borrow was cut short and migchain {outcome}")
        elif outcome.startswith("fell back"):
            self.cache.release(metadata["uid"])  # reserved for a replacement the API server refused
            self.events.record(original, "BorrowFellBack", outcome, "Warning")
        return True

    def _reserve_for(self, replacement: Mapping[str, Any]) -> bool:
        """Whether the replacement still fits its node exactly; if so, its slices are reserved."""
        request = pod_request(replacement)
        node = replacement["spec"].get("nodeName", "")
        replaced_uid = replacement["metadata"]["annotations"][REPLACED_UID_ANNOTATION]
        exact_only = dataclasses.replace(request, no_borrow="recreating a journaled borrow")
        with self.cache.lock:
            state = self.cache.ledger.node_state(node, for_pod=replaced_uid)
            verdict = place(exact_only, state, node, self.rules.current())
            if isinstance(verdict, Rejection):
                return False
            self.cache.reserve(replaced_uid, node, verdict.slices)
        return True
