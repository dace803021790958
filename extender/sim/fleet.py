"""Fleet files for the simulator: GPUs per model and their MIG layout, turned into nodes.

gpusPerNode: 8
gpus:
  - product: NVIDIA-A100-SXM4-40GB   # a nvidia.com/gpu.product value
    count: 100
    layout: all-balanced             # a GPU Operator layout name, or {1g.5gb: 2, 2g.10gb: 1, ...}
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from extender.core.cluster import NodeState
from extender.core.geometry import fits_gpu, model_of
from extender.core.mig import MIG_RESOURCE_PREFIX
from extender.core.recarve import GPU_COUNT_LABEL


class FleetError(ValueError):
    """A fleet file that cannot be used; the message names the file and the field."""


def nodes_of(product: str, count: int, layout: Mapping[str, int], per_node: int, prefix: str) -> list[NodeState]:
    nodes = []
    for index in range(0, count, per_node):
        gpus = min(per_node, count - index)
        allocatable = {MIG_RESOURCE_PREFIX + profile: n * gpus for profile, n in layout.items() if n}
        name = f"{prefix}-{index // per_node:03d}"
        nodes.append(NodeState(name, product, "success", allocatable, {}, labels={GPU_COUNT_LABEL: str(gpus)}))
    return nodes


def load_fleet(path: Path) -> list[NodeState]:
    try:
        document: Any = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise FleetError(f"{path}: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("gpus"), list) or not document["gpus"]:
        raise FleetError(f"{path}: gpus: expected a non-empty list")
    unknown = set(document) - {"gpusPerNode", "gpus"}
    if unknown:
        raise FleetError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    per_node = document.get("gpusPerNode", 8)
    if not isinstance(per_node, int) or per_node < 1:
        raise FleetError(f"{path}: gpusPerNode: expected a whole number of at least 1")
    nodes: list[NodeState] = []
    for index, entry in enumerate(document["gpus"]):
        where = f"{path}: gpus[{index}]"
        if not isinstance(entry, dict) or set(entry) - {"product", "count", "layout"}:
            raise FleetError(f"{where}: expected product, count and layout")
        try:
            model = model_of(str(entry.get("product")))
        except ValueError as error:
            raise FleetError(f"{where}.product: {error}") from None
        count = entry.get("count")
        if not isinstance(count, int) or count < 1:
            raise FleetError(f"{where}.count: expected a whole number of at least 1")
        layout = entry.get("layout")
        if isinstance(layout, str):
            if layout not in model.layouts:
                raise FleetError(
                    f"{where}.layout: {layout!r} is not a layout of {model.family}: {sorted(model.layouts)}"
                )
            layout = model.layouts[layout]
        if not isinstance(layout, dict) or not layout:
            raise FleetError(f"{where}.layout: expected a layout name or a mapping of profile to count")
        if not fits_gpu(model, layout):
            raise FleetError(f"{where}.layout: {layout} does not fit on one {model.family} GPU")
        nodes += nodes_of(entry["product"], count, layout, per_node, f"{model.family.lower()}-{index}")
    return nodes
