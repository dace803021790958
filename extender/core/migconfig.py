"""The GPU Operator's side of a re-carve: named MIG configs, the node labels, and the record kept on the Node; pure.

The GPU Operator's MIG Manager applies the named config its node's label
`nvidia.com/mig.config` picks, from its ConfigMap (`config.yaml`: `version: v1`,
`mig-configs: {name: [{devices, mig-enabled, mig-devices}]}`), and reports
`nvidia.com/mig.config.state` pending, then success or failed. migchain writes
one config per layout (its name says the layout, so a config once written
serves every later re-carve to that layout) and keeps what it is doing to a
node in one annotation on that Node, so whoever leads next finishes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from extender.core.cluster import MIG_CONFIG_STATE_LABEL, NodeState, PodRequest, Snapshot
from extender.core.mig import MIG_RESOURCE_PREFIX, is_mig_resource, short_name
from extender.core.recarve import GPU_COUNT_LABEL, gpus_of, without_recarve_taint

MIG_CONFIG_LABEL = "nvidia.com/mig.config"  # the named config the MIG Manager applies to the node
MIG_STRATEGY_LABEL = "nvidia.com/mig.strategy"
MIG_MANAGER_DEPLOY_LABEL = "nvidia.com/gpu.deploy.mig-manager"  # "false": the GPU Operator runs no MIG Manager there
OPT_IN_LABEL = "migchain.io/recarve"  # "true": the admin lets migchain re-carve this node when it is idle
RECORD_ANNOTATION = "migchain.io/recarve-record"  # what migchain is doing (or did last) to the node
CONFIG_KEY = "config.yaml"  # the key of the MIG Manager's ConfigMap that holds the configs
CONFIG_PREFIX = "migchain-"  # the names of the configs migchain writes; it never edits another

# Labels that say another MIG manager (or no MIG Manager of the GPU Operator) owns a node's GPUs. Each is
# `key` or `key=value`; an admin may add more with --recarve-foreign-label.
FOREIGN_LABELS: tuple[str, ...] = (
    # HAMi schedules the GPUs of nodes it labels gpu=on with its own device plugin, and partitions MIG itself
    # in its dynamic-MIG mode: migchain must not re-carve them underneath it.
    "gpu=on",
    # No GPU Operator device plugin: another (the NVIDIA DRA driver, which carves MIG devices per claim, or a
    # plugin of its own) serves the GPUs, and the nvidia.com/mig-* resources a re-carve makes would not appear.
    "nvidia.com/gpu.deploy.device-plugin=false",
)

# The steps of a re-carve, in order, as recorded on the Node. Draining (drain to re-carve only): the busy node is
# cordoned (RECARVING_TAINT) so that it empties. Planned: decided, nothing written yet. Labelled: the config is in
# the ConfigMap and the node's label names it. Done and failed end it; abandoned ends it, or a drain, unchanged.
DRAINING, PLANNED, LABELLED, DONE, FAILED, ABANDONED = "draining", "planned", "labelled", "done", "failed", "abandoned"
STEPS = (DRAINING, PLANNED, LABELLED, DONE, FAILED, ABANDONED)
# A node's re-carves remembered (for the cool-down and the hourly limit) at most this far back.
HISTORY_SECONDS = 24 * 3600.0
HISTORY_KEPT = 32
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")


def config_name(layout: Mapping[str, int]) -> str:
    """The name of the config that carves every GPU as `layout` (resource -> slices per GPU): a label value.

    `{nvidia.com/mig-1g.5gb: 7}` -> `migchain-7x1g.5gb`; a name longer than a label
    value may be is a hash of the layout.
    """
    parts = [f"{count}x{resource.removeprefix(MIG_RESOURCE_PREFIX)}" for resource, count in sorted(layout.items())]
    name = CONFIG_PREFIX + "-".join(parts)
    if _LABEL_VALUE.match(name):
        return name
    digest = hashlib.sha256(json.dumps(sorted(layout.items())).encode()).hexdigest()[:16]
    return f"{CONFIG_PREFIX}{digest}"


def named_config(layout: Mapping[str, int]) -> list[dict[str, Any]]:
    """The config's entry: every GPU of the node (all in MIG mode already) carved as `layout`."""
    devices = {resource.removeprefix(MIG_RESOURCE_PREFIX): count for resource, count in sorted(layout.items())}
    return [{"devices": "all", "mig-enabled": True, "mig-devices": devices}]


