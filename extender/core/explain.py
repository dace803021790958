"""`migchain explain`: what migchain answers for one pod, node by node, with the rules that made it; pure.

Nothing here decides. Every verdict and score is what `filter_nodes` and
`score_nodes` answer (with the extender's `nodes_to_pass` budget), every
placement what `place` gives, every return what `plan_returns` plans: this
module only puts those answers beside the policy lines they read, so that an
admin sees why. No I/O, no clock.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from extender.core.cluster import MIGCHAIN_SCHEDULER, MigCounts, NodeState, PodRecord, PodRequest, Snapshot
from extender.core.decide import (
    MAX_BORROW_DEMANDS,
    FilterDecision,
    Placement,
    filter_nodes,
    nodes_to_pass,
    place,
    score_nodes,
)
from extender.core.headroom import lending_rules
from extender.core.loan import Loan, record_loan
from extender.core.mig import short_name
from extender.core.returns import (
    MAX_RESTARTS_ANNOTATION,
    RETURN_ANNOTATION,
    Borrower,
    Restore,
    blocked_pending,
    borrowers_of,
    loan_policy,
    pending_requests,
    plan_returns,
    restored_request,
    return_mode_of,
    worth_a_return,
)
from extender.core.rules import BorrowOption, Chain, ChainRules, PodOptOuts, ReturnMode
from extender.core.status import text_table
from extender.core.untrusted import excerpt


class Fit(enum.Enum):
    """What a node is for the pod, in the words of the filter's answer."""

    EXACT = "exact"  # passes: its own types fit
    BORROW = "borrow"  # passes: fits by borrowing larger types
    COSTLIER = "costlier"  # fits, but fails: other nodes fit more cheaply (an exact fit, or fewer steps)
    LOOSER = "looser"  # fits as cheaply as the best, but others fit tighter: the filter passes only the tightest
    BUDGET = "over budget"  # fits as well as the best, but the filter passes at most `budget` nodes
    NO_FIT = "no fit"  # fails now (FailedNodes): freeing slices could help
    UNRESOLVABLE = "unresolvable"  # fails even if every slice were free (FailedAndUnresolvableNodes)


class Answer(enum.Enum):
    """Where the node is in the extender's ExtenderFilterResult."""

    PASSED = "passed"  # NodeNames
    FAILED = "failed"  # FailedNodes
    UNRESOLVABLE = "unresolvable"  # FailedAndUnresolvableNodes
    LEFT_OUT = "left out"  # in no list: it fits, but others fit tighter or the budget was full


@dataclass(frozen=True)
class NodeVerdict:
    name: str
    gpu_product: str  # "" for a node migchain does not know
    fit: Fit
    answer: Answer
    reason: str  # the FailedNodes text for a failing node; what the placement grants otherwise
    score: int  # what /prioritize answers for it
    placement: Placement | None  # how it would run there, when it fits at all


@dataclass(frozen=True)
class RequestPolicy:
    """One requested type on one GPU model: the chains that cover it and what each larger type may do."""

    requested: str
    count: int
    gpu_product: str
    chains: tuple[str, ...]  # chains listing the type for this model; none: only an exact fit
    options: tuple[BorrowOption, ...]  # from ChainRules.borrow_options, best first, each allowed or denied


@dataclass(frozen=True)
class ReturnOutlook:
    """A borrower's loan and whether, when and why the returner would give it back."""

    loan: Loan
    node: str
    running: bool  # only a running borrower is ever returned
    chain_modes: tuple[tuple[str, ReturnMode | None], ...]  # each chain of the loan, its returnMode now (None: gone)
    mode: ReturnMode  # what the returner applies (return_mode_of)
    restarts: int
    max_restarts: str | None  # the pod's migchain.io/max-restarts, as written (an excerpt)
    held_back: str  # why it may not be returned at all; "" when it may
    restore: Restore | None  # the return plan_returns makes now, if any
    condition: str  # what would make the returner return it
    facts: tuple[str, ...]  # the cluster now, as far as the condition reads it
    why_not: str  # why it is not returned now; "" when it is
    ignored_opt_outs: tuple[str, ...] = ()  # the pod's opt-outs its chain's policy does not honour (podOptOuts)


