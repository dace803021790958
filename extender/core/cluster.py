"""Pods, nodes and the cluster snapshot as the core sees them, read from Kubernetes object dicts; no I/O."""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from extender.core.constraints import (
    ANYWHERE,
    HARD_TAINT_EFFECTS,
    UNSCHEDULABLE_TAINT,
    NodeConstraints,
    Taint,
    node_constraints,
)
from extender.core.mig import is_mig_resource
from extender.core.rules import OwnerKind
from extender.core.untrusted import excerpt, kept

# Annotation keys: one domain prefix, documented in README.
ANNOTATION_PREFIX = "migchain.io/"
BORROW_ANNOTATION = ANNOTATION_PREFIX + "borrow"  # "false" opts a pod out of borrowing
REPLACED_UID_ANNOTATION = ANNOTATION_PREFIX + "replaced-uid"  # on a borrower: the pod it replaced

# The migchain.io annotations the cache keeps of a pod, each with the longest
# value kept (longer ones are noted, not kept: see core/untrusted.py `kept`):
# the loan record and its signature (core/loan.py) and the pod's return
# settings (core/returns.py).
# Nothing else under the prefix is kept: both caches hold every pod, and a pod
# may carry 256 KiB of annotations. A real loan record is a few hundred bytes;
# original-resources grows by about 100 bytes per container that asks for MIG.
KEPT_ANNOTATIONS: Mapping[str, int] = {
    ANNOTATION_PREFIX + "original-requests": 1024,
    ANNOTATION_PREFIX + "borrowed-requests": 1024,
    ANNOTATION_PREFIX + "chain": 1024,
    ANNOTATION_PREFIX + "steps": 16,
    ANNOTATION_PREFIX + "original-resources": 8192,
    REPLACED_UID_ANNOTATION: 128,
    ANNOTATION_PREFIX + "restarts": 16,
    ANNOTATION_PREFIX + "max-restarts": 16,
    ANNOTATION_PREFIX + "return": 64,
    ANNOTATION_PREFIX + "loan-signature": 128,  # "v1:" and 64 hex digits
}

# Controllers that recreate their pods by name or by node from their own
# template: a replacement would be fought (StatefulSet recreates the name it
# owns; DaemonSet one pod per node), so their pods never borrow.
PINNED_OWNERS = ("StatefulSet", "DaemonSet")

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
MIG_CONFIG_STATE_LABEL = "nvidia.com/mig.config.state"

# The scheduler profile scheduler-config.yaml serves: pods naming it are the
# ones migchain places, so the only ones whose wait a return can end.
MIGCHAIN_SCHEDULER = "migchain-scheduler"
DEFAULT_SCHEDULER = "default-scheduler"  # what the API server writes into a pod that names none
MAX_GATES_KEPT = 8  # scheduling gates named in explanations; any gate at all counts


class ObjectError(ValueError):
    """A pod or node object that cannot be read; the message names the field."""


MigCounts = tuple[tuple[str, int], ...]  # sorted (resource, count) pairs: hashable and ordered


@dataclass(frozen=True)
class PodRequest:
    """What a pod asks of the extender: its MIG slices, and whether it may borrow."""

    namespace: str
    name: str
    uid: str
    mig: MigCounts
    no_borrow: str = ""  # why this pod may not borrow; empty when it may
    constraints: NodeConstraints = ANYWHERE  # which nodes it may run on
    priority: int = 0  # spec.priority, which admission fills from the PriorityClass; 0 without one
    owner: OwnerKind | None = (
        None  # its controller's apiVersion and kind (which borrow: rules.SAFE_OWNER_KINDS); None: bare
    )

    @property
    def may_borrow(self) -> bool:
        return not self.no_borrow

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def may_run_on(self, node: NodeState) -> bool:
        """Whether kube-scheduler may put this pod on `node` by the pod's own rules and the node's taints.

        The one test of where a pod may run for everything that plans ahead of
        kube-scheduler (the return planner, the simulator, `migchain explain`);
        filter and prioritize need none, kube-scheduler applied it before asking.
        """
        return self.constraints.admits(node)


@dataclass(frozen=True)
class BindRequest:
    """kube-scheduler's ExtenderBindingArgs: bind this pod (if it still has this UID) to this node."""

    pod_namespace: str
    pod_name: str
    pod_uid: str
    node: str


