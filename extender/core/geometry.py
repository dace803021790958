"""MIG geometry per GPU model: named layouts from the GPU Operator's default MIG configs, and placement checks; pure.

A GPU has memory slices (8 on A100/H100/H200, 4 on A30) and each profile
occupies a run of them starting at allowed offsets. On the 8-slice GPUs:
1g at 0..6, 2g at 0,2,4, 3g at 0,4, 4g at 0, 7g at 0; a 1g profile with
twice the memory (1g.10gb on A100-40GB, 1g.20gb on 80GB parts) takes two
slices at even offsets. A layout is valid when its instances can all be
placed without overlap.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from extender.core.mig import MIG_RESOURCE_PREFIX, parse_mig_resource


@dataclass(frozen=True)
class GpuModel:
    family: str
    products: tuple[str, ...]  # nvidia.com/gpu.product values
    memory_slices: int
    slice_gb: float  # memory of one slice
    layouts: Mapping[str, Mapping[str, int]]  # name -> profile -> count, per GPU


A100_40 = GpuModel(
    "A100-40GB",
    ("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB"),
    8,
    5,
    {
        "all-balanced": {"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1},
        "all-1g.5gb": {"1g.5gb": 7},
        "all-1g.10gb": {"1g.10gb": 4},
        "all-2g.10gb": {"2g.10gb": 3},
        "all-3g.20gb": {"3g.20gb": 2},
        "all-4g.20gb": {"4g.20gb": 1},
        "all-7g.40gb": {"7g.40gb": 1},
    },
)
H100_80 = GpuModel(
    "H100-80GB",
    ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"),
    8,
    10,
    {
        "all-balanced": {"1g.10gb": 2, "2g.20gb": 1, "3g.40gb": 1},
        "all-1g.10gb": {"1g.10gb": 7},
        "all-1g.20gb": {"1g.20gb": 4},
        "all-2g.20gb": {"2g.20gb": 3},
        "all-3g.40gb": {"3g.40gb": 2},
        "all-4g.40gb": {"4g.40gb": 1},
        "all-7g.80gb": {"7g.80gb": 1},
    },
)
H200_141 = GpuModel(
    "H200-141GB",
    ("NVIDIA-H200", "NVIDIA-H200-NVL"),
    8,
    17.625,
    {
        "all-balanced": {"1g.18gb": 2, "2g.35gb": 1, "3g.71gb": 1},
        "all-1g.18gb": {"1g.18gb": 7},
        "all-1g.35gb": {"1g.35gb": 4},
        "all-2g.35gb": {"2g.35gb": 3},
        "all-3g.71gb": {"3g.71gb": 2},
        "all-4g.71gb": {"4g.71gb": 1},
        "all-7g.141gb": {"7g.141gb": 1},
    },
)
A30_24 = GpuModel(
    "A30-24GB",
    ("NVIDIA-A30",),
    4,
    6,
    {
        "all-balanced": {"1g.6gb": 2, "2g.12gb": 1},
        "all-1g.6gb": {"1g.6gb": 4},
        "all-2g.12gb": {"2g.12gb": 2},
        "all-4g.24gb": {"4g.24gb": 1},
    },
)
MODELS = (A100_40, H100_80, H200_141, A30_24)


def model_of(product: str) -> GpuModel:
    for model in MODELS:
        if product in model.products:
            return model
    known = ", ".join(p for model in MODELS for p in model.products)
    raise ValueError(f"unknown GPU product {product!r} (known: {known})")


def _width(model: GpuModel, profile: str) -> int:
    """Memory slices a profile occupies: its memory over one slice's (3g.20gb on A100-40GB: 4)."""
    return max(1, round(parse_mig_resource(MIG_RESOURCE_PREFIX + profile).memory_gb / model.slice_gb))


