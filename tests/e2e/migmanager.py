"""A stand-in for the GPU Operator's MIG Manager on fake nodes: applies the named config the node's label picks.

It follows the rules read from mig-parted's k8s-mig-manager: the config named
by `nvidia.com/mig.config` comes from a ConfigMap (`version: v1`, `mig-configs:
{name: [{devices: all | [i, ...], mig-enabled: true, mig-devices: {...}}]}`);
`nvidia.com/mig.config.state` goes `pending`, then `success` or `failed`; the
node's MIG allocatable drops while it applies (the device plugin is paused) and
comes back as the new layout times the GPUs it covers. It refuses, `failed`
with nothing changed, when a pod holds a MIG slice on the node (it cannot tell
which GPU a slice is on: a real one fails on an instance in use) or when the
config asks for a mode change (MIG on or off needs a GPU reset).

It acts only on nodes labelled MANAGED_LABEL, and keeps what it applied last in
the APPLIED_ANNOTATION of the node (a real one reads the GPUs themselves).

On a fake node it patches the Node's allocatable itself. On a real node
(tests/e2e/realnode.py, given in `device_plugins`) it re-partitions through the
node's device-plugin stand-in, as the real one restarts NVIDIA's: the plugin
serves no device while it applies, then the new ones, and the kubelet's own
status shows them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml

from extender.core.mig import MIG_RESOURCE_PREFIX
from extender.kube.api import ApiError, KubeApi, path

log = logging.getLogger(__name__)

MANAGED_LABEL = "e2e.migchain.io/mig-manager"  # "true": this stand-in plays the node's MIG Manager
APPLIED_ANNOTATION = "e2e.migchain.io/mig-applied"  # the named config the node's GPUs are carved as
CONFIG_LABEL = "nvidia.com/mig.config"
STATE_LABEL = "nvidia.com/mig.config.state"
GPU_COUNT_LABEL = "nvidia.com/gpu.count"
CONFIG_KEY = "config.yaml"


class DevicePlugin(Protocol):
    """A real node's device-plugin stand-in (tests/e2e/realnode.RealNode): serves `layout`, profile -> devices."""

    def relayout(self, layout: dict[str, int]) -> None: ...


@dataclass(frozen=True)
class Applied:
    """One application the stand-in made or refused, for the tests to look at."""

    node: str
    config: str
    outcome: str  # success or failed
    why: str = ""
    layout: Mapping[str, int] = field(default_factory=dict)  # resource -> slices on the node after