@dataclass(frozen=True)
class Explanation:
    pod: PodRecord
    state: str  # pending, bound to NODE, finished, terminating
    cluster_size: int  # nodes migchain knows: what the budget is computed from
    budget: int  # at most this many fitting nodes pass the filter
    candidates_from: str  # how the candidate nodes were chosen
    nodes: tuple[NodeVerdict, ...]  # passed first, best score first
    requests: tuple[RequestPolicy, ...]
    chains: tuple[Chain, ...]  # the chains named in `requests`, in load order
    outlook: ReturnOutlook | None  # for a borrower
    unblocking: tuple[Restore, ...]  # returns planned now to make room for this (pending) pod
    notes: tuple[str, ...]
    no_borrow: str = ""  # why the pod may not borrow at all (its opt-out, its owner's kind); "" when it may

    @property
    def passed(self) -> tuple[str, ...]:
        return tuple(node.name for node in self.nodes if node.answer is Answer.PASSED)


def candidate_nodes(request: PodRequest, snapshot: Snapshot) -> list[str]:
    """The nodes migchain knows that the pod may run on (`PodRequest.may_run_on`), sorted.

    That is kube-scheduler's nodeSelector, required node affinity, taint and
    cordon filters, as the return planner applies them. Its other filters (CPU
    and memory, pod affinity, topology spread) are not applied, so this may
    name a node kube-scheduler would never send to migchain;
    `migchain explain --nodes` gives the list exactly.
    """
    return sorted(name for name, node in snapshot.nodes.items() if request.may_run_on(node))


def explain(
    pod: PodRecord,
    snapshot: Snapshot,
    rules: ChainRules,
    candidates: Sequence[str],
    records: Iterable[PodRecord] = (),
    *,
    budget: int | None = None,
    candidates_from: str = "",
    schedulers: Sequence[str] = (MIGCHAIN_SCHEDULER,),
    loan_doubt: str = "",
) -> Explanation:
    """What /filter and /prioritize answer for `pod` over `candidates`, and the returner's view of it.

    `records` are every pod of the cluster (the pod itself among them): they
    give the borrowers and the pending pods `plan_returns` plans over, those
    for `schedulers` (the returner's --scheduler-name).
    `budget` defaults to the extender's, `nodes_to_pass(len(snapshot.nodes))`.
    `loan_doubt` says why the pod's loan record was not believed (its record
    as the loan guard left it, `core/loan.py` `vouched`), "" when it was.
    """
    request = pod.request
    keep = nodes_to_pass(len(snapshot.nodes)) if budget is None else budget
    decision = filter_nodes(request, candidates, snapshot, rules, keep)
    scores = score_nodes(request, candidates, snapshot, rules)
    passed = set(decision.passed)
    best = max((scores[name] for name in passed), default=0)  # the score of the fits the filter passes
    verdicts = []
    lending = lending_rules(snapshot, rules)  # what filter and bind decide with: the types kept free not lent
    for name in dict.fromkeys(candidates):
        node = snapshot.nodes.get(name)
        verdict = place(request, node, name, lending)
        placement = verdict if isinstance(verdict, Placement) else None
        verdicts.append(
            _verdict(name, node, placement, decision=decision, passed=passed, score=scores[name], keep=keep, best=best)
        )
    verdicts.sort(key=_display_order)
    records = list(records)
    borrowers = borrowers_of(records, rules)
    pending = pending_requests(records, schedulers)
    plans = plan_returns(snapshot, borrowers, pending, rules) if borrowers else ()
    outlook = _outlook(pod, snapshot, rules, pending=pending, borrowers=borrowers, plans=plans)
    requests = _request_policies(request, snapshot, candidates, rules)
    named = {chain for line in requests for chain in line.chains}
    return Explanation(
        pod=pod,
        state=_state(pod),
        cluster_size=len(snapshot.nodes),
        budget=keep,
        candidates_from=candidates_from,
        nodes=tuple(verdicts),
        requests=requests,
        chains=tuple(chain for chain in rules.chains if chain.name in named),
        outlook=outlook,
        unblocking=tuple(plan for plan in plans if plan.unblocks == request.key),
        notes=_notes(pod, schedulers, loan_doubt, rules.owner_refusal(request.owner)),
        no_borrow=request.no_borrow or rules.owner_refusal(request.owner),
    )


