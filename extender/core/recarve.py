"""The re-carve planner: which whole idle nodes to re-partition, and to which MIG layout; pure, no I/O, no clock.

migchain sees a node's MIG slices only as counts in its allocatable and as the
pods bound to it; it cannot see which GPU of the node a slice (or a pod) is
on. So it plans only whole idle nodes: no pod holds or is about to take a MIG
slice anywhere on them, and every GPU of the node gets the same new layout.
A busy node, a node being re-carved, or a node whose layout migchain cannot
read as a valid layout of its model is never planned. A layout never changes
the GPU's mode (MIG stays on): targets are non-empty layouts of the node's
own model, valid by the placement rules in `core/geometry.py`.

The planner is greedy over nodes, each step taking the (node, layout) with the
best value: the unmet demand it serves (in compute slices) minus what it takes
away (capacity of types nobody is short of counts a little, of types that are
short counts fully) and minus fragmentation (compute left uncarved). Hysteresis:
a re-carve is planned only when what it serves exceeds `margin` times what it
takes away. Cool-down, the per-node hourly limit and the fleet-wide in-flight
limit come from `RecarvePolicy`. Ties break by node name and layout order, so
the plan is a function of its inputs alone.

With `RecarvePolicy.drain`, `plan_drains` picks busy nodes to cordon so that
they empty for a re-carve, and `finish_drain` says when to evict the last
holders of one; the planner itself still plans only idle nodes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from extender.core.cluster import MigCounts, NodeState, ObjectError, PodRequest, Snapshot, quantity
from extender.core.decide import filter_nodes
from extender.core.geometry import MODELS, GpuModel, compute_of, fits_gpu, maximal_layouts, profiles_of
from extender.core.mig import MIG_RESOURCE_PREFIX, is_mig_resource, parse_mig_resource, short_name
from extender.core.rules import MAX_HEADROOM_SECONDS, ChainRules

HOUR = 3600.0
DRAIN_START_ROOM = 2  # a drain starts only when this many times what it takes of each type is spare
GPU_COUNT_LABEL = "nvidia.com/gpu.count"  # set by GPU feature discovery
# NoSchedule while a re-carve of the node is under way: no pod is placed on a node whose slices are about to go.
RECARVING_TAINT = "migchain.io/recarving"


@dataclass(frozen=True)
class RecarvePolicy:
    sustained_seconds: float = 300.0  # unmet demand must have lasted this long
    cooldown_seconds: float = 1800.0  # a node is not re-carved again sooner
    max_per_hour: int = 2  # re-carves per node per hour
    max_in_flight: int = 1  # nodes being re-carved at once, fleet-wide
    # Hysteresis: served compute must exceed `margin` x the weighted compute taken away.
    margin: float = 1.5
    # What one compute slice of a type nobody is short of is worth when a re-carve removes it.
    spare_weight: float = 0.5
    # Drain to re-carve: when no idle node serves the demand, cordon a busy one so it drains, and evict its last
    # holders once waiting has wasted as much as evicting them loses (`finish_drain`).
    drain: bool = False
    # Fairness: a re-carve takes away no slice of a type that its own pods may need. The fleet keeps, per type, as
    # many slices free or lent as its pods asked for in the last `forecast_seconds` (the signal headroom reads; at
    # most an hour) plus what its pending pods ask for now (`spare_slices`); 0 turns the rule off. Half an hour
    # let h100-large-slots' 3g.40gb pods wait 10.9 min instead of 1.2 (docs/recarving.md).
    forecast_seconds: float = 3600.0


@dataclass(frozen=True)
class CarvableNode:
    name: str
    product: str  # nvidia.com/gpu.product
    gpus: int  # nvidia.com/gpu.count
    layout: Mapping[str, int]  # resource -> slices per GPU now (allocatable / gpus)
    idle: bool  # no pod holds or is about to take a MIG slice on it
    recarved_at: tuple[float, ...] = ()  # when it was re-carved before (seconds)
    in_flight: bool = False  # a re-carve of it is under way
    draining: bool = False  # cordoned so that it drains for a re-carve (policy.drain)
    held: Mapping[str, int] = field(default_factory=dict)  # slices held on it now, node-wide (drains pick by it)
    # While draining: compute-slice-seconds its free slices have sat unused since it was cordoned, and the
    # compute-slice-seconds of work its holders would lose if evicted now (time each has run x its slices).
    drain_waste: float = 0.0
    drain_cost: float = 0.0


@dataclass(frozen=True)
class Recarve:
    node: str
    layout: Mapping[str, int]  # resource -> slices per GPU after (the same on every GPU)
    serves: Mapping[str, int]  # unmet slices per type it lets run
    reason: str  # one line for Events / explain / logs


def gpus_of(node: NodeState) -> int:
    """GPUs on the node, from GPU feature discovery's label; 0 when it does not say, or not in plain digits."""
    try:
        return quantity(node.labels.get(GPU_COUNT_LABEL, ""), GPU_COUNT_LABEL)
    except ObjectError:
        return 0


