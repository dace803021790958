"""The decisions: which nodes fit a pod, how each scores, what a bind grants; pure functions, no I/O.

A pod's MIG requests are granted all-or-nothing on one node. Each requested
type is granted as one type: its own (an exact fit) or a larger type up a chain
(a borrow, `steps` positions higher). Among the ways to grant a pod on a node
the cheapest wins, cost being slices moved times steps moved; ties go to the
order the chains prefer, so the same input always gives the same answer.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import compress, islice, repeat

from extender.core.cluster import MigCounts, NodeState, PodRequest, Snapshot
from extender.core.headroom import lending_rules
from extender.core.mig import short_name
from extender.core.rules import BorrowOption, ChainRules
from extender.core.untrusted import excerpt

MAX_SCORE = 10  # k8s.io/kube-scheduler/extender/v1 MaxExtenderPriority

# Borrow search is exponential in the number of distinct MIG types one pod asks
# for; real pods ask for one or two. Beyond this only exact fits are tried, so a
# pathological pod cannot stall the scheduler.
MAX_BORROW_DEMANDS = 4

# kube-scheduler gets a reason for every node that fails, so an answer must
# grow with the nodes only, whatever the pod carries: a reason names at most
# this many of the pod's MIG types (the pod's text only as a short excerpt),
# and is cut at this length whatever made it long (escaped, as any text shown).
MAX_REASON_TYPES = 2
MAX_REASON_CHARS = 512

# kube-scheduler's own scoring budget (numFeasibleNodesToFind in
# pkg/scheduler/schedule_one.go, with percentageOfNodesToScore unset): every
# node of a small cluster, else 50 % minus 1 % per 125 nodes, at least 5 % and
# at least 100 nodes.
MIN_NODES_TO_PASS = 100
MIN_PERCENT_TO_PASS = 5


def nodes_to_pass(cluster_size: int) -> int:
    """How many fitting nodes the filter passes on, kube-scheduler's default budget for `cluster_size` nodes.

    scheduler-config.yaml sets percentageOfNodesToScore to 100 so that migchain,
    the one judge of MIG fit, sees every node. Passing every fitting node on
    would make kube-scheduler score them all too, which its default never does
    on a large cluster; so the filter passes the best of them, as many as the
    default would have scored.
    """
    if cluster_size < MIN_NODES_TO_PASS:
        return cluster_size
    percent = max(50 - cluster_size // 125, MIN_PERCENT_TO_PASS)
    return max(cluster_size * percent // 100, MIN_NODES_TO_PASS)


@dataclass(frozen=True)
class Grant:
    """`count` slices of `granted` given for a request of `requested` (equal when exact)."""

    requested: str
    granted: str
    count: int
    steps: int = 0
    chain: str | None = None

    @property
    def borrowed(self) -> bool:
        return self.steps > 0

    def describe(self) -> str:
        if not self.borrowed:
            return f"{self.count}x {short_name(self.granted)}"
        steps = "step" if self.steps == 1 else "steps"
        return (
            f"{self.count}x {short_name(self.granted)} for {short_name(self.requested)} "
            f"({self.steps} {steps} up chain {self.chain})"
        )


@dataclass(frozen=True)
class Placement:
    """A way to run the pod on `node`: what each request is granted, and how tight the fit is."""

    node: str
    grants: tuple[Grant, ...]
    leftover: int  # free slices of the granted types left on the node afterwards

    @property
    def cost(self) -> int:
        return sum(grant.count * grant.steps for grant in self.grants)

    @property
    def slices(self) -> MigCounts:
        """What the pod will hold on the node: granted type -> count."""
        taken: dict[str, int] = {}
        for grant in self.grants:
            taken[grant.granted] = taken.get(grant.granted, 0) + grant.count
        return tuple(sorted(taken.items()))

    @property
    def borrows(self) -> bool:
        return self.cost > 0

    def describe(self) -> str:
        if not self.grants:
            return "no MIG request"
        kind = "borrows" if self.borrows else "fits exactly"
        return f"{kind}: " + ", ".join(grant.describe() for grant in self.grants)


@dataclass(frozen=True)
class Rejection:
    """Why the pod cannot run on `node` now; `resolvable` is False when freeing every slice would not help."""

    node: str
    reason: str
    resolvable: bool = True


Verdict = Placement | Rejection


@dataclass(frozen=True)
class FilterDecision:
    passed: tuple[str, ...]
    failed: Mapping[str, str]
    unresolvable: Mapping[str, str]


def place(pod: PodRequest, node: NodeState | None, node_name: str, rules: ChainRules) -> Verdict:
    """The cheapest way to run `pod` on one node, or why there is none."""
    if node is None:
        return Rejection(node_name, f"node {node_name} is not in migchain's cluster cache yet")
    if not pod.mig:
        return Placement(node.name, (), 0)
    if not node.offers_slices:
        return Rejection(
            node.name, f"MIG is being reconfigured on this node (nvidia.com/mig.config.state={node.mig_config_state})"
        )
    options = _options(pod, node, rules)
    grants = _cheapest(pod.mig, options, node.free)
    if grants is not None:
        return Placement(node.name, grants, _leftover(grants, node.free))
    resolvable = _cheapest(pod.mig, options, node.allocatable) is not None
    return Rejection(node.name, _why_not(pod, node, rules), resolvable)


@dataclass(frozen=True)
class _Outcome:
    """What a verdict means for filter and prioritize, shared by every node of the same signature."""

    cost: int | None  # None: it does not fit
    text: str  # the rejection reason, or what the placement does
    resolvable: bool
    score: int


# Outcomes remembered per set of rules (ChainRules.outcomes), by what the decision reads of the pod and of the
# node (NodeState.signature). Past this many the memo starts afresh: hostile pods that each ask for something
# new cost their own decisions, never the memory.
OUTCOMES_KEPT = 65_536


@dataclass(frozen=True)
class _Verdicts:
    """Each named node's outcome, filed by signature: `keys[i]` is `names[i]`'s (None: not in migchain's cache),
    `outcome_of` the outcome of each key."""

    names: Sequence[str]
    keys: list[str | None]
    outcome_of: Mapping[str | None, _Outcome]
    unknown: Mapping[str, _Outcome]  # per name not in the cache: its reason names it


def _verdicts(pod: PodRequest, node_names: Iterable[str], snapshot: Snapshot, rules: ChainRules) -> _Verdicts:
    """Each named node's outcome. Nodes alike in everything the decision reads (NodeState.signature) are
    decided once, and remembered across requests with the rules: a fleet of a few GPU models and layouts has
    few distinct states. The names are filed by signature with map, set and compress, at C speed, never one
    Python step per name: a request of 5,000 names costs little more than reading it. kube-scheduler sends
    each name once; a name sent twice is answered twice."""
    if pod.may_borrow:
        rules = lending_rules(snapshot, rules)
    names = node_names if isinstance(node_names, Sequence) else list(node_names)
    keys = list(map(snapshot.node_signatures().get, names))
    memo = rules.outcomes
    if len(memo) > OUTCOMES_KEPT:
        memo.clear()
    asking = (pod.mig, pod.no_borrow, pod.namespace, pod.owner)  # all that place() reads of the pod
    outcome_of: dict[str | None, _Outcome] = {}
    named: dict[str | None, str] | None = None
    distinct = set(keys)
    for key in distinct:
        outcome = memo.get((asking, key)) if key is not None else None
        if outcome is None and key is not None:
            if named is None:
                named = dict(zip(keys, names, strict=True))  # a name of each signature, to decide it on
            name = named[key]
            verdict = place(pod, snapshot.nodes[name], name, rules)
            if isinstance(verdict, Placement):
                outcome = _Outcome(verdict.cost, _reason(verdict.describe()), True, score(verdict))
            else:
                outcome = _Outcome(None, _reason(verdict.reason), verdict.resolvable, 0)
            memo[(asking, key)] = outcome
        if outcome is not None:
            outcome_of[key] = outcome
    unknown = {}
    if None in distinct:
        unknown = {
            name: _Outcome(None, f"node {name} is not in migchain's cluster cache yet", True, 0)
            for name in compress(names, map(operator.not_, keys))
        }
    return _Verdicts(names, keys, outcome_of, unknown)


def filter_nodes(
    pod: PodRequest,
    node_names: Iterable[str],
    snapshot: Snapshot,
    rules: ChainRules,
    keep: int | None = None,
    *,
    reasons: bool = True,
) -> FilterDecision:
    """Split the candidate nodes into those that pass and those that fail, with a reason each.

    Only the cheapest fits pass: if any node fits exactly, nodes that would need
    a borrow fail with a reason saying so. Scores alone could not promise this,
    because kube-scheduler adds the extender's score to its own plugins' scores.
    Of the cheapest fits only the best scored pass (the tightest fits), so that
    kube-scheduler needs no prioritize call to pack: its own plugins choose
    among nodes migchain holds equal. With `keep`, at most that many pass, the
    first in the order given. The fitting nodes left out are in neither list:
    nothing is wrong with them, and a reason each would only grow the reply.

    Without `reasons`, the failing nodes get their reasons only when no node
    passes: kube-scheduler reads them only then (for its FailedScheduling
    event and for preemption), and at 5,000 nodes they were most of the reply.
    """
    verdicts = _verdicts(pod, node_names, snapshot, rules)
    names, keys, outcome_of = verdicts.names, verdicts.keys, verdicts.outcome_of
    costs = {key: outcome.cost for key, outcome in outcome_of.items() if outcome.cost is not None}
    cheapest = min(costs.values(), default=0)
    passing = {key for key, cost in costs.items() if cost == cheapest}
    best = max((outcome_of[key].score for key in passing), default=0)
    tightest = {key for key in passing if outcome_of[key].score == best}
    passed = list(islice(compress(names, map(tightest.__contains__, keys)), keep))  # one pass, cut at `keep`
    if passed and not reasons:
        return FilterDecision(tuple(passed), {}, {})
    offering = sum(map(passing.__contains__, keys))  # nodes at the cheapest cost, the tightest or not
    # Why each other node fails, said once per signature and handed to every name of it.
    failing = {key: o.text for key, o in outcome_of.items() if o.cost is None and o.resolvable}
    better = "an exact fit" if cheapest == 0 else f"a borrow of cost {cheapest}"
    failing.update(
        (key, f"{outcome_of[key].text}; {offering} other node(s) offer {better}") for key in costs.keys() - passing
    )
    hopeless = {key: o.text for key, o in outcome_of.items() if o.cost is None and not o.resolvable}
    failed = _by_name(names, keys, failing)
    failed.update((name, outcome.text) for name, outcome in verdicts.unknown.items())
    return FilterDecision(tuple(passed), failed, _by_name(names, keys, hopeless))


def _by_name(names: Sequence[str], keys: list[str | None], by_key: Mapping[str | None, str]) -> dict[str, str]:
    """Each of `names` whose key (`keys`, position for position) is in `by_key`, with that key's value."""
    if not by_key:
        return {}
    chosen = map(by_key.__contains__, keys)
    return dict(zip(compress(names, chosen), map(by_key.__getitem__, filter(by_key.__contains__, keys)), strict=True))


def cheapest_cost(pod: PodRequest, node_names: Iterable[str], snapshot: Snapshot, rules: ChainRules) -> int | None:
    """The lowest cost at which `pod` fits any of the named nodes (0: an exact fit), or None if it fits none."""
    return min(_costs(pod, node_names, snapshot, rules), default=None)


def refuse_needless_borrow(
    pod: PodRequest, placement: Placement, candidates: Iterable[str], snapshot: Snapshot, rules: ChainRules
) -> Verdict:
    """`placement`, or its refusal when another of the `candidates` now fits the pod at a lower cost.

    The filter passes only the cheapest fits, but between filter and bind a
    concurrent bind can take the chosen node's last exact slice. Borrowing
    there anyway would borrow while an exact slice sits free on another node
    kube-scheduler found feasible; refused, the pod is scheduled again.
    `candidates` must be nodes the pod may run on (they passed kube-scheduler's
    own filters), since migchain cannot redo those.
    """
    if not placement.borrows:
        return placement
    costs = _costs(pod, candidates, snapshot, rules)
    best = min(costs, default=None)
    if best is None or best >= placement.cost:
        return placement
    better = "an exact fit" if best == 0 else f"a borrow of cost {best}"
    return Rejection(
        placement.node,
        f"on this node it now {placement.describe()}, while {costs.count(best)} other feasible node(s) offer {better}",
    )


def _costs(pod: PodRequest, node_names: Iterable[str], snapshot: Snapshot, rules: ChainRules) -> list[int]:
    """The cost of the pod on each named node it fits."""
    verdicts = _verdicts(pod, node_names, snapshot, rules)
    cost_of = {key: o.cost for key, o in verdicts.outcome_of.items() if o.cost is not None}
    return list(map(cost_of.__getitem__, filter(cost_of.__contains__, verdicts.keys)))


def score(verdict: Verdict) -> int:
    """0..10: an exact fit beats any borrow, fewer steps beat more, and a tighter fit beats a looser one.

    Tighter means fewer free slices of the granted types left on the node (best
    fit): nodes with many free slices stay whole for pods that ask for several.
    The bands never overlap, so packing never outweighs steps.
    """
    if isinstance(verdict, Rejection):
        return 0
    tight = verdict.leftover == 0
    close = verdict.leftover <= 2
    if verdict.cost == 0:
        return 10 if tight else 9 if close else 8
    if verdict.cost == 1:
        return 7 if tight else 6
    if verdict.cost == 2:
        return 5 if tight else 4
    return max(0, 6 - verdict.cost)  # 3 steps -> 3, 4 -> 2, 5 -> 1, more -> 0


def score_nodes(pod: PodRequest, node_names: Iterable[str], snapshot: Snapshot, rules: ChainRules) -> dict[str, int]:
    verdicts = _verdicts(pod, node_names, snapshot, rules)
    score_of = {key: outcome.score for key, outcome in verdicts.outcome_of.items()}
    return dict(zip(verdicts.names, map(score_of.get, verdicts.keys, repeat(0)), strict=True))


def _options(pod: PodRequest, node: NodeState, rules: ChainRules) -> list[list[Grant]]:
    """Per requested type, the grants worth trying in order of preference: exact first."""
    may_borrow = pod.may_borrow and len(pod.mig) <= MAX_BORROW_DEMANDS
    options = []
    for requested, count in pod.mig:
        tries = [Grant(requested, requested, count)]
        if may_borrow:
            tries += [
                Grant(requested, option.granted, count, option.steps, option.chain)
                for option in rules.borrow_options(requested, node.gpu_product, pod.namespace, pod.owner)
                if option.allowed
            ]
        options.append(tries)
    return options


def _cheapest(
    demands: tuple[tuple[str, int], ...], options: list[list[Grant]], free: Mapping[str, int]
) -> tuple[Grant, ...] | None:
    """Depth-first over the grant options with branch-and-bound on cost.

    Options are visited in preference order and only a strictly cheaper
    solution replaces the best, so ties keep the first one found.
    """
    best: tuple[Grant, ...] | None = None
    best_cost = -1
    remaining = dict(free)
    chosen: list[Grant] = []

    def visit(index: int, cost: int) -> None:
        nonlocal best, best_cost
        if best is not None and cost >= best_cost:
            return
        if index == len(demands):
            best, best_cost = tuple(chosen), cost
            return
        for grant in options[index]:
            if remaining.get(grant.granted, 0) >= grant.count:
                remaining[grant.granted] -= grant.count
                chosen.append(grant)
                visit(index + 1, cost + grant.count * grant.steps)
                chosen.pop()
                remaining[grant.granted] += grant.count

    visit(0, 0)
    return best


def _leftover(grants: tuple[Grant, ...], free: Mapping[str, int]) -> int:
    taken = Placement("", grants, 0).slices
    return sum(free.get(granted, 0) - count for granted, count in taken)


def _why_not(pod: PodRequest, node: NodeState, rules: ChainRules) -> str:
    """One line a human understands: what is short, and why no larger type could stand in.

    It names no per-node counts: kube-scheduler folds equal reasons into one
    line of the FailedScheduling event ("0/20 nodes are available: 20 <reason>"),
    so nodes in the same state must give the same words.
    """
    shared = _no_borrow_note(pod, rules)  # why no type may borrow, said once
    parts = []
    for requested, count in pod.mig:
        if node.allocatable.get(requested, 0) < count:
            part = (
                f"no {short_name(requested)} on this node"
                if count == 1
                else (f"fewer than {count} {short_name(requested)} on this node")
            )
        elif node.free.get(requested, 0) < count:
            part = (
                f"no free {short_name(requested)}" if count == 1 else f"fewer than {count} free {short_name(requested)}"
            )
        else:
            continue
        parts.append(part + ("" if shared else _borrow_note(pod, node, rules, requested, count)))
    if len(parts) > MAX_REASON_TYPES:
        parts[MAX_REASON_TYPES:] = [f"and {len(parts) - MAX_REASON_TYPES} more MIG type(s) short"]
    return "; ".join(parts) + shared


def _reason(text: str) -> str:
    """A node's reason as it goes into an answer: printable, and short whatever the pod asks for."""
    return excerpt(text, MAX_REASON_CHARS)


def _no_borrow_note(pod: PodRequest, rules: ChainRules) -> str:
    if pod.no_borrow:
        return f" (borrowing off: {pod.no_borrow})"
    refusal = rules.owner_refusal(pod.owner)
    if refusal:
        return f" (borrowing off: {refusal})"
    if len(pod.mig) > MAX_BORROW_DEMANDS:
        return f" (borrowing is tried only for pods with at most {MAX_BORROW_DEMANDS} MIG types)"
    return ""


def _borrow_note(pod: PodRequest, node: NodeState, rules: ChainRules, requested: str, count: int) -> str:
    if not rules.has_chain_for(requested, node.gpu_product):
        return f" (no chain for it on GPU model {node.gpu_product or '(unlabelled)'})"
    options = rules.borrow_options(requested, node.gpu_product, pod.namespace, pod.owner)
    return " (larger: " + ", ".join(_option_note(option, node, count) for option in options) + ")"


def _option_note(option: BorrowOption, node: NodeState, count: int) -> str:
    if option.denied is not None:
        return f"{short_name(option.granted)} denied: {option.denied}"
    return f"{short_name(option.granted)} none free" if count == 1 else f"{short_name(option.granted)} too few free"