def _verdict(
    name: str,
    node: NodeState | None,
    placement: Placement | None,
    *,
    decision: FilterDecision,
    passed: set[str],
    score: int,
    keep: int,
    best: int,
) -> NodeVerdict:
    product = node.gpu_product if node is not None else ""
    failed, unresolvable = decision.failed, decision.unresolvable
    if name in passed:
        assert placement is not None
        fit = Fit.BORROW if placement.borrows else Fit.EXACT
        return NodeVerdict(name, product, fit, Answer.PASSED, placement.describe(), score, placement)
    if name in unresolvable:
        return NodeVerdict(name, product, Fit.UNRESOLVABLE, Answer.UNRESOLVABLE, unresolvable[name], score, None)
    if name in failed:
        fit = Fit.NO_FIT if placement is None else Fit.COSTLIER
        return NodeVerdict(name, product, fit, Answer.FAILED, failed[name], score, placement)
    assert placement is not None  # neither passed nor failed: a looser fit, or one the budget left out
    if score < best:
        reason = f"{placement.describe()}; left out: other nodes fit tighter (score {best}), and only they pass"
        return NodeVerdict(name, product, Fit.LOOSER, Answer.LEFT_OUT, reason, score, placement)
    reason = f"{placement.describe()}; left out: the filter passes at most {keep} fitting nodes"
    return NodeVerdict(name, product, Fit.BUDGET, Answer.LEFT_OUT, reason, score, placement)


_ANSWER_ORDER = {Answer.PASSED: 0, Answer.LEFT_OUT: 1, Answer.FAILED: 2, Answer.UNRESOLVABLE: 3}


def _display_order(verdict: NodeVerdict) -> tuple[int, bool, int, str]:
    # Passed nodes best first, as kube-scheduler will rank them; then near misses, then the rest.
    return (_ANSWER_ORDER[verdict.answer], verdict.placement is None, -verdict.score, verdict.name)


def _state(pod: PodRecord) -> str:
    if pod.terminal:
        return "finished"
    if pod.terminating:
        return "terminating"
    return f"bound to {pod.node}" if pod.node else "pending"


def _notes(pod: PodRecord, schedulers: Sequence[str], loan_doubt: str, owner_refusal: str) -> tuple[str, ...]:
    request = pod.request
    notes = []
    if not request.mig:
        notes.append("it asks for no MIG slice: kube-scheduler does not consult migchain for it")
    notes += _demand_notes(pod, schedulers)
    if loan_doubt:
        notes.append(f"its loan record is not believed: it is not treated as a borrower ({loan_doubt})")
    if request.no_borrow:
        notes.append(f"it may not borrow: {request.no_borrow}")
    elif owner_refusal:
        notes.append(f"it may not borrow: {owner_refusal}")
    elif len(request.mig) > MAX_BORROW_DEMANDS:
        notes.append(f"it asks for more than {MAX_BORROW_DEMANDS} MIG types: only exact fits are tried")
    else:
        notes.append(
            "it may borrow: no migchain.io/borrow opt-out, and a bare pod or one whose owner's kind a borrow "
            "may replace (the chains' policies below still apply)"
        )
    if pod.node and not pod.terminal:
        notes.append(
            f"it is bound to {pod.node}: the verdicts are what the extender would answer for this request now, "
            "with the pod's own slices counted as used"
        )
    return tuple(notes)


def _demand_notes(pod: PodRecord, schedulers: Sequence[str]) -> list[str]:
    """For a pending pod: whether, and where, the returner counts it as waiting."""
    if pod.node or pod.terminal or pod.terminating or not pod.request.mig:
        return []
    constraints = pod.request.constraints
    if pod.scheduler_name not in schedulers:
        served = ", ".join(schedulers)
        return [f"no return is made for it: its schedulerName {pod.scheduler_name!r} is not migchain's ({served})"]
    if pod.gates:
        return [f"no return is made for it while it has scheduling gates ({', '.join(pod.gates)})"]
    if constraints.unreadable:
        return [f"no return is made for it: {constraints.describe()}"]
    if constraints.depends_on_pods:
        return [f"no return is made for it: with {constraints.depends_on_pods}, where it may run depends on other pods"]
    return [f"the returner counts it as waiting on the nodes it may run on ({constraints.describe()})"]


