"""MIG resource names under the device plugin's mixed strategy; pure parsing, no I/O."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

MIG_RESOURCE_PREFIX = "nvidia.com/mig-"

# `<compute>g.<memory>gb` and an optional suffix; the device plugin writes the
# profile's `+` as `.`, so `1g.5gb+me` is `nvidia.com/mig-1g.5gb.me`. Newer GPUs
# also have `-me` (no media engine) and `+me.all`/`+gfx` variants.
_PROFILE = re.compile(r"^(?P<compute>[1-9][0-9]?)g\.(?P<memory>[1-9][0-9]{0,3})gb(?P<suffix>(?:[.-][a-z]+)*)$")


@dataclass(frozen=True, order=True)
class MigProfile:
    """What a MIG resource name promises: compute slices and memory in GB."""

    compute_slices: int
    memory_gb: int
    suffix: str
    resource: str


def is_mig_resource(name: str) -> bool:
    return name.startswith(MIG_RESOURCE_PREFIX)


@functools.lru_cache(maxsize=1024)
def parse_mig_resource(name: str) -> MigProfile:
    """Parse `nvidia.com/mig-3g.20gb`; raise ValueError with a readable reason. Memoised: names repeat a lot."""
    if not is_mig_resource(name):
        raise ValueError(f"{name!r} is not a MIG resource name (expected {MIG_RESOURCE_PREFIX}<profile>)")
    match = _PROFILE.match(name[len(MIG_RESOURCE_PREFIX) :])
    if match is None:
        raise ValueError(
            f"{name!r} is not a MIG resource name of the mixed strategy "
            f"(expected {MIG_RESOURCE_PREFIX}<N>g.<M>gb, e.g. nvidia.com/mig-1g.5gb)"
        )
    return MigProfile(
        compute_slices=int(match["compute"]),
        memory_gb=int(match["memory"]),
        suffix=match["suffix"],
        resource=name,
    )


def short_name(resource: str) -> str:
    """`nvidia.com/mig-1g.5gb` -> `1g.5gb`, for compact reasons and tables."""
    return resource[len(MIG_RESOURCE_PREFIX) :] if is_mig_resource(resource) else resource