@dataclass(frozen=True)
class PodRecord:
    """What the cluster cache keeps of a pod: its request, where it is bound, whether it still holds slices."""

    request: PodRequest
    node: str  # "" while unbound
    terminal: bool  # Succeeded or Failed: its slices are free again
    replaces: str = ""  # for a borrower: the UID of the pod it replaced (annotation REPLACED_UID_ANNOTATION)
    terminating: bool = False  # deletionTimestamp set: on its way out
    created: str = ""  # creationTimestamp (RFC 3339 sorts as text)
    migchain: Mapping[str, str] = field(default_factory=dict)  # its migchain.io/ annotations (the loan record)
    owner: str = ""  # the UID of its controller (ownerReference with controller: true); "" for a bare pod
    scheduler_name: str = MIGCHAIN_SCHEDULER  # spec.schedulerName: which scheduler places it
    gates: tuple[str, ...] = ()  # spec.schedulingGates (at most MAX_GATES_KEPT named): none schedules it while any
    preemption_policy: str = ""  # spec.preemptionPolicy: "Never" keeps a pod from preempting others
    nominated: str = ""  # status.nominatedNodeName: the node a preemption made room on for it
    unschedulable: bool = False  # its scheduler tried and found no node (PodScheduled False, Unschedulable)
    # Why its node's kubelet refused it at admission, for want of MIG slices (it never ran; see `_turned_away`).
    turned_away: str = ""

    @property
    def holds_slices(self) -> bool:
        return bool(self.node) and not self.terminal and bool(self.request.mig)

    def waits_for(self, schedulers: Collection[str]) -> bool:
        """Pending for MIG slices and, once they are free, placed by one of `schedulers`: demand a return can serve.

        Unbound, not finished, not on its way out, asking for MIG, naming one of
        `schedulers` and held by no scheduling gate. A pod for another scheduler,
        or gated, waits whatever migchain frees: it must never cost a restart.
        """
        return (
            not self.node
            and not self.terminal
            and not self.terminating
            and bool(self.request.mig)
            and self.scheduler_name in schedulers
            and not self.gates
        )


@dataclass(frozen=True)
class NodeState:
    """One node's MIG slices: what it offers and what bound pods and reservations already use."""

    name: str
    gpu_product: str = ""
    mig_config_state: str | None = None  # None: no MIG manager label on the node
    allocatable: Mapping[str, int] = field(default_factory=dict)
    used: Mapping[str, int] = field(default_factory=dict)
    # What pods' placement rules match, never what filter or prioritize read:
    # kept out of `signature`, so nodes that differ only here share a decision.
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()  # NoSchedule and NoExecute taints only; a cordon counts as one

    @property
    def offers_slices(self) -> bool:
        # The MIG manager sets the label to `pending`/`rebooting`/`failed` while it
        # repartitions; the slices advertised then are about to vanish. A node
        # without the label is partitioned by hand and is taken as it stands.
        return self.mig_config_state in (None, "success")

    @cached_property
    def free(self) -> Mapping[str, int]:
        return {t: max(0, n - self.used.get(t, 0)) for t, n in self.allocatable.items()}

    @cached_property
    def signature(self) -> str:
        """Everything a decision reads of this node, but its name: nodes alike here are decided alike.

        A string, not a tuple: a string keeps its hash once computed, so the
        per-request memo lookup costs what a name lookup costs.
        """
        return repr(
            (self.gpu_product, self.mig_config_state, sorted(self.allocatable.items()), sorted(self.free.items()))
        )

    @cached_property
    def layout(self) -> str:
        """What a decision reads of this node but its name and free slices (the planners file nodes by it)."""
        return repr((self.gpu_product, self.mig_config_state, sorted(self.allocatable.items())))

    def without(self, slices: MigCounts) -> NodeState:
        """This node with `slices` no longer counted as used."""
        used = dict(self.used)
        for resource, count in slices:
            used[resource] = max(0, used.get(resource, 0) - count)
        return replace(self, used=used)


# Arrivals are counted in buckets this many seconds long: a view of the recent demand stays a few hundred
# numbers whatever the number of pods.
DEMAND_BUCKET_SECONDS = 10