def _request_policies(
    request: PodRequest, snapshot: Snapshot, candidates: Sequence[str], rules: ChainRules
) -> tuple[RequestPolicy, ...]:
    products = sorted({snapshot.nodes[name].gpu_product for name in candidates if name in snapshot.nodes})
    lending = lending_rules(snapshot, rules)
    lines = []
    for requested, count in request.mig:
        for product in products:
            chains = tuple(c.name for c in rules.chains if requested in c.types and product in c.gpu_products)
            options = lending.borrow_options(requested, product, request.namespace, request.owner) if chains else ()
            lines.append(RequestPolicy(requested, count, product, chains, options))
    return tuple(lines)


def _outlook(
    pod: PodRecord,
    snapshot: Snapshot,
    rules: ChainRules,
    *,
    pending: Sequence[PodRequest],
    borrowers: Sequence[Borrower],
    plans: Sequence[Restore],
) -> ReturnOutlook | None:
    loan = record_loan(pod)
    if not isinstance(loan, Loan):
        return None  # no loan, or one that cannot be read: a note says so
    loaded = {chain.name: chain.policy.return_mode for chain in rules.chains}
    chain_modes = tuple((name, loaded.get(name)) for name in loan.chains)
    written = pod.migchain.get(MAX_RESTARTS_ANNOTATION)
    cap = None if written is None else excerpt(written)
    ignored = _ignored_opt_outs(pod, loan_policy(loan, rules).pod_opt_outs)
    me = next((b for b in borrowers if b.key == pod.request.key), None)
    if me is None:
        condition = "never while it is not running: only a running borrower is returned"
        return ReturnOutlook(
            loan=loan,
            node=pod.node,
            running=False,
            chain_modes=chain_modes,
            mode=return_mode_of(loan, rules),
            restarts=loan.restarts,
            max_restarts=cap,
            held_back="",
            restore=None,
            condition=condition,
            facts=(),
            why_not=condition,
            ignored_opt_outs=ignored,
        )
    restore = next((plan for plan in plans if plan.borrower.key == me.key), None)
    original, borrowed = _counts(loan.original), _counts(loan.borrowed)
    homes = _exact_homes(me, snapshot, rules)
    facts = [
        f"free {original} where it fits exactly: "
        + (", ".join(homes) if homes else "none")
        + " (before the pending pods that fit now take theirs)"
    ]
    waiting: list[str] = []
    if me.mode is ReturnMode.ON_DEMAND and not me.held_back:
        blocked = blocked_pending(snapshot, pending, rules)  # as the returner plans (no claims here)
        waiting = _waiting_for(blocked, loan, snapshot.nodes.get(pod.node), rules)
        facts.append("pending pods that fit nowhere now: " + (", ".join(w.key for w in blocked) or "none"))
        facts.append(
            f"of them, allowed on {pod.node} and fitting the {borrowed} it would give back there: "
            + (", ".join(waiting) or "none")
        )
    if me.held_back:
        condition = f"never while {me.held_back}"
    elif me.mode is ReturnMode.NEVER:
        condition = "never: returnMode never"
    elif me.mode is ReturnMode.EAGER:
        condition = (
            f"as soon as a {original} is free on a node where it fits exactly (eager); "
            "the youngest loan goes first (least work lost), then more steps, then fewer restarts"
        )
    else:
        condition = (
            f"when a {original} is free on a node where it fits exactly and a pending pod that fits nowhere "
            f"may run on {pod.node} and would fit the {borrowed} it gives back there (on-demand)"
        )
    if not me.held_back and me.mode is not ReturnMode.NEVER:
        condition += (
            f"; or, back to Pending, when a pod waiting {me.reclaim_after} s or more for its own {borrowed} "
            f"fits nowhere else (reclaimed)"
        )
    why_not = ""
    if restore is None:
        if me.held_back or me.mode is ReturnMode.NEVER:
            why_not = condition
        elif not homes:
            why_not = f"no free {original} where it would fit exactly"
        elif me.mode is ReturnMode.ON_DEMAND and not waiting:
            why_not = f"no pending pod waits for the {borrowed} it holds"
        else:
            why_not = (
                f"the free {original} go first to pending pods that fit now, to borrowers ahead of it "
                "or to other returns planned in the same round"
            )
    return ReturnOutlook(
        loan=me.loan,  # its steps as the returner counts them (at most what its chains allow)
        node=pod.node,
        running=True,
        chain_modes=chain_modes,
        mode=me.mode,
        restarts=me.restarts,
        max_restarts=cap,
        held_back=me.held_back,
        restore=restore,
        condition=condition,
        facts=tuple(facts),
        why_not=why_not,
        ignored_opt_outs=ignored,
    )