class MigManager:
    """Polls the managed nodes; each change of their label is applied once, as the real one does per event."""

    def __init__(
        self, api: KubeApi, config_map: tuple[str, str], *, apply_seconds: float = 1.0, interval: float = 0.2
    ) -> None:
        self.api = api
        self.config_map = config_map
        self.apply_seconds = apply_seconds  # how long the device plugin is down (the allocatable drop)
        self.interval = interval
        self.applied: list[Applied] = []
        self._failed: dict[str, str] = {}  # node -> the config last refused on it: refused once per label value
        self.device_plugins: dict[str, DevicePlugin] = {}  # node -> its device plugin: a real node, not a patch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mig-manager", daemon=True)

    def start(self) -> MigManager:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def applied_to(self, node: str) -> list[Applied]:
        return [item for item in list(self.applied) if item.node == node]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                nodes, _ = self.api.list_all("/api/v1/nodes", labelSelector=f"{MANAGED_LABEL}=true")
                for node in nodes:
                    self._reconcile(node)
            except Exception as error:  # the API server may be busy; the next poll tries again
                log.warning("mig-manager stand-in: %s", error)

    def _reconcile(self, node: Mapping[str, Any]) -> None:
        metadata = node["metadata"]
        name = metadata["name"]
        labels = metadata.get("labels") or {}
        wanted = labels.get(CONFIG_LABEL)
        applied = (metadata.get("annotations") or {}).get(APPLIED_ANNOTATION)
        if wanted is None:
            return
        if wanted == applied:
            self._failed.pop(name, None)
            if labels.get(STATE_LABEL) != "success":
                self._set_state(name, "success")  # the layout already there: a no-op apply
            return
        if labels.get(STATE_LABEL) == "failed" and self._failed.get(name) == wanted:
            return  # it fails again only on a new label value, as the real one acts on label events
        self._set_state(name, "pending")
        why, layout = self._plan(node, wanted)
        if why:
            self._fail(name, wanted, why)
            return
        if name in self.device_plugins:
            self._restart_plugin(self.device_plugins[name], layout)
        else:
            self._bounce(node, layout)
        self.applied.append(Applied(name, wanted, "success", layout=layout))  # before the state shows it
        self.api.patch(
            path("api", "v1", "nodes", name),
            {
                "metadata": {
                    "annotations": {APPLIED_ANNOTATION: wanted},
                    "labels": {
                        STATE_LABEL: "success",
                        **_count_labels(_mig(node), layout),
                    },
                }
            },
        )
        log.info("mig-manager stand-in: %s carved as %s: %s", name, wanted, layout)

    def _plan(self, node: Mapping[str, Any], wanted: str) -> tuple[str, dict[str, int]]:
        """Why the config cannot be applied (or ""), and the node's MIG allocatable after it."""
        name = node["metadata"]["name"]
        labels = node["metadata"].get("labels") or {}
        try:
            gpus = int(labels[GPU_COUNT_LABEL])
        except (KeyError, ValueError):
            return f"no {GPU_COUNT_LABEL} label", {}
        try:
            document = self.api.get(
                path("api", "v1", "namespaces", self.config_map[0], "configmaps", self.config_map[1])
            )
            entries = yaml.safe_load(document["data"][CONFIG_KEY])["mig-configs"][wanted]
        except (ApiError, KeyError, TypeError, yaml.YAMLError) as error:
            return f"config {wanted} not found: {error}", {}
        before = _mig(node)
        per_gpu: list[dict[str, int]] = [{r: n // gpus for r, n in before.items() if n // gpus} for _ in range(gpus)]
        for entry in entries:
            if entry.get("mig-enabled") is not True:
                return "a mode change (MIG off) needs a GPU reset", {}
            devices = entry.get("devices")
            indices = range(gpus) if devices == "all" else [i for i in devices if 0 <= i < gpus]
            for index in indices:
                per_gpu[index] = {
                    f"{MIG_RESOURCE_PREFIX}{profile}": int(count)
                    for profile, count in (entry.get("mig-devices") or {}).items()
                }
        pods, _ = self.api.list_all("/api/v1/pods", fieldSelector=f"spec.nodeName={name}")
        holders = [pod["metadata"]["name"] for pod in pods if _holds_mig(pod)]
        if holders:
            return f"MIG devices in use by {', '.join(sorted(holders))}", {}
        layout: dict[str, int] = {}
        for gpu in per_gpu:
            for resource, count in gpu.items():
                layout[resource] = layout.get(resource, 0) + count
        return "", layout

    def _bounce(self, node: Mapping[str, Any], layout: Mapping[str, int]) -> None:
        """The device plugin paused (every MIG resource at 0), then back with the new devices."""
        name = node["metadata"]["name"]
        before = _mig(node)
        status = path("api", "v1", "nodes", name, "status")
        dropped = dict.fromkeys(before, "0")
        self.api.patch(status, {"status": {"capacity": dropped, "allocatable": dropped}})
        self._stop.wait(self.apply_seconds)
        after: dict[str, str | None] = dict.fromkeys(before)
        after.update({resource: str(count) for resource, count in layout.items()})
        self.api.patch(status, {"status": {"capacity": after, "allocatable": after}})

    def _restart_plugin(self, plugin: DevicePlugin, layout: Mapping[str, int]) -> None:
        """The device plugin paused (no device: the kubelet's allocatable drops to 0), then back with the new ones.
        The state says success before the kubelet shows them, as the real one's: the re-carver must wait for them."""
        plugin.relayout({})
        self._stop.wait(self.apply_seconds)
        plugin.relayout(
            {resource.removeprefix(MIG_RESOURCE_PREFIX): count for resource, count in layout.items() if count}
        )

    def _fail(self, name: str, wanted: str, why: str) -> None:
        self._failed[name] = wanted
        self.applied.append(Applied(name, wanted, "failed", why))  # before the state a test waits for shows it
        self._set_state(name, "failed")
        log.info("mig-manager stand-in: %s not carved as %s: %s", name, wanted, why)

    def _set_state(self, name: str, state: str) -> None:
        self.api.patch(path("api", "v1", "nodes", name), {"metadata": {"labels": {STATE_LABEL: state}}})


def _mig(node: Mapping[str, Any]) -> dict[str, int]:
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    return {r: int(n) for r, n in allocatable.items() if r.startswith(MIG_RESOURCE_PREFIX)}


def _count_labels(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, str | None]:
    """GPU feature discovery's per-profile count labels for the new layout (None removes a profile's)."""
    labels: dict[str, str | None] = {
        f"nvidia.com/mig-{r.removeprefix(MIG_RESOURCE_PREFIX)}.count": None for r in before
    }
    labels.update({f"nvidia.com/mig-{r.removeprefix(MIG_RESOURCE_PREFIX)}.count": str(n) for r, n in after.items()})
    return labels


def _holds_mig(pod: Mapping[str, Any]) -> bool:
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return False
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        for kind in ("limits", "requests"):
            if any(r.startswith(MIG_RESOURCE_PREFIX) for r in resources.get(kind) or {}):
                return True
    return False


def mig_config_document(configs: Mapping[str, Mapping[str, int]]) -> str:
    """A GPU Operator MIG config (config.yaml) with one all-GPUs entry per named layout (profile -> count)."""
    return yaml.safe_dump(
        {
            "version": "v1",
            "mig-configs": {
                name: [{"devices": "all", "mig-enabled": True, "mig-devices": dict(layout)}]
                for name, layout in configs.items()
            },
        },
        sort_keys=False,
    )
