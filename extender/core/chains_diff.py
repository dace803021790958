"""What an edit of the chain rules changes for the scheduler: chains, steps, policy, and who may borrow what; no I/O."""

from __future__ import annotations

from collections.abc import Iterable

from extender.core.mig import short_name
from extender.core.rules import Chain, ChainRules, NamespaceSelector, PodOptOuts, Policy

# Borrowing is judged for a pod in this namespace; namespace policies are diffed on their own.
SAMPLE_NAMESPACE = "default"


def diff_rules(old: ChainRules, new: ChainRules) -> list[str]:
    """One line per change, chains first, then the borrows each (GPU model, requested type) gains or loses."""
    lines: list[str] = []
    before = {chain.name: chain for chain in old.chains}
    after = {chain.name: chain for chain in new.chains}
    for name in sorted(before.keys() - after.keys()):
        lines.append(f"chain {name}: removed ({_types(before[name])})")
    for name in sorted(after.keys() - before.keys()):
        lines.append(f"chain {name}: added ({_types(after[name])})")
    for name in sorted(before.keys() & after.keys()):
        lines += _chain_changes(before[name], after[name])
    lines += _borrow_changes(old, new)
    return lines


def _types(chain: Chain) -> str:
    return " -> ".join(short_name(t) for t in chain.types)


def _chain_changes(old: Chain, new: Chain) -> list[str]:
    lines = []
    if old.gpu_products != new.gpu_products:
        gained = ", ".join(sorted(new.gpu_products - old.gpu_products)) or "none"
        lost = ", ".join(sorted(old.gpu_products - new.gpu_products)) or "none"
        lines.append(f"chain {new.name}: gpuProducts added {gained}; removed {lost}")
    if old.types != new.types:
        lines.append(f"chain {new.name}: types {_types(old)}  =>  {_types(new)}")
    lines += [f"chain {new.name}: policy {line}" for line in _policy_changes(old.policy, new.policy)]
    return lines


def _selector(selector: NamespaceSelector | None) -> str:
    if selector is None:
        return "off"
    include = ", ".join(sorted(selector.include)) or "all"
    exclude = ", ".join(sorted(selector.exclude))
    return f"namespaces {include}" + (f" except {exclude}" if exclude else "")


def _opt_outs(opt_outs: PodOptOuts) -> str:
    honoured = [
        name for name, yes in (("return", opt_outs.never_return), ("maxRestarts", opt_outs.max_restarts)) if yes
    ]
    if not honoured:
        return "none"
    return f"{', '.join(honoured)} in {_selector(opt_outs.namespaces)}"


def _owner_kinds(policy: Policy) -> str:
    return ", ".join(map(str, sorted(policy.owner_kinds))) or "ReplicaSet and Job only"


def _policy_changes(old: Policy, new: Policy) -> list[str]:
    def allowed(policy: Policy) -> str:
        return "all" if policy.allowed_types is None else " ".join(sorted(map(short_name, policy.allowed_types)))

    pairs = [
        ("borrowing", str(old.borrowing).lower(), str(new.borrowing).lower()),
        ("maxSteps", str(old.max_steps), str(new.max_steps)),
        ("allowedTypes", allowed(old), allowed(new)),
        ("returnMode", old.return_mode.value, new.return_mode.value),
        ("reclaimAfterSeconds", str(old.reclaim_after_seconds), str(new.reclaim_after_seconds)),
        ("headroomSeconds", str(old.headroom_seconds), str(new.headroom_seconds)),
        ("namespaces", _selector(old.namespaces), _selector(new.namespaces)),
        ("dryRun", _selector(old.dry_run), _selector(new.dry_run)),
        ("podOptOuts", _opt_outs(old.pod_opt_outs), _opt_outs(new.pod_opt_outs)),
        ("ownerKinds", _owner_kinds(old), _owner_kinds(new)),
    ]
    return [f"{field}: {was} => {now}" for field, was, now in pairs if was != now]


def _offers(rules: ChainRules) -> dict[tuple[str, str], dict[str, tuple[int, str]]]:
    """(GPU model, requested type) -> granted type -> (steps, chain), for what policy allows."""
    offers: dict[tuple[str, str], dict[str, tuple[int, str]]] = {}
    for chain in rules.chains:
        for product in chain.gpu_products:
            for requested in chain.types:
                options = rules.borrow_options(requested, product, SAMPLE_NAMESPACE)
                offers[(product, requested)] = {o.granted: (o.steps, o.chain) for o in options if o.allowed}
    return offers


def _borrow_changes(old: ChainRules, new: ChainRules) -> list[str]:
    before, after = _offers(old), _offers(new)
    lines = []
    for product, requested in sorted(before.keys() | after.keys()):
        was, now = before.get((product, requested), {}), after.get((product, requested), {})
        lines += _lines(product, requested, "may now borrow", now, was)
        lines += _lines(product, requested, "may no longer borrow", was, now)
        for granted in sorted(was.keys() & now.keys()):
            if was[granted][0] != now[granted][0]:
                lines.append(
                    f"on {product}: {short_name(requested)} borrows {short_name(granted)} at "
                    f"{now[granted][0]} steps, was {was[granted][0]} (scores and return order follow steps)"
                )
    return lines


def _lines(
    product: str, requested: str, verb: str, present: dict[str, tuple[int, str]], absent: Iterable[str]
) -> list[str]:
    return [
        f"on {product}: {short_name(requested)} {verb} {short_name(granted)} "
        f"({steps} step{'s' * (steps != 1)} up chain {chain})"
        for granted, (steps, chain) in sorted(present.items())
        if granted not in absent
    ]