def _ignored_opt_outs(pod: PodRecord, opt_outs: PodOptOuts) -> tuple[str, ...]:
    """The return opt-outs the pod's owner wrote that the policy does not honour in its namespace."""
    namespace, ignored = pod.request.namespace, []
    never = pod.migchain.get(RETURN_ANNOTATION)
    if never is not None and never != "true" and not opt_outs.honours_return(namespace):
        ignored.append(f"{RETURN_ANNOTATION}={excerpt(never)}")
    cap = pod.migchain.get(MAX_RESTARTS_ANNOTATION)
    if cap is not None and not opt_outs.honours_max_restarts(namespace):
        ignored.append(f"{MAX_RESTARTS_ANNOTATION}={excerpt(cap)}")
    return tuple(ignored)


def _exact_homes(borrower: Borrower, snapshot: Snapshot, rules: ChainRules) -> list[str]:
    """Nodes where the borrower's original request fits exactly now and it may run, as its restored pod would ask."""
    restored = restored_request(borrower)
    return [
        name
        for name, node in sorted(snapshot.nodes.items())
        if restored.may_run_on(node) and isinstance(place(restored, node, name, rules), Placement)
    ]


def _waiting_for(blocked: Sequence[PodRequest], loan: Loan, home: NodeState | None, rules: ChainRules) -> list[str]:
    """The blocked pods a return may be spent for on the borrower's node, and that fit its borrowed slices."""
    if home is None:
        return []
    freed = home.without(loan.borrowed)
    return [
        w.key for w in blocked if worth_a_return(w, home) and isinstance(place(w, freed, home.name, rules), Placement)
    ]


def _counts(counts: MigCounts) -> str:
    return ", ".join(short_name(r) if n == 1 else f"{n}x {short_name(r)}" for r, n in counts) or "nothing"


# -- showing it ---------------------------------------------------------------


def explain_text(explanation: Explanation) -> str:
    """A table of the nodes, then the policy lines, then the loan (for a borrower): for a human."""
    e = explanation
    request = e.pod.request
    asks = _counts(request.mig) if request.mig else "no MIG slice"
    if e.outlook is not None:
        asks += f" (a borrower: it asked for {_counts(e.outlook.loan.original)})"
    lines = [f"pod {request.key}: {e.state}; asks for {asks}"]
    lines += [f"  {note}" for note in e.notes]
    origin = f" ({e.candidates_from})" if e.candidates_from else ""
    lines.append(
        f"candidates: {len(e.nodes)} node(s){origin} of {e.cluster_size} migchain knows; "
        f"the filter passes at most {e.budget} fitting node(s)"
    )
    lines.append("")
    if e.nodes:
        header = ["NODE", "GPU", "FIT", "FILTER", "SCORE", "WHY"]
        rows = [
            [node.name, node.gpu_product or "-", node.fit.value, node.answer.value, str(node.score), node.reason]
            for node in e.nodes
        ]
        lines += text_table(header, rows)
    else:
        lines.append("no candidate node")
    if e.requests or e.chains:
        lines += ["", "policy:"]
    for line in e.requests:
        head = f"  {_counts(((line.requested, line.count),))} on {line.gpu_product or '(unlabelled GPU model)'}: "
        if not line.chains:
            lines.append(head + "no chain lists it for this GPU model: only an exact fit")
            continue
        lines.append(head + "chain " + ", ".join(line.chains))
        if not line.options:
            lines.append("    no larger type on the chain")
        for option in line.options:
            steps = "step" if option.steps == 1 else "steps"
            verdict = "allowed" if option.allowed else f"denied: {option.denied}"
            lines.append(
                f"    {short_name(option.granted):<9} {option.steps} {steps:<5} up {option.chain:<16} {verdict}"
            )
    for chain in e.chains:
        source = f" ({chain.source})" if chain.source else ""
        lines.append(f"  chain {chain.name}{source}: {_policy_text(chain, request.namespace)}")
    for plan in e.unblocking:
        lines += [
            "",
            f"a return is planned now to make room for it: {plan.borrower.key} on {plan.borrower.record.node} "
            f"goes back to {plan.target} ({plan.reason})",
        ]
    if e.outlook is not None:
        lines += ["", *_outlook_text(e.outlook)]
    return "\n".join(lines)