def _starts(model: GpuModel, profile: str, width: int) -> range:
    if compute_slices(MIG_RESOURCE_PREFIX + profile) >= 4:
        return range(1)  # 4g and 7g start at slice 0 only
    if width == 1:
        # On 8-slice GPUs a 1g instance never takes the last memory slice (7 compute slices).
        return range(model.memory_slices - 1 if model.memory_slices == 8 else model.memory_slices)
    return range(0, model.memory_slices - width + 1, width)


def fits_gpu(model: GpuModel, layout: Mapping[str, int]) -> bool:
    """Whether the instances of `layout` can all be placed on one GPU of `model` without overlap."""
    compute_budget = 7 if model.memory_slices == 8 else model.memory_slices
    if sum(compute_slices(MIG_RESOURCE_PREFIX + p) * n for p, n in layout.items()) > compute_budget:
        return False
    pieces = sorted(
        ((_width(model, profile), profile) for profile, count in layout.items() for _ in range(count)), reverse=True
    )

    def place(index: int, taken: frozenset[int]) -> bool:
        if index == len(pieces):
            return True
        width, profile = pieces[index]
        for start in _starts(model, profile, width):
            cells = frozenset(range(start, start + width))
            if not cells & taken and place(index + 1, taken | cells):
                return True
        return False

    return place(0, frozenset())


def compute_slices(resource: str) -> int:
    return parse_mig_resource(resource).compute_slices


def compute_of(counts: Iterable[tuple[str, int]]) -> int:
    """Compute slices of a request or a holding ((resource, count), ...): `((1g.5gb, 2), (3g.20gb, 1))` is 5."""
    return sum(compute_slices(resource) * count for resource, count in counts)


def profiles_of(model: GpuModel) -> tuple[str, ...]:
    """The profiles the GPU Operator's layouts of `model` use, smallest first (`1g.5gb`, ..., `7g.40gb`)."""
    names = {profile for layout in model.layouts.values() for profile in layout}
    return tuple(sorted(names, key=lambda p: parse_mig_resource(MIG_RESOURCE_PREFIX + p)))


def valid_layouts(model: GpuModel) -> tuple[Mapping[str, int], ...]:
    """Every non-empty layout of `model`'s profiles that the placement rules allow on one GPU, in a fixed order."""
    return _valid_layouts(model.family)


def maximal_layouts(model: GpuModel) -> tuple[Mapping[str, int], ...]:
    """The valid layouts to which no further instance can be added: the only ones worth carving."""
    return _maximal_layouts(model.family)


@functools.lru_cache(maxsize=len(MODELS))
def _valid_layouts(family: str) -> tuple[Mapping[str, int], ...]:
    model = next(m for m in MODELS if m.family == family)
    names = profiles_of(model)
    compute_budget = 7 if model.memory_slices == 8 else model.memory_slices
    limits = [compute_budget // compute_slices(MIG_RESOURCE_PREFIX + p) for p in names]
    found = []
    for counts in itertools.product(*(range(limit + 1) for limit in limits)):
        layout = {p: n for p, n in zip(names, counts, strict=True) if n}
        if layout and fits_gpu(model, layout):
            found.append(layout)
    return tuple(found)


@functools.lru_cache(maxsize=len(MODELS))
def _maximal_layouts(family: str) -> tuple[Mapping[str, int], ...]:
    model = next(m for m in MODELS if m.family == family)
    valid = _valid_layouts(family)
    keys = {tuple(sorted(layout.items())) for layout in valid}

    def grows(layout: Mapping[str, int], profile: str) -> bool:
        bigger = dict(layout)
        bigger[profile] = bigger.get(profile, 0) + 1
        return tuple(sorted(bigger.items())) in keys

    return tuple(layout for layout in valid if not any(grows(layout, p) for p in profiles_of(model)))


def all_layouts_valid() -> list[tuple[str, str]]:
    """(model, layout) pairs that do not fit their GPU; empty when the table is right (a test checks it)."""
    return [
        (model.family, name)
        for model, (name, layout) in itertools.chain.from_iterable(
            ((model, item) for item in model.layouts.items()) for model in MODELS
        )
        if not fits_gpu(model, layout)
    ]
