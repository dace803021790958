"""Chain rules and borrowing policy as frozen values; answers "what may stand in for what"; no I/O."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from extender.core.mig import parse_mig_resource, short_name

# Answers of `ChainRules.borrow_options` remembered at most: its keys come from pods (their namespaces), so
# the memo is bounded, and started afresh when full; a few hundred namespaces times a few types fit.
MEMO_ENTRIES = 4096


class ReturnMode(enum.Enum):
    EAGER = "eager"
    ON_DEMAND = "on-demand"
    NEVER = "never"


@dataclass(frozen=True)
class NamespaceSelector:
    """Which namespaces a policy covers: an empty `include` means every namespace; `exclude` wins."""

    include: frozenset[str] = frozenset()
    exclude: frozenset[str] = frozenset()

    def admits(self, namespace: str) -> bool:
        return namespace not in self.exclude and (not self.include or namespace in self.include)


@dataclass(frozen=True)
class PodOptOuts:
    """Which return opt-outs a pod's owner writes the admin honours, and in which namespaces.

    Off by default: the annotations are the tenant's, the return policy the
    admin's, so a pod keeps a slice it borrowed only where the admin lets it.
    """

    never_return: bool = False  # migchain.io/return: "false"
    max_restarts: bool = False  # migchain.io/max-restarts: "N" (a cap of 0 is the same opt-out)
    namespaces: NamespaceSelector = field(default_factory=NamespaceSelector)

    def honours_return(self, namespace: str) -> bool:
        return self.never_return and self.namespaces.admits(namespace)

    def honours_max_restarts(self, namespace: str) -> bool:
        return self.max_restarts and self.namespaces.admits(namespace)


@dataclass(frozen=True)
class Policy:
    """Limits on borrowing along the chains of one rules file."""

    borrowing: bool = True
    max_steps: int | None = None  # None: as far up the chain as it goes
    allowed_types: frozenset[str] | None = None  # None: every type of the chain may be borrowed
    return_mode: ReturnMode = ReturnMode.ON_DEMAND
    namespaces: NamespaceSelector = field(default_factory=NamespaceSelector)
    # None: live. A selector: in the namespaces it admits, borrows and returns
    # along these chains are decided, logged, counted and announced, never done.
    dry_run: NamespaceSelector | None = None
    pod_opt_outs: PodOptOuts = field(default_factory=PodOptOuts)

    def denial(self, granted: str, steps: int, namespace: str, chain: str) -> str | None:
        """Why this policy forbids borrowing `granted` `steps` up `chain`, or None if it allows it."""
        if not self.borrowing:
            return f"borrowing is off in the policy of chain {chain}"
        if not self.namespaces.admits(namespace):
            return f"namespace {namespace} is not covered by the policy of chain {chain}"
        if self.max_steps is not None and steps > self.max_steps:
            return f"{steps} steps exceed maxSteps {self.max_steps} of chain {chain}"
        if self.allowed_types is not None and granted not in self.allowed_types:
            return f"{short_name(granted)} is not in allowedTypes of chain {chain}"
        return None


@dataclass(frozen=True)
class Chain:
    """Types ordered smallest first: each may stand in for any type before it, on the named GPU models."""

    name: str
    gpu_products: frozenset[str]
    types: tuple[str, ...]
    policy: Policy = field(default_factory=Policy)
    source: str = ""  # the file it came from, for messages


@dataclass(frozen=True)
class BorrowOption:
    """One larger type a request could borrow on a node, and whether policy lets it."""

    granted: str
    steps: int
    chain: str
    denied: str | None  # None when allowed

    @property
    def allowed(self) -> bool:
        return self.denied is None


class ChainRules:
    """Every loaded chain, indexed by (requested type, GPU model). Immutable after construction."""

    def __init__(self, chains: Iterable[Chain]) -> None:
        self.chains: tuple[Chain, ...] = tuple(chains)
        self._upward: dict[tuple[str, str], tuple[tuple[str, int, Chain], ...]] = {}
        upward: dict[tuple[str, str], list[tuple[str, int, Chain]]] = {}
        for chain in self.chains:
            for low, requested in enumerate(chain.types):
                for high in range(low + 1, len(chain.types)):
                    for product in chain.gpu_products:
                        upward.setdefault((requested, product), []).append((chain.types[high], high - low, chain))
        self._upward = {key: tuple(value) for key, value in upward.items()}
        # Memo of borrow_options; the rules never change, so entries never go stale.
        # Concurrent fills compute the same value, so the race is harmless. Only types
        # some chain starts from are remembered, at most MEMO_ENTRIES answers.
        self._memo: dict[tuple[str, str, str], tuple[BorrowOption, ...]] = {}
        self._by_name = {chain.name: chain for chain in self.chains}

    def dry_run(self, chains: Iterable[str], namespace: str) -> bool:
        """Whether a loan along any of `chains` for a pod in `namespace` is only announced (policy dryRun)."""
        for name in chains:
            chain = self._by_name.get(name)
            if chain is not None and chain.policy.dry_run is not None and chain.policy.dry_run.admits(namespace):
                return True
        return False

    @property
    def types(self) -> frozenset[str]:
        """Every MIG type named by some chain: the extender's managed resources."""
        return frozenset(t for chain in self.chains for t in chain.types)

    def borrow_options(self, requested: str, gpu_product: str, namespace: str) -> tuple[BorrowOption, ...]:
        """Larger types that may stand in for `requested` on a node of `gpu_product`, best first.

        A type reachable along several chains counts once: allowed beats denied,
        then fewer steps, then the chain name, so the answer is deterministic.
        The list is ordered the same way, smaller types first among equal steps.
        """
        key = (requested, gpu_product, namespace)
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        upward = self._upward.get((requested, gpu_product))
        if upward is None:
            return ()  # no chain for it: a pod may name any type, so nothing is remembered of it
        best: dict[str, BorrowOption] = {}
        for granted, steps, chain in upward:
            option = BorrowOption(
                granted, steps, chain.name, chain.policy.denial(granted, steps, namespace, chain.name)
            )
            current = best.get(granted)
            if current is None or _preference(option) < _preference(current):
                best[granted] = option
        options = tuple(sorted(best.values(), key=_preference))
        if len(self._memo) >= MEMO_ENTRIES:
            self._memo.clear()
        self._memo[key] = options
        return options

    def has_chain_for(self, requested: str, gpu_product: str) -> bool:
        return (requested, gpu_product) in self._upward


def _preference(option: BorrowOption) -> tuple[bool, int, int, int, str, str]:
    # Among equal steps the smaller type goes first, so large slices stay free
    # for the pods that need them; names settle the rest deterministically.
    profile = parse_mig_resource(option.granted)
    return (
        option.denied is not None,
        option.steps,
        profile.memory_gb,
        profile.compute_slices,
        option.granted,
        option.chain,
    )