def _policy_text(chain: Chain, namespace: str) -> str:
    policy = chain.policy
    allowed = (
        "all types"
        if policy.allowed_types is None
        else " ".join(sorted(map(short_name, policy.allowed_types))) or "none"
    )
    selector = policy.namespaces
    namespaces = ", ".join(sorted(selector.include)) if selector.include else "all"
    if selector.exclude:
        namespaces += " except " + ", ".join(sorted(selector.exclude))
    covered = "covered" if selector.admits(namespace) else "NOT covered"
    # A dry-run chain decides as usual but only announces its borrows and returns.
    dry_run = "on" if policy.dry_run is not None and policy.dry_run.admits(namespace) else "off"
    opt_outs = policy.pod_opt_outs
    honoured = [
        name for name, yes in (("return", opt_outs.never_return), ("maxRestarts", opt_outs.max_restarts)) if yes
    ]
    honoured = honoured if opt_outs.namespaces.admits(namespace) else []
    return (
        f"borrowing {'on' if policy.borrowing else 'OFF'}; "
        f"maxSteps {'unlimited' if policy.max_steps is None else policy.max_steps}; "
        f"allowedTypes {allowed}; namespaces {namespaces} ({namespace} {covered}); "
        f"returnMode {policy.return_mode.value}; reclaimAfterSeconds {policy.reclaim_after_seconds}; "
        f"headroomSeconds {policy.headroom_seconds}; "
        f"dryRun {dry_run} for {namespace}; "
        f"pod opt-outs honoured for {namespace}: {', '.join(honoured) or 'none'}"
    )


def _outlook_text(outlook: ReturnOutlook) -> list[str]:
    loan = outlook.loan
    steps = "step" if loan.steps == 1 else "steps"
    modes = ", ".join(
        f"chain {name}: {'no longer loaded, on-demand by default' if mode is None else mode.value}"
        for name, mode in outlook.chain_modes
    )
    cap = f"max {outlook.max_restarts} ({MAX_RESTARTS_ANNOTATION})" if outlook.max_restarts else "no cap"
    now = (
        f"yes: back to {outlook.restore.target}, because {outlook.restore.reason}"
        if outlook.restore is not None
        else f"no: {outlook.why_not}"
    )
    return [
        f"loan: {_counts(loan.original)} -> {_counts(loan.borrowed)} on {outlook.node or '(unbound)'}, "
        f"{loan.steps} {steps} up {', '.join(loan.chains) or '(no chain recorded)'}",
        f"  return mode: {outlook.mode.value} ({modes or 'no chain recorded: on-demand by default'})",
        f"  restarts: {outlook.restarts}, {cap}",
        *(f"  pod opt-out not honoured by its chain's policy (podOptOuts): {o}" for o in outlook.ignored_opt_outs),
        f"  returned: {outlook.condition}",
        f"  returned now: {now}",
        *(f"    {fact}" for fact in outlook.facts),
        "  (the returner also keeps slices for returns under way and waits after a PodDisruptionBudget refusal; "
        "explain does not see those)",
    ]


