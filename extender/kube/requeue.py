"""The requeuer: asks kube-scheduler to retry a pod migchain refused while its view of the cluster lagged.

kube-scheduler parks a pod the extender refused on every node until the next
cluster event, and retries it within milliseconds of its own informer seeing
one. When migchain's watch has not applied that event yet, it refuses again;
the pod then stays parked with its slice free until an unrelated event comes,
or the scheduler's flush of unschedulable pods (5 minutes). Any update of the
pod is such an event. So when a pod refused on one snapshot fits a later one,
and kube-scheduler has not asked about it again within a short grace (a retry
it makes on its own costs no write), this patches a migchain annotation on it.

Only a nudge: a failed patch is logged and counted, retried a few times,
never forever; the scheduler's own flush stays the backstop. It runs in a
thread of its own, neither the watch's nor a request's.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import replace

from extender.core.cluster import ANNOTATION_PREFIX, PodRequest, Snapshot
from extender.core.decide import cheapest_cost
from extender.core.rules import ChainRules
from extender.filter_memory import Filtered, FilterMemory
from extender.kube.api import ApiError, KubeApi
from extender.kube.cache import ClusterCache
from extender.kube.executor import pod_path
from extender.metrics import Metrics
from extender.reload import RulesInForce

log = logging.getLogger(__name__)

REQUEUED_ANNOTATION = ANNOTATION_PREFIX + "requeued"  # when migchain last asked kube-scheduler to retry the pod

# kube-scheduler retries a pod within milliseconds of an event it sees; this
# long after migchain's view changed, a pod not asked about again is parked.
GRACE_SECONDS = 0.25
# A patch that failed for now (no answer, 429, 5xx) is tried again after 1 s,
# then 2 s; then the requeuer gives up on it.
RETRY_SECONDS = 1.0
MAX_ATTEMPTS = 3
# Even with nothing new, look this often (entries expire in the memory).
IDLE_SECONDS = 30.0
# At most one pass this often: in a burst the cache publishes hundreds of views a
# second, and a pass per view cost a thread switch per watch event. Well inside
# the grace, so a pod is still asked about on time.
MIN_PASS_SECONDS = 0.05


class Requeuer:
    def __init__(
        self,
        api: KubeApi,
        cache: ClusterCache,
        memory: FilterMemory,
        rules: RulesInForce,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        grace: float = GRACE_SECONDS,
    ) -> None:
        self.api = api
        self.cache = cache
        self.memory = memory
        self.rules = rules
        self.metrics = metrics
        self.clock = clock
        self.grace = grace

    def run(self, stop: threading.Event) -> None:
        """Look at the refused pods whenever the cache publishes, a refusal comes in, or a retry falls due."""
        while not stop.is_set():
            self.cache.changed.wait(self._seconds_to_next())
            self.cache.changed.clear()  # before the pass: a change during it brings another
            if stop.is_set():
                return
            try:
                self.run_once()
            except Exception:  # a bug: this thread must outlive it
                log.exception("requeue pass failed")
                self.metrics.errors.count("requeue", "unexpected")
                stop.wait(RETRY_SECONDS)
            stop.wait(MIN_PASS_SECONDS)  # news meanwhile keeps `changed` set: the next pass sees it all

    def run_once(self) -> None:
        snapshot = self.cache.store.snapshot()
        rules = self.rules.current()
        for entry in self.memory.refused():
            self._consider(entry, snapshot, rules)

    def _seconds_to_next(self) -> float:
        due = [entry.due for entry in self.memory.refused() if entry.due is not None]
        return IDLE_SECONDS if not due else min(IDLE_SECONDS, max(0.0, min(due) - self.clock()))

    def _consider(self, entry: Filtered, snapshot: Snapshot, rules: ChainRules) -> None:
        pod = entry.pod
        if not self._pending(pod):
            self.memory.forget(pod.uid, entry)
            return
        now = self.clock()
        if entry.due is None and entry.seen_in(snapshot):
            return  # nothing new since it was refused
        if entry.due is not None and entry.due > now:
            return  # waiting out the grace: kube-scheduler may retry it on its own
        seen = weakref.ref(snapshot)
        if cheapest_cost(pod, entry.candidates, snapshot.for_pod(pod.uid), rules) is None:
            self.memory.update(entry, replace(entry, seen=seen, due=None))
        elif entry.due is None:
            self.memory.update(entry, replace(entry, seen=seen, due=now + self.grace))
        else:
            self._nudge(replace(entry, seen=seen), entry, now)

    def _pending(self, pod: PodRequest) -> bool:
        """Whether the pod still waits to be placed, as far as the cache knows.

        Unknown to the cache counts as waiting: the watch may lag on the pod
        itself, and the patch's UID precondition keeps a gone pod safe.
        """
        record = self.cache.pod(pod.namespace, pod.name)
        if record is None:
            return True
        return record.request.uid == pod.uid and not record.node and not record.terminal and not record.terminating

    def _nudge(self, entry: Filtered, old: Filtered, now: float) -> None:
        pod = entry.pod
        stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
        try:
            # A merge patch naming the UID: the API server refuses it (422, the
            # UID is immutable) if the pod was replaced by another of that name.
            self.api.patch(
                pod_path(pod.namespace, pod.name),
                {"metadata": {"uid": pod.uid, "annotations": {REQUEUED_ANNOTATION: stamp}}},
            )
        except ApiError as error:
            if error.definitive:
                outcome = "gone" if error.status in (404, 409, 422) else "refused"
                self.metrics.requeues.labels(outcome).inc()
                log.info("not asking kube-scheduler to retry %s: %s", pod.key, error, extra={"pod": pod.key})
                self.memory.forget(pod.uid, old)
                return
            self.metrics.errors.count("requeue", "api")
            attempts = entry.attempts + 1
            if attempts >= MAX_ATTEMPTS:
                self.metrics.requeues.labels("failed").inc()
                log.warning(
                    "could not ask kube-scheduler to retry %s (%d tries): %s; it waits for the next cluster event",
                    pod.key,
                    attempts,
                    error,
                    extra={"pod": pod.key},
                )
                self.memory.forget(pod.uid, old)
                return
            self.memory.update(old, replace(entry, attempts=attempts, due=now + RETRY_SECONDS * 2 ** (attempts - 1)))
            return
        self.metrics.requeues.labels("requeued").inc()
        log.info(
            "asked kube-scheduler to retry %s: refused while migchain's view lagged, it fits now",
            pod.key,
            extra={"pod": pod.key},
        )
        self.memory.forget(pod.uid, old)