def with_config(document: Any, name: str, layout: Mapping[str, int]) -> dict[str, Any] | None:
    """The MIG Manager's config document with config `name` set to `layout`, every other config kept; None when
    it holds that already. Raises ValueError when the document is not one the MIG Manager would read."""
    if document is None:
        document = {"version": "v1", "mig-configs": {}}
    if not isinstance(document, Mapping) or not isinstance(document.get("mig-configs", {}), Mapping):
        raise ValueError("not a MIG Manager config: expected version: v1 and a mapping mig-configs")
    if document.get("version", "v1") != "v1":
        raise ValueError(f"MIG config version {document.get('version')!r}: only v1 is understood")
    configs = dict(document.get("mig-configs") or {})
    wanted = named_config(layout)
    if configs.get(name) == wanted:
        return None
    configs[name] = wanted
    return {**document, "version": "v1", "mig-configs": configs}


@dataclass(frozen=True)
class RecarveRecord:
    """What migchain does, or did last, to one node: written on the Node before each step it takes."""

    step: str  # one of STEPS
    config: str = ""  # the named config it carves the node as
    layout: Mapping[str, int] = field(default_factory=dict)  # resource -> slices per GPU after
    previous: str = ""  # the node's config label before: put back when the MIG Manager fails
    serves: Mapping[str, int] = field(default_factory=dict)  # the unmet slices per type it was planned for
    started: float = 0.0  # when it was planned (seconds since the epoch)
    labelled: float = 0.0  # when the label was set: time to capacity counts from here
    history: tuple[float, ...] = ()  # when earlier re-carves of the node started, oldest first
    reason: str = ""  # one line: why planned, or why it ended as it did
    # While draining (core/recarve.py drain_waste): when the node was cordoned, and the compute-slice-seconds its
    # free slices had left unused by `waste_at`, when `unused` compute slices were free.
    drained: float = 0.0
    waste: float = 0.0
    waste_at: float = 0.0
    unused: int = 0

    @property
    def in_flight(self) -> bool:
        return self.step in (PLANNED, LABELLED)

    @property
    def draining(self) -> bool:
        return self.step == DRAINING

    def text(self) -> str:
        return json.dumps(
            {
                "step": self.step,
                "config": self.config,
                "layout": dict(self.layout),
                "previous": self.previous,
                "serves": dict(self.serves),
                "started": self.started,
                "labelled": self.labelled,
                "history": list(self.history),
                "reason": self.reason,
                **(
                    {"drained": self.drained, "waste": self.waste, "waste_at": self.waste_at, "unused": self.unused}
                    if self.draining
                    else {}
                ),
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    def ended(self, step: str, reason: str) -> RecarveRecord:
        """This re-carve over: its start joins the history (a failed one counts against the limits too)."""
        history = (*self.history, self.started) if step != ABANDONED else self.history
        return replace(self, step=step, reason=reason, history=history[-HISTORY_KEPT:])


def read_record(text: Any) -> RecarveRecord | str:
    """The record an annotation holds, or why it cannot be read. Only admins and the node's kubelet may write a
    Node's annotations, but a broken one must still cost only that node."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("step") not in STEPS:
            return "no step"
        return RecarveRecord(
            step=str(data["step"]),
            config=_label_value(data.get("config", "")),
            layout=_counts(data.get("layout") or {}),
            previous=_label_value(data.get("previous", "")) if data.get("previous") else "",
            serves=_counts(data.get("serves") or {}),
            started=float(data.get("started") or 0.0),
            labelled=float(data.get("labelled") or 0.0),
            history=tuple(float(moment) for moment in data.get("history") or ())[-HISTORY_KEPT:],
            reason=str(data.get("reason", ""))[:300],
            drained=_finite(data.get("drained") or 0.0),
            waste=max(0.0, _finite(data.get("waste") or 0.0)),
            waste_at=_finite(data.get("waste_at") or 0.0),
            unused=_count(data.get("unused") or 0, 10_000),
        )
    except (ValueError, TypeError, AttributeError, RecursionError, OverflowError) as error:
        return f"unreadable ({type(error).__name__})"


def _label_value(value: Any) -> str:
    if value == "":
        return ""
    if not isinstance(value, str) or not _LABEL_VALUE.match(value):
        raise ValueError("not a label value")
    return value


def _finite(value: Any) -> float:
    """A number of the record that drains read: a NaN or an infinity would evict at once, or never."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("not a finite number")
    return number


def _count(value: Any, most: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
        raise ValueError("not a count")
    return value


def _counts(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise TypeError("not a mapping")
    counts = {}
    for resource, count in value.items():
        if not isinstance(resource, str) or not is_mig_resource(resource):
            raise ValueError("not a MIG resource")
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 64:
            raise ValueError("not a slice count")
        counts[resource] = count
    return counts


def recent(history: Iterable[float], now: float) -> tuple[float, ...]:
    """The re-carves worth remembering at `now`."""
    return tuple(moment for moment in history if now - moment < HISTORY_SECONDS)


def shows(node: NodeState, layout: Mapping[str, int], gpus: int) -> bool:
    """Whether the node offers `layout` on every GPU now: the MIG Manager is done and the device plugin is back."""
    offered = {resource: count for resource, count in node.allocatable.items() if count}
    return node.offers_slices and offered == {resource: count * gpus for resource, count in layout.items() if count}


def idle(node: NodeState, snapshot: Snapshot) -> bool:
    """No pod holds a MIG slice on it, none is reserved one by a bind under way, none is nominated to it."""
    if any(node.used.values()):
        return False
    return not any(where == node.name for where, _ in snapshot.nominated.values())


def refusal(node: NodeState, foreign: Sequence[str]) -> str:
    """Why migchain must not re-carve this opted-in node ("" when it may)."""
    labels = node.labels
    for item in foreign:
        key, _, value = item.partition("=")
        if key in labels and (not value or labels[key] == value):
            return f"its label {item} says another MIG manager (or device plugin) owns its GPUs"
    if labels.get(MIG_MANAGER_DEPLOY_LABEL) == "false":
        return f"{MIG_MANAGER_DEPLOY_LABEL}=false: the GPU Operator runs no MIG Manager on it"
    if MIG_CONFIG_LABEL not in labels:
        return f"no {MIG_CONFIG_LABEL} label: no MIG Manager of the GPU Operator applies configs to it"
    if labels.get(MIG_STRATEGY_LABEL, "mixed") != "mixed":
        return f"{MIG_STRATEGY_LABEL} is not mixed: migchain sees MIG types only under the mixed strategy"
    if not node.gpu_product:
        return "no nvidia.com/gpu.product label: its GPU model is unknown"
    if not gpus_of(node):
        return f"no {GPU_COUNT_LABEL} label: how many GPUs the slices are on is unknown"
    if not node.allocatable:
        return "it offers no MIG slices: its GPUs are not in MIG mode (a mode change needs a GPU reset)"
    if node.labels.get(MIG_CONFIG_STATE_LABEL) not in (None, "success"):
        return f"its MIG Manager is busy ({MIG_CONFIG_STATE_LABEL}={node.labels.get(MIG_CONFIG_STATE_LABEL)})"
    return ""


def recarve_notes(request: PodRequest, nodes: Iterable[tuple[NodeState, RecarveRecord]]) -> list[str]:
    """What `migchain explain` says of a pending pod that waits for a re-carve: each node being re-carved that
    the pod may run on, to a layout with slices of a type it asks for."""
    asked = {resource for resource, _ in request.mig}
    notes = []
    for node, record in sorted(nodes, key=lambda item: item[0].name):
        if not (record.in_flight or record.draining) or not asked & set(record.layout):
            continue
        if not request.may_run_on(without_recarve_taint(node)):
            continue
        doing = {
            PLANNED: "planned",
            DRAINING: "draining: cordoned until its pods are gone, or evicted once waiting wastes more",
        }.get(record.step, "waiting for the MIG Manager and the device plugin")
        served = ", ".join(f"{count}x {short_name(resource)}" for resource, count in sorted(record.serves.items()))
        notes.append(
            f"it waits for a re-carve: node {node.name} is being re-carved as {record.config} ({doing}), for "
            f"{served or 'sustained unmet demand'}; the slices count once the node's allocatable shows them"
        )
    return notes