def explain_document(explanation: Explanation) -> dict[str, Any]:
    """The same as JSON-ready data, with full resource names, for tools."""
    e = explanation
    request = e.pod.request
    return {
        "pod": {
            "namespace": request.namespace,
            "name": request.name,
            "uid": request.uid,
            "state": e.state,
            "node": e.pod.node,
            "requests": dict(request.mig),
            "may_borrow": not e.no_borrow,
            "no_borrow": e.no_borrow,
        },
        "cluster_size": e.cluster_size,
        "budget": e.budget,
        "candidates_from": e.candidates_from,
        "nodes": [
            {
                "name": node.name,
                "gpu_product": node.gpu_product,
                "fit": node.fit.value,
                "filter": node.answer.value,
                "reason": node.reason,
                "score": node.score,
                "cost": None if node.placement is None else node.placement.cost,
                "grants": []
                if node.placement is None
                else [
                    {
                        "requested": grant.requested,
                        "granted": grant.granted,
                        "count": grant.count,
                        "steps": grant.steps,
                        "chain": grant.chain,
                    }
                    for grant in node.placement.grants
                ],
            }
            for node in e.nodes
        ],
        "policy": {
            "requests": [
                {
                    "requested": line.requested,
                    "count": line.count,
                    "gpu_product": line.gpu_product,
                    "chains": list(line.chains),
                    "options": [
                        {
                            "granted": option.granted,
                            "steps": option.steps,
                            "chain": option.chain,
                            "allowed": option.allowed,
                            "denied": option.denied,
                        }
                        for option in line.options
                    ],
                }
                for line in e.requests
            ],
            "chains": [_chain_document(chain, request.namespace) for chain in e.chains],
        },
        "loan": None if e.outlook is None else _outlook_document(e.outlook),
        "returns_for_it": [_restore_document(plan) for plan in e.unblocking],
        "notes": list(e.notes),
    }


def _chain_document(chain: Chain, namespace: str) -> dict[str, Any]:
    policy = chain.policy
    return {
        "name": chain.name,
        "source": chain.source,
        "gpu_products": sorted(chain.gpu_products),
        "types": list(chain.types),
        "borrowing": policy.borrowing,
        "max_steps": policy.max_steps,
        "allowed_types": None if policy.allowed_types is None else sorted(policy.allowed_types),
        "namespaces": {
            "include": sorted(policy.namespaces.include),
            "exclude": sorted(policy.namespaces.exclude),
            "covers_pod": policy.namespaces.admits(namespace),
        },
        "return_mode": policy.return_mode.value,
        "reclaim_after_seconds": policy.reclaim_after_seconds,
        "headroom_seconds": policy.headroom_seconds,
        "dry_run_for_pod": policy.dry_run is not None and policy.dry_run.admits(namespace),
        "pod_opt_outs_for_pod": {
            "return": policy.pod_opt_outs.honours_return(namespace),
            "max_restarts": policy.pod_opt_outs.honours_max_restarts(namespace),
        },
    }


def _outlook_document(outlook: ReturnOutlook) -> dict[str, Any]:
    loan = outlook.loan
    return {
        "original": dict(loan.original),
        "borrowed": dict(loan.borrowed),
        "chains": list(loan.chains),
        "steps": loan.steps,
        "replaced_uid": loan.replaced_uid,
        "node": outlook.node,
        "running": outlook.running,
        "return_mode": outlook.mode.value,
        "chain_return_modes": {name: None if mode is None else mode.value for name, mode in outlook.chain_modes},
        "restarts": outlook.restarts,
        "max_restarts": outlook.max_restarts,
        "held_back": outlook.held_back,
        "ignored_opt_outs": list(outlook.ignored_opt_outs),
        "returned_now": outlook.restore is not None,
        "return": None if outlook.restore is None else _restore_document(outlook.restore),
        "condition": outlook.condition,
        "facts": list(outlook.facts),
        "why_not": outlook.why_not,
    }


def _restore_document(plan: Restore) -> dict[str, Any]:
    return {
        "borrower": plan.borrower.key,
        "node": plan.borrower.record.node,
        "target": plan.target,
        "unblocks": plan.unblocks,
        "reason": plan.reason,
    }
