"""The binder: re-decides the placement on the current state, reserves its slices, then binds through the API.

Deciding and reserving happen under the cache's lock, so two binds can never
take the same free slice; the API call happens outside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from extender.core.cluster import BindRequest, ObjectError, PodRecord, pod_record
from extender.core.decide import Placement, Rejection, place
from extender.core.rules import ChainRules
from extender.kube.api import ApiError, KubeApi, path
from extender.kube.cache import ClusterCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BindOutcome:
    error: str  # "" on success: the field kube-scheduler reads
    placement: Placement | None = None


class Binder:
    def __init__(self, api: KubeApi, cache: ClusterCache, rules: ChainRules) -> None:
        self.api = api
        self.cache = cache
        self.rules = rules

    def bind(self, args: BindRequest) -> BindOutcome:
        record = self._pod(args)
        if isinstance(record, str):
            return BindOutcome(record)
        if record.request.uid != args.pod_uid:
            return BindOutcome(
                f"pod {args.pod_namespace}/{args.pod_name} now has UID {record.request.uid}, not {args.pod_uid}: "
                "it was replaced; not binding"
            )
        if record.node:
            if record.node == args.node:
                return BindOutcome("")  # a retried bind that already succeeded
            return BindOutcome(f"pod {record.request.key} is already bound to {record.node}")
        with self.cache.lock:
            verdict = place(record.request, self.cache.ledger.node_state(args.node), args.node, self.rules)
            if isinstance(verdict, Rejection):
                return BindOutcome(f"node {args.node} no longer fits pod {record.request.key}: {verdict.reason}")
            if verdict.borrows:
                return BindOutcome(f"node {args.node} fits pod {record.request.key} only by borrowing: not bound")
            self.cache.reserve(record.request.uid, args.node, verdict.slices)
        try:
            self.api.create(
                path("api", "v1", "namespaces", args.pod_namespace, "pods", args.pod_name, "binding"),
                {
                    "apiVersion": "v1",
                    "kind": "Binding",
                    # The UID makes the API server refuse the bind if the pod was replaced meanwhile.
                    "metadata": {"name": args.pod_name, "namespace": args.pod_namespace, "uid": args.pod_uid},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": args.node},
                },
            )
        except ApiError as error:
            if error.definitive:
                self.cache.release(record.request.uid)
            return BindOutcome(f"binding {record.request.key} to {args.node} failed: {error}")
        except Exception as error:
            # The bind may or may not have happened: keep the reservation until
            # the watch tells (or it expires), so its slices are not given twice.
            return BindOutcome(f"binding {record.request.key} to {args.node} failed: {error}")
        log.info("bound %s to %s: %s", record.request.key, args.node, verdict.describe())
        return BindOutcome("", verdict)

    def _pod(self, args: BindRequest) -> PodRecord | str:
        record = self.cache.pod(args.pod_namespace, args.pod_name)
        if record is not None and record.request.uid == args.pod_uid:
            return record
        # The watch may be behind the scheduler's own informer: ask the API server.
        try:
            return pod_record(self.api.get(path("api", "v1", "namespaces", args.pod_namespace, "pods", args.pod_name)))
        except ApiError as error:
            return f"cannot read pod {args.pod_namespace}/{args.pod_name}: {error}"
        except ObjectError as error:
            return f"cannot read pod {args.pod_namespace}/{args.pod_name}: {error}"
