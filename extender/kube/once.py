"""What was said once (a dry-run announcement, a refused eviction), so it is said once; bounded; no I/O.

The keys come from pods (their UIDs), and pods come and go for as long as the
process runs: what is remembered is forgotten again when its pod no longer
matters (`keep_only`), and never more than `cap` keys are kept, the oldest
going first. Past the cap a pod may be told twice; memory never grows.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# Enough for every pod of a large cluster (10,000 nodes at 10 pods each), about 10 MiB of UIDs at most.
ONCE_CAP = 100_000


class Once(Generic[K]):
    def __init__(self, cap: int = ONCE_CAP) -> None:
        self.cap = cap
        self._said: dict[K, None] = {}  # in the order first said: the oldest are forgotten first

    def first(self, key: K) -> bool:
        """Whether `key` is said for the first time (remembered from now on)."""
        if key in self._said:
            return False
        while len(self._said) >= self.cap:
            del self._said[next(iter(self._said))]
        self._said[key] = None
        return True

    def keep_only(self, wanted: Collection[K] | Callable[[K], bool]) -> None:
        """Forget every key but those `wanted` (a collection of keys, or a test of each)."""
        keep = wanted if callable(wanted) else wanted.__contains__
        self._said = {key: None for key in self._said if keep(key)}

    def __contains__(self, key: object) -> bool:
        return key in self._said

    def __len__(self) -> int:
        return len(self._said)
