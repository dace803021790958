"""The re-carver: while the returner leads, re-carves idle opted-in nodes for sustained unmet demand, through the
GPU Operator's MIG Manager (its ConfigMap and the node label `nvidia.com/mig.config`).

Planning is the pure `plan_recarves`; this module reads the cache, and carries
each plan out in steps, each written first into the record on the Node
(core/migconfig.py RECORD_ANNOTATION), so a leader killed at any step is
followed by one that finishes it: planned (nothing else written), labelled (the
config is in the ConfigMap and the label names it), then done when the node's
allocatable shows the new layout, or failed (the label put back) when the MIG
Manager refuses. Only whole idle nodes are ever re-carved: migchain cannot see
which GPU of a node a slice is on. With drain to re-carve (`RecarvePolicy.drain`,
--recarve-drain) a busy node is first cordoned (draining, `plan_drains`) until
it empties, its last holders evicted once `finish_drain` says waiting costs more.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import yaml

from extender.core.cluster import (
    MIG_CONFIG_STATE_LABEL,
    NodeState,
    ObjectError,
    PodRecord,
    Snapshot,
    controller_of,
    pod_mig_requests,
)
from extender.core.mig import short_name
from extender.core.migconfig import (
    ABANDONED,
    CONFIG_KEY,
    DONE,
    DRAINING,
    FAILED,
    FOREIGN_LABELS,
    LABELLED,
    MIG_CONFIG_LABEL,
    OPT_IN_LABEL,
    PLANNED,
    RECORD_ANNOTATION,
    RecarveRecord,
    config_name,
    idle,
    read_record,
    recent,
    refusal,
    shows,
    with_config,
)
from extender.core.recarve import (
    RECARVING_TAINT,
    CarvableNode,
    Recarve,
    RecarvePolicy,
    carvable_node,
    drain_cost,
    drain_waste,
    finish_drain,
    free_compute,
    gpus_of,
    plan_drains,
    plan_recarves,
    spare_slices,
    unmet_demand,
)
from extender.core.returns import borrowers_of, pending_requests, waiting_times
from extender.core.rules import ChainRules
from extender.kube.api import ApiError, KubeApi, path
from extender.kube.events import EventRecorder
from extender.kube.executor import EvictionBlocked, failpoint
from extender.kube.once import Once
from extender.metrics import ReturnerMetrics

log = logging.getLogger(__name__)

# A re-carve whose node does not show the new layout this long after its label was set is reported (an Event,
# counted as timed-out once); it stays in flight: the MIG Manager may still finish it.
TIMEOUT_SECONDS = 600.0
# A node to be re-carved is tainted first (RECARVING_TAINT, NoSchedule); its pods are read again this long after,
# once every bind kube-scheduler decided before it saw the taint has landed (a bind takes milliseconds to seconds).
QUIET_SECONDS = 5.0
# The cache shows our own patch of a node within milliseconds; a label that differs from the record longer than
# this was changed by someone else.
LABEL_SEEN_SECONDS = 30.0
# A drain evicts a holder only when its controller recreates it. Not a Job's (the Job counts the eviction as a
# failure of the pod) nor a static pod's mirror (owned by its Node: the kubelet, not the API, runs it).
UNEVICTABLE_OWNERS = ("Job", "Node")
# An Event on a refused opted-in node at most this often per node and reason.
REFUSALS_TOLD_PER_ROUND = 20


@dataclass(frozen=True)
class ConfigMapRef:
    """The MIG Manager's ConfigMap (the GPU Operator's ClusterPolicy migManager.config.name)."""

    namespace: str
    name: str

    @classmethod
    def parse(cls, text: str) -> ConfigMapRef:
        namespace, _, name = text.partition("/")
        if not namespace or not name:
            raise ValueError(f"expected NAMESPACE/NAME, got {text!r}")
        return cls(namespace, name)


def node_path(name: str) -> str:
    return path("api", "v1", "nodes", name)


def node_reference(name: str) -> dict[str, Any]:
    """What EventRecorder needs to put an Event on a Node (cluster-scoped: its Events go to `default`)."""
    return {"metadata": {"name": name, "namespace": "default"}}


class Recarver:
    """Called once a round by the returner's leader; keeps the records of the nodes it re-carves."""

    def __init__(
        self,
        api: KubeApi,
        events: EventRecorder,
        metrics: ReturnerMetrics,
        policy: RecarvePolicy,
        config_map: ConfigMapRef,
        *,
        dry_run: bool = False,
        foreign: Sequence[str] = FOREIGN_LABELS,
        settle_seconds: float = 0.0,
        quiet_seconds: float = QUIET_SECONDS,
        timeout_seconds: float = TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.time,
        evict: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.api = api
        self.events = events
        self.metrics = metrics
        self.policy = policy
        self.config_map = config_map
        self.dry_run = dry_run  # --recarve-dry-run: planned re-carves announced (WouldRecarve), nothing written
        self.foreign = tuple(foreign)
        self.settle_seconds = settle_seconds  # after a new config is written, before the label names it
        self.quiet_seconds = quiet_seconds  # after the taint, before the node's pods are read again
        self.timeout_seconds = timeout_seconds
        self.clock = clock
        # Evicts one pod through the Eviction API (Executor.evict: PodDisruptionBudgets hold, EvictionBlocked on
        # 429); drains evict nothing without it.
        self.evict = evict
        self._records: dict[str, RecarveRecord] | None = None  # node -> its record; None: read them afresh
        self._stale = False  # a write whose outcome is unknown: read the records afresh next round
        self._announced = Once[str]()  # dry run: (node, config) already announced
        self._refusals = Once[str]()  # (node, reason) already reported
        self._timed_out = Once[str]()  # (node, start) already reported late
        self._told = 0  # refusals reported this round
        self._settles: dict[str, float] = {}  # config -> when it may be named by a label (just written)
        self._waits = Once[str]()  # (node, why) a drain waits rather than evicts, already reported

    def new_term(self) -> None:
        """A new term of leadership: the records are read afresh from the Nodes before anything is done."""
        self._records = None

    def round(
        self,
        snapshot: Snapshot,
        records: Sequence[PodRecord],
        rules: ChainRules,
        *,
        schedulers: Sequence[str],
        leading: Callable[[], bool],
    ) -> None:
        if self._records is None or self._stale:
            self._records, self._stale = self._read_records(), False
        now = self.clock()
        for name, record in list(self._records.items()):
            if record.in_flight and leading():
                self._follow(name, record, snapshot.nodes.get(name), now)
        in_flight = [record for record in self._records.values() if record.in_flight]
        waited = waiting_times(records, now)
        pending = pending_requests(records, schedulers)
        opted_in = [node for node in snapshot.nodes.values() if node.labels.get(OPT_IN_LABEL) == "true"]
        unmet = unmet_demand(snapshot, pending, rules, waited, self.policy, carvable=opted_in)
        for record in in_flight:  # what a re-carve under way will serve is not asked of another node
            for resource, count in record.serves.items():
                unmet[resource] = unmet.get(resource, 0) - count
        unmet = {resource: count for resource, count in unmet.items() if count > 0}
        draining = {name for name, record in self._records.items() if record.draining}
        if not unmet and not draining:
            return
        candidates = self._candidates(snapshot, records, now)
        lent = [borrower.loan.borrowed for borrower in borrowers_of(records, rules)]
        spare = spare_slices(snapshot, pending, lent, self.policy)
        if self.dry_run:
            for plan in plan_recarves(candidates, unmet, now, self.policy, spare=spare):
                self._announce(plan)
            return
        # A draining node whose last holders are worth evicting is planned as if idle: they are evicted only when
        # its re-carve would start now, which it does once they are gone (the node idle, a later round).
        ending = {node.name for node in candidates if self.policy.drain and finish_drain(node)}
        emptied = [replace(n, idle=True, held={}, drain_cost=0.0) if n.name in ending else n for n in candidates]
        taken = set()
        for plan in plan_recarves(emptied, unmet, now, self.policy, spare=spare):
            if not leading():
                return
            if plan.node in ending:
                self._evict_holders(plan.node, next(n for n in candidates if n.name == plan.node))
            else:
                self._start(plan, snapshot.nodes[plan.node], now)
            taken.add(plan.node)
            for resource, count in plan.serves.items():
                unmet[resource] = unmet.get(resource, 0) - count
        unmet = {resource: count for resource, count in unmet.items() if count > 0}
        rest = [replace(node, in_flight=node.in_flight or node.name in taken) for node in candidates]
        drains = {drain.node: drain for drain in plan_drains(rest, unmet, now, self.policy, spare=spare)}
        for name in sorted(draining - set(drains) - taken):
            if leading():
                self._undrain(name, snapshot.nodes.get(name))
        for name, drain in sorted(drains.items()):
            if leading() and name in snapshot.nodes:
                self._drain(drain, snapshot.nodes[name], now)

    # -- planning ---------------------------------------------------------------

    def _candidates(self, snapshot: Snapshot, records: Sequence[PodRecord], now: float) -> list[CarvableNode]:
        """Every opted-in node the planner may look at: idle or busy (a busy one is never planned, only drained),
        refused ones left out with one Event each."""
        assert self._records is not None
        candidates = []
        self._told = 0
        started = _started_by_node(records)
        for node in snapshot.nodes.values():
            if node.labels.get(OPT_IN_LABEL) != "true":
                continue
            record = self._records.get(node.name)
            why = refusal(node, self.foreign) if record is None or not record.in_flight else ""
            if why:
                self._refused(node.name, why)
                continue
            in_flight = bool(record and record.in_flight)
            history = recent(record.history, now) if record else ()
            carvable = carvable_node(node, idle(node, snapshot), history, in_flight)
            if carvable is None and in_flight:  # mid-change: counted against the in-flight limit all the same
                carvable = CarvableNode(node.name, node.gpu_product, 0, {}, False, history, True)
            if carvable is None:
                self._refused(node.name, "its MIG slices do not split evenly over its GPUs: its layout is unknown")
                continue
            held = {resource: count for resource, count in node.used.items() if count}
            carvable = replace(carvable, held=held)
            if record is not None and record.draining:
                unused = free_compute(node)
                carvable = replace(
                    carvable,
                    draining=True,
                    drain_waste=drain_waste(record.waste, record.waste_at, record.unused, unused, now),
                    drain_cost=drain_cost(started.get(node.name, ()), now),
                )
            candidates.append(carvable)
        # A re-carve under way on a node no longer opted in (or gone from the cache) still counts against the limit.
        listed = {candidate.name for candidate in candidates}
        for name, record in self._records.items():
            if record.in_flight and name not in listed:
                candidates.append(CarvableNode(name, "", 0, {}, False, record.history, True))
        return candidates

    def _refused(self, name: str, why: str) -> None:
        """One Event per node and reason (a few a round), and a log line."""
        if self._told < REFUSALS_TOLD_PER_ROUND and self._refusals.first(f"{name}\0{why}"):
            self._told += 1
            log.info("node %s is not re-carved: %s", name, why, extra={"node": name})
            self.events.record(node_reference(name), "RecarveRefused", f"not re-carved: {why}", "Warning", about="Node")

    def _announce(self, plan: Recarve) -> None:
        config = config_name(plan.layout)
        if not self._announced.first(f"{plan.node}\0{config}"):
            return
        message = f"dry run: would re-carve every GPU as {config} ({_layout_text(plan.layout)}): {plan.reason}"
        self.metrics.count_recarve("dry-run")
        log.info("node %s %s", plan.node, message, extra={"node": plan.node})
        self.events.record(node_reference(plan.node), "WouldRecarve", message, about="Node")

    # -- the steps ------------------------------------------------------------

    def _start(self, plan: Recarve, node: NodeState, now: float) -> None:
        """Record the plan on the Node, then carry it out: nothing is written before the record is."""
        assert self._records is not None
        record = _new_record(PLANNED, plan, node, self._records.get(plan.node), now)
        if not self._write(plan.node, record, taint=True):
            return
        log.info("re-carving %s as %s: %s", plan.node, record.config, plan.reason, extra={"node": plan.node})
        self.events.record(
            node_reference(plan.node),
            "Recarving",
            f"re-carving every GPU as {record.config} ({_layout_text(record.layout)}): {plan.reason}",
            about="Node",
        )
        failpoint("recarve-after-record")
        self._label(plan.node, record, now)  # at once when there is no quiet time to wait out

    def _label(self, name: str, record: RecarveRecord, now: float) -> None:
        """Planned -> labelled: the node still idle (read afresh), the config in the ConfigMap, the label set."""
        if now < record.started + self.quiet_seconds:
            return  # binds kube-scheduler decided before the taint may still land: the pods are read after them
        try:
            busy = self._holders(name)
        except ApiError as error:
            self.metrics.errors.count("recarver", "api")
            log.warning("cannot list the pods on %s: %s; the re-carve waits", name, error)
            return
        if busy:
            self._end(name, record, ABANDONED, f"a pod took a slice on it first ({busy}); nothing changed", "abandoned")
            return
        try:
            self._ensure_config(record.config, record.layout, now)
        except (ApiError, ValueError, yaml.YAMLError) as error:
            self.metrics.errors.count("recarver", "config")
            if isinstance(error, ApiError) and (not error.definitive or error.status == 409):
                log.warning("cannot write config %s yet: %s; the re-carve waits", record.config, error)
                return
            # No ConfigMap, no access to it, or a document the MIG Manager would not read: waiting would keep the
            # node tainted for nothing. Nothing was changed but the record and the taint.
            where = f"{self.config_map.namespace}/{self.config_map.name}"
            self._end(name, record, FAILED, f"the MIG Manager's ConfigMap {where} cannot be written: {error}", "failed")
            return
        if self._settles.get(record.config, 0.0) > now:
            return  # the MIG Manager reads its ConfigMap through a volume: give the new config time to arrive
        failpoint("recarve-after-config")
        labelled = replace(record, step=LABELLED, labelled=now)
        if self._write(name, labelled, labels={MIG_CONFIG_LABEL: record.config}, taint=True):
            failpoint("recarve-after-label")

    def _follow(self, name: str, record: RecarveRecord, node: NodeState | None, now: float) -> None:
        """One step of a re-carve in flight, from what the cache shows of its node."""
        if node is None:
            self._end(name, record, ABANDONED, "the node is gone", "abandoned", write=False)
            return
        if record.step == PLANNED:
            self._label(name, record, now)
            return
        if node.labels.get(MIG_CONFIG_LABEL) != record.config:
            if now - record.labelled < LABEL_SEEN_SECONDS:
                return  # the watch has not shown the label written with the record yet
            # The record and the label went in one patch: someone changed the label since.
            self._end(
                name,
                record,
                ABANDONED,
                f"its {MIG_CONFIG_LABEL} label was changed to {node.labels.get(MIG_CONFIG_LABEL)!r} by someone else",
                "abandoned",
            )
            return
        state = node.labels.get(MIG_CONFIG_STATE_LABEL)
        gpus = gpus_of(node)
        if state == "success" and gpus and shows(node, record.layout, gpus):
            seconds = max(0.0, now - record.labelled)
            self.metrics.recarve_seconds.observe(seconds)
            self._end(name, record, DONE, f"every GPU carved as {record.config} after {seconds:.0f}s", "applied")
            return
        if state == "failed":
            labels = {MIG_CONFIG_LABEL: record.previous} if record.previous else None
            self._end(
                name,
                record,
                FAILED,
                f"the MIG Manager failed to apply {record.config}; its label is put "
                f"back to {record.previous or '(none)'}",
                "failed",
                labels=labels,
            )
            return
        if now - record.labelled > self.timeout_seconds and self._timed_out.first(f"{name}\0{record.labelled}"):
            self.metrics.count_recarve("timed-out")
            message = f"{record.config} not in the node's allocatable {now - record.labelled:.0f}s after labelling"
            log.warning("re-carve of %s: %s", name, message, extra={"node": name})
            self.events.record(node_reference(name), "RecarveSlow", message, "Warning", about="Node")

    def _end(
        self,
        name: str,
        record: RecarveRecord,
        step: str,
        reason: str,
        outcome: str,
        *,
        labels: Mapping[str, str] | None = None,
        write: bool = True,
    ) -> None:
        ended = record.ended(step, reason)
        if write and not self._write(name, ended, labels=labels, taint=False):
            return  # tried again next round: the record still says in flight
        assert self._records is not None
        self._records[name] = ended
        self.metrics.count_recarve(outcome)
        warning = step != DONE
        log.log(
            logging.WARNING if warning else logging.INFO,
            "re-carve of %s %s: %s",
            name,
            outcome,
            reason,
            extra={"node": name},
        )
        if write:
            self.events.record(
                node_reference(name),
                "Recarved" if step == DONE else "RecarveFailed",
                reason,
                "Warning" if warning else "Normal",
                about="Node",
            )

    # -- drain to re-carve -----------------------------------------------------

    def _drain(self, plan: Recarve, node: NodeState, now: float) -> None:
        """Cordon a busy node for a re-carve (record and taint in one patch), or, draining already, write a new
        reading of its unused slices when their count changed (the waste `finish_drain` weighs)."""
        assert self._records is not None
        earlier = self._records.get(plan.node)
        unused = free_compute(node)
        if earlier is not None and earlier.draining:
            if unused == earlier.unused:
                return
            waste = drain_waste(earlier.waste, earlier.waste_at, earlier.unused, unused, now)
            self._write(plan.node, replace(earlier, waste=waste, waste_at=now, unused=unused), taint=True)
            return
        record = replace(_new_record(DRAINING, plan, node, earlier, now), drained=now, waste_at=now, unused=unused)
        if not self._write(plan.node, record, taint=True):
            return
        log.info(
            "draining %s to re-carve it as %s: %s", plan.node, record.config, plan.reason, extra={"node": plan.node}
        )
        self.events.record(
            node_reference(plan.node),
            "Draining",
            f"cordoned ({RECARVING_TAINT}:NoSchedule) to re-carve every GPU as {record.config} once its pods are "
            f"gone: {plan.reason}",
            about="Node",
        )
        failpoint("recarve-after-drain")

    def _undrain(self, name: str, node: NodeState | None) -> None:
        """A drain no longer worth it (the demand went away, or another node serves it): the taint goes, the record
        says abandoned, the node as it was."""
        assert self._records is not None
        record = self._records[name]
        ended = record.ended(ABANDONED, "drain given up: no sustained unmet demand left for its re-carve")
        if node is not None and not self._write(name, ended, taint=False):
            return
        self._records[name] = ended
        self.metrics.count_recarve("drain-abandoned")
        log.info("node %s: %s", name, ended.reason, extra={"node": name})
        if node is not None:
            self.events.record(node_reference(name), "DrainAbandoned", ended.reason, about="Node")

    def _evict_holders(self, name: str, node: CarvableNode) -> None:
        """Evict the pods holding MIG slices on a draining node, read afresh, through the Eviction API: each one's
        controller recreates it elsewhere or, once re-carved, here. Only when every one may be: a pod with no
        controller (it would be lost) or a Job's (an eviction counts as its failure) is waited for instead, and
        nothing is evicted. A PodDisruptionBudget that allows no disruption now (429) is waited for: tried again
        next round, never forced."""
        if self.evict is None:
            return
        try:
            pods = self._pods_on(name)
        except ApiError as error:
            self.metrics.errors.count("recarver", "api")
            log.warning("cannot list the pods on %s: %s; the drain waits", name, error)
            return
        holders = []
        for pod in pods:
            metadata = pod.get("metadata") or {}
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") or metadata.get("deletionTimestamp"):
                continue
            try:
                holds = bool(pod_mig_requests(pod.get("spec") or {}))
            except ObjectError:
                holds = True
            if not holds:
                continue
            controller = controller_of(metadata)
            if controller is None or controller.get("kind") in UNEVICTABLE_OWNERS:
                why = (
                    "it has no controller to recreate it"
                    if controller is None
                    else f"its owner is a {controller.get('kind')}"
                )
                self._drain_waits(name, f"pod {metadata.get('namespace')}/{metadata.get('name')}: {why}")
                return
            holders.append(pod)
        evicted, blocked = [], []
        for pod in holders:
            metadata = pod["metadata"]
            who = f"{metadata.get('namespace')}/{metadata.get('name')}"
            try:
                self.evict(pod)
            except EvictionBlocked as error:
                blocked.append(who)
                self._drain_waits(name, f"pod {who}: its PodDisruptionBudget allows no disruption now ({error})")
                continue
            except ApiError as error:
                self.metrics.errors.count("recarver", "api")
                log.warning("cannot evict %s to drain %s: %s; tried again next round", who, name, error)
                continue
            evicted.append(who)
            self.metrics.drain_evictions.inc()
            failpoint("recarve-after-evict")
        if evicted:
            message = (
                f"evicted {len(evicted)} pod(s) to re-carve the node: {', '.join(evicted)}; its free slices had sat "
                f"unused {node.drain_waste:.0f} compute-slice-seconds, at least the {node.drain_cost:.0f} their "
                "eviction loses"
            )
            log.info("node %s: %s", name, message, extra={"node": name})
            self.events.record(node_reference(name), "DrainEvicted", message, about="Node")

    def _drain_waits(self, name: str, why: str) -> None:
        if self._waits.first(f"{name}\0{why}"):
            log.info("drain of %s waits: %s", name, why, extra={"node": name})
            self.events.record(node_reference(name), "DrainWaits", f"not evicted: {why}", "Warning", about="Node")

    # -- writes ---------------------------------------------------------------

    def _write(self, name: str, record: RecarveRecord, labels: Mapping[str, str] | None = None, *, taint: bool) -> bool:
        """The record, labels and the RECARVING_TAINT (on, or off) on the Node in one patch; False when it did not
        land for sure: the next round reads the node again.

        A Node's taints are one list to a patch (no merge key): the node is read
        first and patched with its resourceVersion, so a taint someone else sets
        meanwhile is never lost (409: tried again next round).
        """
        assert self._records is not None
        try:
            current = self.api.get(node_path(name))
            others = [t for t in (current.get("spec") or {}).get("taints") or [] if t.get("key") != RECARVING_TAINT]
            mark = {"key": RECARVING_TAINT, "value": record.config, "effect": "NoSchedule"}
            taints = [*others, mark] if taint else others
            metadata: dict[str, Any] = {
                "resourceVersion": current["metadata"]["resourceVersion"],
                "annotations": {RECORD_ANNOTATION: record.text()},
            }
            if labels:
                metadata["labels"] = dict(labels)
            self.api.patch(node_path(name), {"metadata": metadata, "spec": {"taints": taints or None}})
        except ApiError as error:
            self.metrics.errors.count("recarver", "api")
            log.warning("cannot write the re-carve record of %s: %s", name, error)
            if error.status == 0:
                self._stale = True  # it may have landed: read every record again before the next round
            return False
        self._records[name] = record
        return True

    def _ensure_config(self, name: str, layout: Mapping[str, int], now: float) -> None:
        """The named config in the MIG Manager's ConfigMap, every other config kept; a conflicting write (409)
        leaves it for the next round."""
        resource = path("api", "v1", "namespaces", self.config_map.namespace, "configmaps", self.config_map.name)
        configmap = self.api.get(resource)
        data = configmap.get("data") or {}
        document = yaml.safe_load(data.get(CONFIG_KEY) or "") if data.get(CONFIG_KEY) else None
        updated = with_config(document, name, layout)
        if updated is None:
            return
        text = yaml.safe_dump(updated, sort_keys=False)
        version = configmap["metadata"].get("resourceVersion")
        self.api.patch(resource, {"metadata": {"resourceVersion": version}, "data": {CONFIG_KEY: text}})
        self._settles[name] = now + self.settle_seconds
        log.info("wrote MIG config %s into %s/%s", name, self.config_map.namespace, self.config_map.name)

    def _holders(self, name: str) -> str:
        """Pods holding a MIG slice on the node, read afresh from the API server (not the cache)."""
        holders = []
        for pod in self._pods_on(name):
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            try:
                holds = bool(pod_mig_requests(pod.get("spec") or {}))
            except ObjectError:
                holds = True  # a request that cannot be read may hold a slice: never re-carve under it
            if holds:
                holders.append(f"{pod['metadata'].get('namespace')}/{pod['metadata'].get('name')}")
        return ", ".join(sorted(holders)[:5])

    def _pods_on(self, name: str) -> list[dict[str, Any]]:
        """The pods bound to the node, read afresh from the API server (not the cache)."""
        pods, _ = self.api.list_all("/api/v1/pods", fieldSelector=f"spec.nodeName={name}")
        return pods

    def _read_records(self) -> dict[str, RecarveRecord]:
        """Every opted-in node's record, from the API server; an unreadable one is reported and left alone."""
        nodes, _ = self.api.list_all("/api/v1/nodes", labelSelector=f"{OPT_IN_LABEL}=true")
        records = {}
        for node in nodes:
            name = node["metadata"]["name"]
            text = (node["metadata"].get("annotations") or {}).get(RECORD_ANNOTATION)
            if text is None:
                continue
            record = read_record(text)
            if isinstance(record, str):
                self.metrics.errors.count("recarver", "record")
                log.warning("node %s: its re-carve record is %s; the node is not re-carved", name, record)
                records[name] = RecarveRecord(
                    step=FAILED, reason=f"record {record}", history=(self.clock(),)
                )  # cooled down, not followed
                continue
            if record.in_flight:
                log.warning(
                    "node %s: re-carve to %s found %s; finishing it",
                    name,
                    record.config,
                    record.step,
                    extra={"node": name},
                )
            records[name] = record
        return records


def _started_by_node(records: Sequence[PodRecord]) -> dict[str, list[tuple[Any, float]]]:
    """Per node, each pod holding MIG slices there: its slices, and when it was created (the cache keeps no start
    time; creation is earlier, so the work an eviction loses is never understated)."""
    started: dict[str, list[tuple[Any, float]]] = {}
    for record in records:
        if not record.holds_slices:
            continue
        try:
            created = datetime.datetime.fromisoformat(record.created).timestamp()
        except ValueError:
            created = 0.0  # unknown: counted as running since long ago, the costliest to evict
        started.setdefault(record.node, []).append((record.request.mig, created))
    return started


def _new_record(step: str, plan: Recarve, node: NodeState, earlier: RecarveRecord | None, now: float) -> RecarveRecord:
    """The record of a re-carve (or a drain for one) that starts now at `step`: what it will do, from what."""
    return RecarveRecord(
        step=step,
        config=config_name(plan.layout),
        layout=dict(plan.layout),
        previous=node.labels.get(MIG_CONFIG_LABEL, ""),
        serves=dict(plan.serves),
        started=now,
        history=recent(earlier.history, now) if earlier else (),
        reason=plan.reason,
    )


def _layout_text(layout: Mapping[str, int]) -> str:
    return ", ".join(f"{count}x {short_name(resource)}" for resource, count in sorted(layout.items()))