@dataclass(frozen=True)
class Demand:
    """MIG slices asked for by pods as they arrived lately: (bucket start, type) -> slices; see core/headroom.py.

    `at` is when the view was taken (seconds since the epoch, as pods' creationTimestamps are).
    """

    at: float = 0.0
    slices: Mapping[tuple[int, str], int] = field(default_factory=dict)

    def since(self, seconds: float) -> dict[str, int]:
        """Slices per type asked for in the last `seconds`: every bucket that ends within them counts whole."""
        start = self.at - seconds
        asked: dict[str, int] = {}
        for (bucket, resource), count in self.slices.items():
            if bucket + DEMAND_BUCKET_SECONDS > start:
                asked[resource] = asked.get(resource, 0) + count
        return asked


def demand_bucket(second: float) -> int:
    return int(second // DEMAND_BUCKET_SECONDS) * DEMAND_BUCKET_SECONDS


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of every node the extender knows; readers take one and never see it change.

    `reserved` holds the slices the extender reserved for pods it is binding
    (pod UID -> node, slices): counted in `nodes`, except against the pod they
    are for (see `for_pod`).
    """

    nodes: Mapping[str, NodeState] = field(default_factory=dict)
    reserved: Mapping[str, tuple[str, MigCounts]] = field(default_factory=dict)
    # Pending pods nominated to a node (pod UID -> node, request): see core/preempt.py yield_to_nominated.
    nominated: Mapping[str, tuple[str, PodRequest]] = field(default_factory=dict)
    demand: Demand = field(default_factory=Demand)
    # Per type, (free, allocatable) slices over the nodes that offer them; None: summed from `nodes` when first
    # asked. The ledger keeps it as nodes change, so no request sums ten thousand nodes.
    fleet: Mapping[str, tuple[int, int]] | None = None
    # Per node name, its NodeState.signature: how the filter files the names it is sent. The ledger keeps it as
    # nodes change; None: worked out from `nodes` when first asked.
    signatures: Mapping[str, str] | None = None
    # What has been worked out from this view (core/headroom.py): never copied into another view.
    memo: dict[Any, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def fleet_slices(self) -> Mapping[str, tuple[int, int]]:
        """Per type, the free and the allocatable slices of every node that offers slices."""
        if self.fleet is not None:
            return self.fleet
        totals = self.memo.get("fleet")
        if totals is None:
            totals = self.memo["fleet"] = fleet_slices(self.nodes.values())
        return totals

    def node_signatures(self) -> Mapping[str, str]:
        """Per node name, its NodeState.signature."""
        if self.signatures is not None:
            return self.signatures
        signatures = self.memo.get("signatures")
        if signatures is None:
            signatures = self.memo["signatures"] = {name: node.signature for name, node in self.nodes.items()}
        return signatures

    def with_nodes(self, changed: Mapping[str, NodeState], **fields: Any) -> Snapshot:
        """This view with the `changed` node states in place of theirs (and any other `fields` replaced)."""
        signatures = self.signatures
        if signatures is not None:
            signatures = {**signatures, **{name: node.signature for name, node in changed.items()}}
        return replace(self, nodes={**self.nodes, **changed}, signatures=signatures, **fields)

    @classmethod
    def of(cls, nodes: Iterable[NodeState]) -> Snapshot:
        return cls({node.name: node for node in nodes})

    def for_pod(self, uid: str) -> Snapshot:
        """The cluster as pod `uid` should see it: its own reservation, if any, free again.

        A reservation outlives a bind whose outcome was never learned (a 5xx, a
        cut connection). When kube-scheduler retries that pod, the slices held
        for it are the ones it may take: counting them against it would park
        the pod as unschedulable on a node that is waiting for it. Binding it
        twice is impossible either way: the API server refuses a second
        Binding of a bound pod.
        """
        held = self.reserved.get(uid)
        if held is None:
            return self
        node, slices = held
        state = self.nodes.get(node)
        if state is None:
            return self
        freed = state.without(slices)
        fleet = self.fleet
        if fleet is not None and state.offers_slices:
            fleet = dict(fleet)
            for resource, (free, allocatable) in fleet.items():
                fleet[resource] = (free + freed.free.get(resource, 0) - state.free.get(resource, 0), allocatable)
        return self.with_nodes({node: freed}, fleet=fleet)


def fleet_slices(nodes: Iterable[NodeState]) -> dict[str, tuple[int, int]]:
    """Per type, the free and the allocatable slices of those `nodes` that offer slices."""
    totals: dict[str, tuple[int, int]] = {}
    for node in nodes:
        if node.offers_slices:
            free = node.free
            for resource, allocatable in node.allocatable.items():
                had_free, had = totals.get(resource, (0, 0))
                totals[resource] = (had_free + free[resource], had + allocatable)
    return totals


def quantity(value: Any, where: str) -> int:
    """A whole-number quantity of an extended resource (`"2"` or `2`); extended resources are never fractional."""
    if isinstance(value, bool):
        raise ObjectError(f"{where}: expected a whole number, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) <= 18:
        # ASCII only: "²" passes str.isdigit() and then int() refuses it; no real quantity has 19 digits.
        number = int(value.strip())
    else:
        raise ObjectError(f"{where}: expected a whole number, got {value!r}")
    if number < 0:
        raise ObjectError(f"{where}: expected a whole number, got {value!r}")
    return number


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ObjectError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _sequence(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ObjectError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _whole_number(value: Any, where: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ObjectError(f"{where}: expected a whole number, got {type(value).__name__}")
    return value


def _string(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ObjectError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _container_mig(container: Any, where: str) -> dict[str, int]:
    resources = _mapping(_mapping(container, where).get("resources"), f"{where}.resources")
    requests = _mapping(resources.get("requests"), f"{where}.resources.requests")
    limits = _mapping(resources.get("limits"), f"{where}.resources.limits")
    counts: dict[str, int] = {}
    # Extended resources may give only limits; the API server then copies them to requests.
    for section_name, section in (("limits", limits), ("requests", requests)):
        for resource, value in section.items():
            if is_mig_resource(resource):
                counts[resource] = quantity(value, f"{where}.resources.{section_name}[{resource}]")
    return counts


def _add(total: dict[str, int], extra: Mapping[str, int]) -> None:
    for resource, count in extra.items():
        total[resource] = total.get(resource, 0) + count


def _maximum(total: dict[str, int], other: Mapping[str, int]) -> None:
    for resource, count in other.items():
        total[resource] = max(total.get(resource, 0), count)


def pod_mig_requests(spec: Mapping[str, Any]) -> MigCounts:
    """The pod's effective MIG request, computed the way kube-scheduler does for any resource.

    App containers and restartable (sidecar) init containers add up; each
    ordinary init container runs alone beside the sidecars started before it,
    and the pod needs the larger of the two.
    """
    total: dict[str, int] = {}
    for index, container in enumerate(_sequence(spec.get("containers"), "spec.containers")):
        _add(total, _container_mig(container, f"spec.containers[{index}]"))
    sidecars: dict[str, int] = {}
    init_peak: dict[str, int] = {}
    for index, container in enumerate(_sequence(spec.get("initContainers"), "spec.initContainers")):
        where = f"spec.initContainers[{index}]"
        counts = _container_mig(container, where)
        if _mapping(container, where).get("restartPolicy") == "Always":
            _add(total, counts)
            _add(sidecars, counts)
            _maximum(init_peak, sidecars)
        else:
            running = dict(sidecars)
            _add(running, counts)
            _maximum(init_peak, running)
    _maximum(total, init_peak)
    return tuple(sorted((resource, count) for resource, count in total.items() if count > 0))


def controller_of(metadata: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ownerReference with controller: true, if any."""
    for index, item in enumerate(_sequence(metadata.get("ownerReferences"), "Pod.metadata.ownerReferences")):
        owner = _mapping(item, f"Pod.metadata.ownerReferences[{index}]")
        if owner.get("controller") is True:
            return owner
    return None


# The longest apiVersion or kind of an owner kept: a group is a DNS subdomain (253) and a version or kind a short
# name; anything longer is no kind a policy can list, so it is kept as UNREADABLE_OWNER (which never borrows).
MAX_OWNER_TEXT = 317
UNREADABLE_OWNER = OwnerKind("(unreadable)", "(unreadable)")


def owner_kind(metadata: Mapping[str, Any]) -> OwnerKind | None:
    """The apiVersion and kind of the pod's controller; None for a pod without one (a bare pod).

    The pod's owner writes its ownerReferences: a value that is not short text is an owner no policy lists.
    """
    controller = controller_of(metadata)
    if controller is None:
        return None
    api_version, kind = controller.get("apiVersion"), controller.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return UNREADABLE_OWNER
    if not api_version or not kind or len(api_version) > MAX_OWNER_TEXT or len(kind) > MAX_OWNER_TEXT:
        return UNREADABLE_OWNER
    return OwnerKind(sys.intern(api_version), sys.intern(kind))  # many pods share a few kinds


def _no_borrow(metadata: Mapping[str, Any], annotations: Mapping[str, Any]) -> str:
    opt = annotations.get(BORROW_ANNOTATION)
    # Anything but an absent annotation or "true" opts out: a typo must not enable borrowing.
    if opt is not None and opt != "true":
        # An excerpt: this goes into the reason of every node the pod fails on.
        return f"pod annotation {BORROW_ANNOTATION}={excerpt(str(opt))}"
    controller = controller_of(metadata)
    if controller is not None and controller.get("kind") in PINNED_OWNERS:
        return f"{controller.get('kind')} pods never borrow (their controller recreates them from its template)"
    if controller is None and metadata.get("finalizers"):
        # A bare pod borrows by delete and recreate under its name. A finalizer
        # keeps the deleted pod until its holder lets go, as long as it likes,
        # with the pod only in migchain's journal meanwhile; and its holder would
        # act on a deletion nobody asked for.
        return "a bare pod with finalizers never borrows (its deletion waits on the finalizers' holder)"
    return ""


def pod_request(pod: Any) -> PodRequest:
    """Read a Pod object (as JSON) into the core's request; raise ObjectError naming the bad field.

    Its placement rules never raise: rules that cannot be read make a pod that may run nowhere.
    """
    pod = _mapping(pod, "Pod")
    metadata = _mapping(pod.get("metadata"), "Pod.metadata")
    annotations = _mapping(metadata.get("annotations"), "Pod.metadata.annotations")
    spec = _mapping(pod.get("spec"), "Pod.spec")
    return PodRequest(
        namespace=_string(metadata.get("namespace"), "Pod.metadata.namespace") or "default",
        name=_string(metadata.get("name"), "Pod.metadata.name"),
        uid=_string(metadata.get("uid"), "Pod.metadata.uid"),
        mig=pod_mig_requests(spec),
        no_borrow=_no_borrow(metadata, annotations),
        constraints=node_constraints(spec),
        priority=_whole_number(spec.get("priority"), "Pod.spec.priority"),
        owner=owner_kind(metadata),
    )


def pod_record(pod: Any) -> PodRecord:
    """Read a Pod object (as JSON) into what the cache keeps of it."""
    request = pod_request(pod)
    spec = _mapping(pod.get("spec"), "Pod.spec")
    status = _mapping(pod.get("status"), "Pod.status")
    metadata = _mapping(pod.get("metadata"), "Pod.metadata")
    annotations = _mapping(metadata.get("annotations"), "Pod.metadata.annotations")
    controller = controller_of(metadata) or {}
    replaces = _string(annotations.get(REPLACED_UID_ANNOTATION), f"annotations[{REPLACED_UID_ANNOTATION}]")
    return PodRecord(
        request=request,
        node=_string(spec.get("nodeName"), "Pod.spec.nodeName"),
        terminal=status.get("phase") in ("Succeeded", "Failed"),
        replaces=replaces if len(replaces) <= KEPT_ANNOTATIONS[REPLACED_UID_ANNOTATION] else "",
        terminating=bool(metadata.get("deletionTimestamp")),
        created=_string(metadata.get("creationTimestamp"), "Pod.metadata.creationTimestamp"),
        migchain=kept(annotations, KEPT_ANNOTATIONS),
        owner=_string(controller.get("uid"), "Pod.metadata.ownerReferences[controller].uid"),
        scheduler_name=_scheduler_name(spec.get("schedulerName")),
        gates=_gates(spec.get("schedulingGates")),
        preemption_policy=_string(spec.get("preemptionPolicy"), "Pod.spec.preemptionPolicy"),
        nominated=_string(status.get("nominatedNodeName"), "Pod.status.nominatedNodeName"),
        unschedulable=_unschedulable(status),
        turned_away=_turned_away(status),
    )


def _scheduler_name(value: Any) -> str:
    if value is None or value == "":
        return DEFAULT_SCHEDULER  # what the API server would have written
    return sys.intern(value) if isinstance(value, str) else ""  # unreadable: no scheduler's


def _gates(value: Any) -> tuple[str, ...]:
    """The names of a pod's scheduling gates; a gate that cannot be read still gates it."""
    if not value:
        return ()
    if not isinstance(value, list):
        return ("(unreadable)",)
    names = []
    for item in value[:MAX_GATES_KEPT]:
        name = item.get("name") if isinstance(item, Mapping) else None
        names.append(name if isinstance(name, str) and name else "(unreadable)")
    return tuple(names)


def _unschedulable(status: Mapping[str, Any]) -> bool:
    """Whether the pod's scheduler tried it and found no node: what kube-scheduler waits for before it preempts."""
    for index, item in enumerate(_sequence(status.get("conditions"), "Pod.status.conditions")):
        condition = _mapping(item, f"Pod.status.conditions[{index}]")
        if condition.get("type") == "PodScheduled":
            return condition.get("status") == "False" and condition.get("reason") == "Unschedulable"
    return False


# What a kubelet writes in status.reason of a pod it refuses at admission for want of a device or a resource:
# its device manager could not allocate (devices the device plugin no longer has free), or its own count of
# the node's allocatable says no ("OutOf" + the resource name). Either way the pod never ran.
DEVICE_ADMISSION_REASON = "UnexpectedAdmissionError"
RESOURCE_ADMISSION_PREFIX = "OutOf"
MAX_ADMISSION_REASON_CHARS = 128  # "OutOf" and a resource name (at most 63 + a prefix) fit


def _turned_away(status: Mapping[str, Any]) -> str:
    """The kubelet's reason if it refused the pod at admission for want of MIG slices (the pod Failed, never
    ran), else "". The kubelet writes a pod's status; any other Failed pod ran, and is its owner's to judge."""
    if status.get("phase") != "Failed":
        return ""
    reason = status.get("reason")
    if not isinstance(reason, str) or len(reason) > MAX_ADMISSION_REASON_CHARS:
        return ""
    if reason == DEVICE_ADMISSION_REASON:
        return reason
    if reason.startswith(RESOURCE_ADMISSION_PREFIX) and is_mig_resource(reason.removeprefix(RESOURCE_ADMISSION_PREFIX)):
        return reason
    return ""


def node_state(node: Any, used: Mapping[str, int] | None = None) -> NodeState:
    """Read a Node object (as JSON): its MIG allocatable and the labels the core decides by."""
    node = _mapping(node, "Node")
    metadata = _mapping(node.get("metadata"), "Node.metadata")
    name = _string(metadata.get("name"), "Node.metadata.name")
    if not name:
        raise ObjectError("Node.metadata.name: missing")
    labels = _mapping(metadata.get("labels"), f"Node {name}: metadata.labels")
    spec = _mapping(node.get("spec"), f"Node {name}: spec")
    status = _mapping(node.get("status"), f"Node {name}: status")
    allocatable = _mapping(status.get("allocatable"), f"Node {name}: status.allocatable")
    state = labels.get(MIG_CONFIG_STATE_LABEL)
    return NodeState(
        name=name,
        gpu_product=_string(labels.get(GPU_PRODUCT_LABEL), f"Node {name}: labels[{GPU_PRODUCT_LABEL}]"),
        mig_config_state=None if state is None else _string(state, f"Node {name}: labels[{MIG_CONFIG_STATE_LABEL}]"),
        allocatable={
            resource: quantity(value, f"Node {name}: status.allocatable[{resource}]")
            for resource, value in allocatable.items()
            if is_mig_resource(resource)
        },
        used=dict(used or {}),
        # Interned: thousands of nodes share most label keys and values, and the cache keeps them all.
        labels={
            sys.intern(key): sys.intern(value)
            for key, value in labels.items()
            if isinstance(key, str) and isinstance(value, str)
        },
        taints=_taints(spec, name),
    )


def _taints(spec: Mapping[str, Any], name: str) -> tuple[Taint, ...]:
    """The node's taints that keep pods off it at scheduling, a cordon (spec.unschedulable) among them."""
    taints = []
    for index, item in enumerate(_sequence(spec.get("taints"), f"Node {name}: spec.taints")):
        taint = _mapping(item, f"Node {name}: spec.taints[{index}]")
        effect = taint.get("effect")
        if effect in HARD_TAINT_EFFECTS:
            taints.append(
                Taint(
                    _string(taint.get("key"), f"Node {name}: spec.taints[{index}].key"),
                    _string(taint.get("value"), f"Node {name}: spec.taints[{index}].value"),
                    str(effect),
                )
            )
    if spec.get("unschedulable") is True:
        taints.append(Taint(UNSCHEDULABLE_TAINT, "", "NoSchedule"))
    return tuple(taints)