def carvable_node(
    node: NodeState, idle: bool, recarved_at: tuple[float, ...] = (), in_flight: bool = False
) -> CarvableNode | None:
    """`node` as the planner sees it, or None when its GPU count label is missing or its slices do not split evenly
    over its GPUs (then its per-GPU layout is unknown, and it is never planned)."""
    gpus = gpus_of(node)
    if gpus < 1 or any(count % gpus for count in node.allocatable.values()):
        return None
    layout = {resource: count // gpus for resource, count in sorted(node.allocatable.items()) if count}
    return CarvableNode(node.name, node.gpu_product, gpus, layout, idle, recarved_at, in_flight)


def unmet_demand(
    snapshot: Snapshot,
    pending: Sequence[PodRequest],
    rules: ChainRules,
    waited: Mapping[str, float],
    policy: RecarvePolicy,
    *,
    carvable: Sequence[NodeState] | None = None,
) -> dict[str, int]:
    """Slices per MIG resource asked for by `pending` pods that have waited `sustained_seconds` (by `waited`, keyed
    by pod key) and fit no node they may run on, even by borrowing under `rules`: what only a re-carve can serve.

    With `carvable` (the nodes that may be re-carved), only pods that may run on one of them count: a pod pinned
    elsewhere would wait on, whatever a re-carve made. Their re-carve taint is the re-carver's own, set aside."""
    unmet: dict[str, int] = {}
    reachable = None if carvable is None else [without_recarve_taint(node) for node in carvable]
    # Pods alike in request, placement rules and what borrowing policy reads of them (namespace, owner) fit alike.
    fits: dict[object, bool] = {}
    for pod in pending:
        if waited.get(pod.key, 0.0) < policy.sustained_seconds or not pod.mig:
            continue
        key = (pod.mig, pod.constraints, pod.no_borrow, pod.namespace, pod.owner)
        if key not in fits:
            names = [name for name, node in snapshot.nodes.items() if pod.may_run_on(node)]
            served = reachable is None or any(pod.may_run_on(node) for node in reachable)
            fits[key] = not served or bool(filter_nodes(pod, names, snapshot, rules).passed)
        if not fits[key]:
            for resource, count in pod.mig:
                unmet[resource] = unmet.get(resource, 0) + count
    return unmet


def without_recarve_taint(node: NodeState) -> NodeState:
    """`node` as the pods would see it once re-carved: without the taint that cordons it meanwhile."""
    return replace(node, taints=tuple(taint for taint in node.taints if taint.key != RECARVING_TAINT))


def spare_slices(
    snapshot: Snapshot, pending: Sequence[PodRequest], lent: Iterable[MigCounts], policy: RecarvePolicy
) -> dict[str, int] | None:
    """Slices per MIG type a re-carve may take away: the type's free slices, fleet-wide, and those borrowers hold
    (`lent`: each borrower's granted slices; a return gives them back to the type's own pods), beyond what its own
    pods asked for in the last `forecast_seconds` (`Snapshot.demand`) and what pending pods ask for now; None when
    the policy has no forecast. The recent arrivals of a type are the best guess of the next ones
    (core/headroom.py): a re-carve that leaves fewer would make them wait for slices given to another type, or for
    the pods of their own type to end.

    A draining node's free slices count: they are the type's until its re-carve takes them away."""
    if not policy.forecast_seconds:
        return None
    spare: dict[str, int] = {}
    for node in snapshot.nodes.values():
        for resource, count in node.allocatable.items():
            if is_mig_resource(resource):
                spare[resource] = spare.get(resource, 0) + count - node.used.get(resource, 0)
    for slices in lent:
        for resource, count in slices:
            if resource in spare:
                spare[resource] += count
    asked = snapshot.demand.since(min(policy.forecast_seconds, MAX_HEADROOM_SECONDS))
    for pod in pending:
        for resource, count in pod.mig:
            asked[resource] = asked.get(resource, 0) + count
    return {resource: count - asked.get(resource, 0) for resource, count in sorted(spare.items())}


def _model(product: str) -> GpuModel | None:
    return next((model for model in MODELS if product in model.products), None)


def _compute(resource: str) -> int:
    return parse_mig_resource(resource).compute_slices


def _as_profiles(layout: Mapping[str, int]) -> dict[str, int] | None:
    """`{nvidia.com/mig-1g.5gb: 7}` -> `{1g.5gb: 7}`; None when a key is no MIG resource or a count is odd."""
    profiles = {}
    for resource, count in layout.items():
        if not isinstance(count, int) or count < 0 or not is_mig_resource(resource):
            return None
        try:
            parse_mig_resource(resource)
        except ValueError:
            return None
        if count:
            profiles[short_name(resource)] = count
    return profiles


def cooling(node: CarvableNode, now: float, policy: RecarvePolicy) -> str:
    """Why `node` may not be re-carved yet by the cool-down or the hourly limit; empty when it may."""
    if node.recarved_at and now - max(node.recarved_at) < policy.cooldown_seconds:
        return f"cooling down until {max(node.recarved_at) + policy.cooldown_seconds:.0f}"
    recent = sum(1 for at in node.recarved_at if now - at < HOUR)
    if recent >= policy.max_per_hour:
        return f"{recent} re-carves in the last hour (limit {policy.max_per_hour})"
    return ""


@dataclass(frozen=True)
class _Option:
    value: float
    node: CarvableNode
    layout: Mapping[str, int]  # resource -> per GPU
    serves: Mapping[str, int]
    served: int  # compute slices served
    taken: float  # weighted compute slices taken away


def _options(
    node: CarvableNode,
    model: GpuModel,
    unmet: Mapping[str, int],
    wanted: Mapping[str, int],
    policy: RecarvePolicy,
    *,
    spare: Mapping[str, int] | None,
    room: int = 1,
) -> list[_Option]:
    options = []
    for target_profiles in maximal_layouts(model):
        target = {MIG_RESOURCE_PREFIX + p: n for p, n in target_profiles.items()}
        if target == {r: n for r, n in node.layout.items() if n}:
            continue
        removed = {r: node.gpus * (n - target.get(r, 0)) for r, n in node.layout.items() if n > target.get(r, 0)}
        if spare is not None and any(room * n > spare.get(r, 0) for r, n in removed.items()):
            continue  # it would leave a type fewer free slices than its own pods are about to ask for
        serves = {}
        taken = 0.0
        for resource in sorted(set(target) | set(node.layout)):
            change = node.gpus * (target.get(resource, 0) - node.layout.get(resource, 0))
            if change > 0 and unmet.get(resource, 0) > 0:
                serves[resource] = min(change, unmet[resource])
            elif change < 0:
                # Slices a pod asks for now are worth their whole compute; the rest only `spare_weight` of it.
                asked = min(-change, wanted.get(resource, 0))
                taken += _compute(resource) * (asked + policy.spare_weight * (-change - asked))
        served = sum(_compute(r) * n for r, n in serves.items())
        if not served or served <= policy.margin * taken:
            continue
        uncarved = node.gpus * (7 if model.memory_slices == 8 else model.memory_slices) - node.gpus * sum(
            _compute(r) * n for r, n in target.items()
        )
        options.append(_Option(served - taken - uncarved, node, target, serves, served, taken))
    return options


def plan_recarves(
    nodes: Sequence[CarvableNode],
    unmet: Mapping[str, int],
    now: float,
    policy: RecarvePolicy,
    waiting: Mapping[str, int] | None = None,
    *,
    spare: Mapping[str, int] | None = None,
) -> tuple[Recarve, ...]:
    """Re-carves to start now: whole idle nodes, each to one valid layout of its model, best value first.

    At most `max_in_flight` nodes are re-carved at once, fleet-wide. Nodes
    drained for a re-carve come first among equals: they were emptied for it.
    `waiting` (optional): MIG slices per type that pending pods ask for now,
    sustained or not; a re-carve taking away as many slices of a type pays
    their full worth. `spare` (optional, `spare_slices`): slices per type the
    plan may take away in all; a re-carve that would take more of any type
    is never planned.
    """
    budget = policy.max_in_flight - sum(1 for node in nodes if node.in_flight)
    idle = sorted((node for node in nodes if node.idle), key=lambda node: (not node.draining, node.name))
    candidates = _candidates(idle, now, policy)
    plan: list[Recarve] = []
    remaining = _demand(unmet)
    wanted = _wanted(remaining, waiting)
    left = None if spare is None else dict(spare)
    while budget > 0 and remaining and candidates:
        best: _Option | None = None
        for node, model in candidates:
            for option in _options(node, model, remaining, wanted, policy, spare=left):
                if best is None or option.value > best.value:
                    best = option
        if best is None:
            break
        plan.append(Recarve(best.node.name, best.layout, best.serves, _reason(best.node, best.layout, best.serves)))
        _serve(remaining, best.serves)
        _take(left, best.node, best.layout)
        candidates = [(node, model) for node, model in candidates if node.name != best.node.name]
        budget -= 1
    return tuple(plan)


def plan_drains(
    nodes: Sequence[CarvableNode],
    unmet: Mapping[str, int],
    now: float,
    policy: RecarvePolicy,
    waiting: Mapping[str, int] | None = None,
    *,
    spare: Mapping[str, int] | None = None,
) -> tuple[Recarve, ...]:
    """Busy nodes that should be draining now for a re-carve (with `policy.drain`), those draining already first.

    Call it with the demand that the idle nodes' re-carves (`plan_recarves`)
    leave unmet. A draining node is cordoned: no new pod lands on it, no pod is
    moved, and once idle `plan_recarves` re-carves it. A draining node missing
    from the answer is no longer worth its drain: uncordon it. Among busy nodes
    the one holding the fewest compute slices goes first (the least work to
    wait for); the drain serves the demand its re-carve would. `spare` as for
    `plan_recarves`.
    """
    if not policy.drain:
        return ()
    budget = policy.max_in_flight - sum(1 for node in nodes if node.in_flight)
    busy = sorted(
        (node for node in nodes if not node.idle),
        key=lambda node: (not node.draining, sum(_compute(r) * n for r, n in node.held.items()), node.name),
    )
    remaining = _demand(unmet)
    wanted = _wanted(remaining, waiting)
    left = None if spare is None else dict(spare)
    plan: list[Recarve] = []
    for node, model in _candidates(busy, now, policy):
        if budget <= 0 or not remaining:
            break
        # A drain starts only with room for twice what it takes, so that the arrivals of an hour do not stop it
        # halfway: a drain given up has cordoned the node for nothing.
        room = 1 if node.draining else DRAIN_START_ROOM
        options = _options(node, model, remaining, wanted, policy, spare=left, room=room)
        best = max(options, key=lambda option: option.value, default=None)
        if best is None:
            continue
        plan.append(Recarve(node.name, best.layout, best.serves, "drain: " + _reason(node, best.layout, best.serves)))
        _serve(remaining, best.serves)
        _take(left, node, best.layout)
        budget -= 1
    return tuple(plan)


def finish_drain(node: CarvableNode) -> bool:
    """Whether to evict the holders left on a draining node now: once the capacity its drain has left unused is at
    least the work evicting them loses. A ski-rental rule: waiting and evicting each cost at most twice the best
    choice in hindsight, and the long tail of a drain (one pod that runs for hours) is cut short."""
    return node.draining and not node.idle and node.drain_waste >= node.drain_cost


def free_compute(node: NodeState) -> int:
    """Compute slices of the node's MIG slices that no pod holds now: what a drain leaves unused while it waits."""
    return sum(
        _compute(resource) * max(0, count - node.used.get(resource, 0))
        for resource, count in node.allocatable.items()
        if is_mig_resource(resource)
    )


def drain_waste(waste: float, waste_at: float, unused_then: int, unused_now: int, now: float) -> float:
    """Compute-slice-seconds a drain has left unused by `now`, from `waste` counted by `waste_at` when
    `unused_then` compute slices were free. Between two readings the fewer of the two counts: a slice freed
    meanwhile counts from the reading that sees it, so the waste is never overstated (an eviction never comes
    early), and the live re-carver writes a new reading whenever the count changes (within a round of exact)."""
    return waste + min(unused_then, unused_now) * max(0.0, now - waste_at)


def drain_cost(holders: Iterable[tuple[MigCounts, float]], now: float) -> float:
    """Compute-slice-seconds of work evicting `holders` (each its slices and when it started) loses at `now`."""
    return sum(compute_of(slices) * max(0.0, now - started) for slices, started in holders)


def _wanted(unmet: Mapping[str, int], waiting: Mapping[str, int] | None) -> dict[str, int]:
    """Slices per type a re-carve takes away at their full worth: as many as are unmet or pods wait for now."""
    wanted = dict(unmet)
    for resource, count in _demand(waiting or {}).items():
        wanted[resource] = max(wanted.get(resource, 0), count)
    return wanted


def _demand(unmet: Mapping[str, int]) -> dict[str, int]:
    return {r: n for r, n in sorted(unmet.items()) if isinstance(n, int) and n > 0 and is_mig_resource(r)}


def _serve(remaining: dict[str, int], serves: Mapping[str, int]) -> None:
    for resource, count in serves.items():
        remaining[resource] -= count
        if remaining[resource] <= 0:
            del remaining[resource]


def _take(spare: dict[str, int] | None, node: CarvableNode, layout: Mapping[str, int]) -> None:
    """What re-carving `node` to `layout` takes from `spare`, and adds to it (new slices of a type are free)."""
    if spare is not None:
        for resource in set(node.layout) | set(layout):
            spare[resource] = spare.get(resource, 0) + node.gpus * (
                layout.get(resource, 0) - node.layout.get(resource, 0)
            )


def _candidates(
    nodes: Iterable[CarvableNode], now: float, policy: RecarvePolicy
) -> list[tuple[CarvableNode, GpuModel]]:
    """The nodes that may be planned, in the order given, with their model: not in flight, not cooling, carved in a
    valid layout of their own model's profiles (a node migchain cannot read is never touched)."""
    candidates = []
    for node in nodes:
        model = _model(node.product)
        current = _as_profiles(node.layout)
        if (
            model is None
            or node.in_flight
            or node.gpus < 1
            or not current
            or not fits_gpu(model, current)
            or any(p not in profiles_of(model) for p in current)
            or cooling(node, now, policy)
        ):
            continue
        candidates.append((node, model))
    return candidates


def _reason(node: CarvableNode, layout: Mapping[str, int], serves: Mapping[str, int]) -> str:
    def text(counts: Mapping[str, int]) -> str:
        return ", ".join(f"{n} x {short_name(r)}" for r, n in sorted(counts.items()) if n) or "nothing"

    return (
        f"re-carve node {node.name} ({node.gpus} GPUs) from {text(node.layout)} to {text(layout)} per GPU: "
        f"serves {text(serves)} of sustained unmet demand"
    )
