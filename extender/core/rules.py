"""Chain rules and borrowing policy as frozen values; answers "what may stand in for what"; no I/O."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from extender.core.mig import parse_mig_resource, short_name
from extender.core.untrusted import excerpt

# Answers of `ChainRules.borrow_options` remembered at most: its keys come from pods (their namespaces), so
# the memo is bounded, and started afresh when full; a few hundred namespaces times a few types fit.
MEMO_ENTRIES = 4096


class ReturnMode(enum.Enum):
    EAGER = "eager"
    ON_DEMAND = "on-demand"
    NEVER = "never"


class ReturnOrder(enum.Enum):
    """Which borrower goes first when several could: the returner's `--return-order`."""

    LEAST_WORK_LOST = "least-work-lost"  # the youngest loan first (least run time thrown away), then most steps
    MOST_STEPS = "most-steps"  # the most steps first, then the oldest loan (the reference behaviour)


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


@dataclass(frozen=True, order=True)
class OwnerKind:
    """The kind of a pod's controller as its ownerReference names it: apiVersion and kind, e.g. apps/v1 ReplicaSet."""

    api_version: str
    kind: str

    def __str__(self) -> str:
        return f"{self.api_version} {self.kind}"


# Controllers that count their pods by labels and accept any pod they own, so a
# borrow's replacement under a new name is just one of theirs: these borrow
# everywhere. Others may track pods by name (Argo Workflows, Kubeflow's
# training operator, Volcano, Spark): a replacement would make their work fail
# or run twice, so their pods borrow only where a policy lists their kind.
SAFE_OWNER_KINDS = frozenset({OwnerKind("apps/v1", "ReplicaSet"), OwnerKind("batch/v1", "Job")})
# Controllers that recreate a pod by name or per node from their own template:
# a replacement would be fought, so no policy may list them.
NEVER_SAFE_OWNER_KINDS = frozenset({OwnerKind("apps/v1", "StatefulSet"), OwnerKind("apps/v1", "DaemonSet")})
# Stands for every owner kind no policy lists, so remembered answers stay few whatever kinds pods name.
UNLISTED_OWNER = OwnerKind("", "(unlisted)")

# The defaults of policy.headroomSeconds and policy.reclaimAfterSeconds, chosen on the simulator's traces
# (docs/simulator-and-performance.md): together they keep nearly every pod that asks for a larger type from
# waiting on a loan, at a tenth of the restarts taking slices back at once would cost.
DEFAULT_HEADROOM_SECONDS = 300
DEFAULT_RECLAIM_AFTER_SECONDS = 120
MAX_HEADROOM_SECONDS = 3600
# Views of the rules with some types kept free (ChainRules.keeping_free) remembered per rules object.
KEPT_FREE_VIEWS = 64


@dataclass(frozen=True)
class Policy:
    """Limits on borrowing along the chains of one rules file."""

    borrowing: bool = True
    max_steps: int | None = None  # None: as far up the chain as it goes
    allowed_types: frozenset[str] | None = None  # None: every type of the chain may be borrowed
    return_mode: ReturnMode = ReturnMode.ON_DEMAND
    # How long a pod may wait for its own type while a borrower holds a slice of it, before that slice is
    # taken back (the borrower returned to Pending, even with its own type not free): loans never starve the
    # pods a type is carved for. Eager and on-demand chains; never does not take slices back.
    reclaim_after_seconds: int = DEFAULT_RECLAIM_AFTER_SECONDS
    # A larger type is lent only while more of its slices are free, fleet-wide, than its own pods asked for in
    # the last this many seconds (at most half its slices): what they will likely ask for next, so they find a
    # slice free instead of taking one back from a borrower. 0: every free slice may be lent.
    headroom_seconds: int = DEFAULT_HEADROOM_SECONDS
    # The types of these chains kept free right now (see core/headroom.py): set per view of the cluster, never
    # read from a file.
    kept_free: frozenset[str] = frozenset()
    namespaces: NamespaceSelector = field(default_factory=NamespaceSelector)
    # None: live. A selector: in the namespaces it admits, borrows and returns
    # along these chains are decided, logged, counted and announced, never done.
    dry_run: NamespaceSelector | None = None
    pod_opt_outs: PodOptOuts = field(default_factory=PodOptOuts)
    # Owner kinds beyond SAFE_OWNER_KINDS whose pods borrow along these chains (policy.ownerKinds).
    owner_kinds: frozenset[OwnerKind] = frozenset()

    def admits_owner(self, owner: OwnerKind | None) -> bool:
        """Whether a pod with this controller (None: none, a bare pod) may be replaced along these chains."""
        return owner is None or owner in SAFE_OWNER_KINDS or owner in self.owner_kinds

    def refusal(self, namespace: str, chain: str, owner: OwnerKind | None = None) -> str | None:
        """Why this policy forbids a pod in `namespace` owned by `owner` any borrow along `chain`, or None."""
        if not self.borrowing:
            return f"borrowing is off in the policy of chain {chain}"
        if not self.namespaces.admits(namespace):
            return f"namespace {namespace} is not covered by the policy of chain {chain}"
        if not self.admits_owner(owner):
            return f"the policy of chain {chain} does not replace pods of their owner's kind (ownerKinds)"
        return None

    def denial(
        self, granted: str, steps: int, namespace: str, chain: str, owner: OwnerKind | None = None
    ) -> str | None:
        """Why this policy forbids borrowing `granted` `steps` up `chain`, or None if it allows it."""
        refused = self.refusal(namespace, chain, owner)
        if refused is not None:
            return refused
        if self.max_steps is not None and steps > self.max_steps:
            return f"{steps} steps exceed maxSteps {self.max_steps} of chain {chain}"
        if self.allowed_types is not None and granted not in self.allowed_types:
            return f"{short_name(granted)} is not in allowedTypes of chain {chain}"
        if granted in self.kept_free:
            return (
                f"{short_name(granted)} is kept free for the pods that ask for it "
                f"(headroomSeconds {self.headroom_seconds} of chain {chain})"
            )
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
        self._memo: dict[tuple[str, str, str, OwnerKind | None], tuple[BorrowOption, ...]] = {}
        self._by_name = {chain.name: chain for chain in self.chains}
        self._keeping: dict[frozenset[tuple[str, str]], ChainRules] = {}
        # core/decide.py's memo of outcomes under these rules, by what it reads of a pod and of a node.
        self.outcomes: dict[Any, Any] = {}
        # Every owner kind some policy lets borrow: any other kind is UNLISTED_OWNER to the memo.
        self.owner_kinds: frozenset[OwnerKind] = SAFE_OWNER_KINDS.union(
            *(chain.policy.owner_kinds for chain in self.chains)
        )

    def keeping_free(self, kept: frozenset[tuple[str, str]]) -> ChainRules:
        """These rules with each (chain, type) pair in `kept` lent by no borrow (core/headroom.py decides which).

        Remembered per set, so a view's borrow_options memo stays warm across requests; the sets seen are few
        (the types some pod asked for lately), and past KEPT_FREE_VIEWS of them the oldest is forgotten.
        """
        if not kept:
            return self
        view = self._keeping.get(kept)
        if view is None:
            view = ChainRules(
                replace(
                    chain,
                    policy=replace(chain.policy, kept_free=frozenset(t for name, t in kept if name == chain.name)),
                )
                for chain in self.chains
            )
            if len(self._keeping) >= KEPT_FREE_VIEWS:
                self._keeping.pop(next(iter(self._keeping), frozenset()), None)
            self._keeping[kept] = view
        return view

    def owner_refusal(self, owner: OwnerKind | None) -> str:
        """Why a pod with this controller borrows along no chain at all, or "" when some policy lets it.

        The kind comes from the pod (its ownerReference), so it is shown as an excerpt.
        """
        if owner is None or owner in self.owner_kinds:
            return ""
        listed = ", ".join(f"{o.kind} ({o.api_version})" for o in sorted(self.owner_kinds, key=str))
        return (
            f"pods owned by a {excerpt(owner.kind)} ({excerpt(owner.api_version)}) keep their own type: "
            f"a borrow replaces a pod under a new name, and only controllers that accept that may borrow "
            f"({listed}; an admin adds others in policy.ownerKinds)"
        )

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

    def borrow_options(
        self, requested: str, gpu_product: str, namespace: str, owner: OwnerKind | None = None
    ) -> tuple[BorrowOption, ...]:
        """Larger types that may stand in for `requested` on a node of `gpu_product`, best first.

        Within one rules file, a type reachable along several chains counts
        once: allowed beats denied, then fewer steps, then the chain name (one
        admin wrote them under one policy, so a shorter chain is a shortcut).
        Across files a denial wins: a file whose policy refuses the pod (borrowing
        off, its namespace, its owner's kind) for a request its chains cover
        denies every larger type for it, and a file that forbids a type (maxSteps,
        allowedTypes) denies that type, whatever other files allow; else the
        files' offers are pooled the same way. So adding a file never opens a
        borrow another file's policy shuts. The list is ordered the same way,
        smaller types first among equal steps.
        """
        if owner is not None and owner not in self.owner_kinds:
            owner = UNLISTED_OWNER  # no policy lists it: every such kind is answered alike
        key = (requested, gpu_product, namespace, owner)
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        upward = self._upward.get((requested, gpu_product))
        if upward is None:
            return ()  # no chain for it: a pod may name any type, so nothing is remembered of it
        by_file: dict[str, dict[str, BorrowOption]] = {}
        refusals: list[tuple[str, str, str]] = []  # (chain, why, file)
        for granted, steps, chain in upward:
            refused = chain.policy.refusal(namespace, chain.name, owner)
            if refused is not None:
                refusals.append((chain.name, refused, chain.source))
            option = BorrowOption(
                granted, steps, chain.name, chain.policy.denial(granted, steps, namespace, chain.name, owner)
            )
            best = by_file.setdefault(chain.source, {})
            current = best.get(granted)
            if current is None or _preference(option) < _preference(current):
                best[granted] = option
        pooled: dict[str, BorrowOption] = {}
        for source, offers in by_file.items():
            # A file's own chains share its policy, so only another file's refusal can veto them.
            vetoes = [(name, why) for name, why, other in refusals if other != source]
            veto = min(vetoes)[1] if vetoes else None
            for granted, offer in offers.items():
                option = (
                    offer if veto is None or offer.denied else BorrowOption(granted, offer.steps, offer.chain, veto)
                )
                current = pooled.get(granted)
                if current is None or _across_files(option) < _across_files(current):
                    pooled[granted] = option
        options = tuple(sorted(pooled.values(), key=_preference))
        if len(self._memo) >= MEMO_ENTRIES:
            self._memo.clear()
        self._memo[key] = options
        return options

    def cross_file_overlaps(self) -> list[str]:
        """One warning per pair of chains from different files that lend for the same request on the same GPU model.

        Each file's policy then governs those borrows too, and a denial in either
        wins (ChainRules.borrow_options): the admin should know that one file's
        namespace exclusion, maxSteps or allowedTypes shuts the other's borrows.
        """
        shared: dict[tuple[Chain, Chain], tuple[set[str], set[str]]] = {}  # pair -> (GPU models, requested types)
        for (requested, product), upward in sorted(self._upward.items()):
            chains = sorted({chain for _, _, chain in upward}, key=lambda chain: chain.name)
            for index, first in enumerate(chains):
                for second in chains[index + 1 :]:
                    if first.source != second.source:
                        products, types = shared.setdefault((first, second), (set(), set()))
                        products.add(product)
                        types.add(requested)
        warnings = []
        for (first, second), (products, types) in shared.items():
            same = "the same policy" if first.policy == second.policy else "different policies"
            lent = ", ".join(short_name(t) for t in sorted(types, key=first.types.index))
            warnings.append(
                f"chain {first.name} ({first.source or 'no file'}) and chain {second.name} "
                f"({second.source or 'no file'}) both lend for {lent} on "
                f"{', '.join(sorted(products))}, under {same}: for those borrows a denial in either file's policy wins"
            )
        return warnings

    def has_chain_for(self, requested: str, gpu_product: str) -> bool:
        return (requested, gpu_product) in self._upward


def _across_files(option: BorrowOption) -> tuple[bool, int, str]:
    # Denied beats allowed across files; among denials, or among offers, fewer steps then the chain name.
    return (option.denied is None, option.steps, option.chain)


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
