"""Where a pod may run: its nodeSelector, required node affinity and tolerations against a node's labels and
taints, read from the pod as kube-scheduler reads them; pure, and never raising on what a pod's owner wrote."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from extender.core.cluster import NodeState

UNSCHEDULABLE_TAINT = "node.kubernetes.io/unschedulable"  # how kube-scheduler treats spec.unschedulable
# Taints that keep a pod off a node at scheduling; PreferNoSchedule only ranks.
HARD_TAINT_EFFECTS = ("NoSchedule", "NoExecute")

# Bounds on what is read of one pod's placement rules, which its owner writes:
# beyond them the pod is taken as running nowhere (a return is never spent on
# it), so a hostile spec costs matching time on no one else's round.
MAX_SELECTOR_LABELS = 256
MAX_SELECTOR_TERMS = 64
MAX_TERM_REQUIREMENTS = 64
MAX_REQUIREMENT_VALUES = 1024
MAX_TOLERATIONS = 256


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str  # NoSchedule or NoExecute


@dataclass(frozen=True)
class Toleration:
    """One of a pod's tolerations, matched as k8s.io/api/core/v1 Toleration.ToleratesTaint does."""

    key: str = ""  # empty: every key (with operator Exists)
    operator: str = "Equal"
    value: str = ""
    effect: str = ""  # empty: every effect

    def tolerates(self, taint: Taint) -> bool:
        if self.effect and self.effect != taint.effect:
            return False
        if self.key and self.key != taint.key:
            return False
        if self.operator == "Exists":
            return True
        # Equal (or empty). Any other operator (Gt/Lt behind an alpha feature gate) tolerates nothing here:
        # a pod counted on fewer nodes can only cost fewer returns.
        return self.operator in ("", "Equal") and self.value == taint.value


@dataclass(frozen=True)
class Requirement:
    """One matchExpressions (on a label) or matchFields (on metadata.name) entry of a node selector term."""

    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist, Gt, Lt
    values: frozenset[str] = frozenset()
    bound: int = 0  # the number Gt and Lt compare with

    def matches(self, value: str | None) -> bool:
        if self.operator == "In":
            return value is not None and value in self.values
        if self.operator == "NotIn":
            return value is None or value not in self.values
        if self.operator == "Exists":
            return value is not None
        if self.operator == "DoesNotExist":
            return value is None
        number = _integer(value)
        if number is None:
            return False
        return number > self.bound if self.operator == "Gt" else number < self.bound


@dataclass(frozen=True)
class SelectorTerm:
    """One of required node affinity's nodeSelectorTerms: every requirement must hold (the terms are ORed)."""

    expressions: tuple[Requirement, ...] = ()
    fields: tuple[Requirement, ...] = ()  # only metadata.name exists

    def matches(self, node: NodeState) -> bool:
        if not self.expressions and not self.fields:
            return False  # an empty term selects no node
        labels = node.labels
        return all(r.matches(labels.get(r.key)) for r in self.expressions) and all(
            r.matches(node.name) for r in self.fields
        )


@dataclass(frozen=True)
class NodeConstraints:
    """Which nodes a pod may run on, from the pod alone: what kube-scheduler's NodeAffinity (nodeSelector and
    required node affinity), TaintToleration and NodeUnschedulable filters decide.

    Preferred node affinity only ranks nodes, so it is not here. Whatever depends
    on other pods (topologySpreadConstraints with DoNotSchedule, required pod
    affinity or anti-affinity) cannot be decided from one pod: `depends_on_pods`
    names it, and the return planner then never restarts a pod for this one.
    """

    selector: tuple[tuple[str, str], ...] = ()  # spec.nodeSelector: every pair among the node's labels
    terms: tuple[SelectorTerm, ...] | None = None  # required node affinity; None when the pod has none
    tolerations: tuple[Toleration, ...] = ()
    depends_on_pods: str = ""  # what in the pod makes its place depend on other pods; empty when nothing
    unreadable: str = ""  # why the rules could not be read: then it may run nowhere

    def admits(self, node: NodeState) -> bool:
        if self.unreadable:
            return False
        labels = node.labels
        for key, value in self.selector:
            if labels.get(key) != value:
                return False
        if self.terms is not None and not any(term.matches(node) for term in self.terms):
            return False
        taints, tolerations = node.taints, self.tolerations
        return not taints or all(any(t.tolerates(taint) for t in tolerations) for taint in taints)

    def describe(self) -> str:
        """What decides where it may run, for explanations."""
        if self.unreadable:
            return f"placement rules unreadable ({self.unreadable}): it may run nowhere"
        parts = [
            name
            for name, present in (
                ("nodeSelector", self.selector),
                ("required node affinity", self.terms is not None),
                ("tolerations", self.tolerations),
            )
            if present
        ]
        if not parts:
            return "node taints only (it has no nodeSelector, required node affinity or tolerations)"
        return "its " + ", ".join(parts) + " against node labels and taints"


# A pod that may run on every node, tainted ones too: the default for requests
# built by hand (the simulator's trace pods, tests), which carry no rules.
ANYWHERE = NodeConstraints(tolerations=(Toleration(operator="Exists"),))
NO_RULES = NodeConstraints()  # a pod spec with none: every node without a hard taint


def node_constraints(spec: Mapping[str, Any]) -> NodeConstraints:
    """The nodes a pod spec may run on (see NodeConstraints); never raises.

    Read as kube-scheduler reads them: a node selector term it cannot parse
    matches no node. Anything else that cannot be read, or that is larger than
    the bounds above, makes the pod run nowhere, so it never costs another pod
    a restart.
    """
    if not any(spec.get(key) for key in _PLACEMENT_FIELDS):
        return NO_RULES  # most pods: no parsing, one shared value
    try:
        return _shared(
            NodeConstraints(
                selector=_node_selector(spec.get("nodeSelector")),
                terms=_required_terms(_mapping(spec.get("affinity"), "spec.affinity")),
                tolerations=_tolerations(spec.get("tolerations")),
                depends_on_pods=_depends_on_pods(spec),
            )
        )
    except _Unreadable as error:
        return NodeConstraints(unreadable=str(error)[:200])


_PLACEMENT_FIELDS = ("nodeSelector", "affinity", "tolerations", "topologySpreadConstraints")


@functools.lru_cache(maxsize=4096)
def _shared(constraints: NodeConstraints) -> NodeConstraints:
    """One object for equal rules: the pods of a workload share theirs, and the cache keeps every pod."""
    return constraints


def _bounded(items: list[Any] | Mapping[str, Any], limit: int, where: str) -> None:
    if len(items) > limit:
        raise _Unreadable(f"{where}: more than {limit} entries")


def _node_selector(value: Any) -> tuple[tuple[str, str], ...]:
    selector = _mapping(value, "spec.nodeSelector")
    _bounded(selector, MAX_SELECTOR_LABELS, "spec.nodeSelector")
    pairs = []
    for key, wanted in selector.items():
        if not isinstance(key, str) or not isinstance(wanted, str):
            raise _Unreadable("spec.nodeSelector: expected string keys and values")
        pairs.append((key, wanted))
    return tuple(sorted(pairs))


def _required_terms(affinity: Mapping[str, Any]) -> tuple[SelectorTerm, ...] | None:
    where = "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
    node_affinity = _mapping(affinity.get("nodeAffinity"), "spec.affinity.nodeAffinity")
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is None:
        return None
    terms = _sequence(_mapping(required, where).get("nodeSelectorTerms"), f"{where}.nodeSelectorTerms")
    _bounded(terms, MAX_SELECTOR_TERMS, f"{where}.nodeSelectorTerms")
    return tuple(_term(term, f"{where}.nodeSelectorTerms[{index}]") for index, term in enumerate(terms))


def _term(value: Any, where: str) -> SelectorTerm:
    term = _mapping(value, where)
    expressions = _sequence(term.get("matchExpressions"), f"{where}.matchExpressions")
    fields = _sequence(term.get("matchFields"), f"{where}.matchFields")
    _bounded(expressions + fields, MAX_TERM_REQUIREMENTS, where)
    parsed_expressions = [_requirement(item, f"{where}.matchExpressions", on_field=False) for item in expressions]
    parsed_fields = [_requirement(item, f"{where}.matchFields", on_field=True) for item in fields]
    if any(r is None for r in parsed_expressions) or any(r is None for r in parsed_fields):
        return SelectorTerm()  # kube-scheduler cannot parse it either: the term selects no node
    return SelectorTerm(
        tuple(r for r in parsed_expressions if r is not None), tuple(r for r in parsed_fields if r is not None)
    )


def _requirement(value: Any, where: str, *, on_field: bool) -> Requirement | None:
    """One requirement, or None where kube-scheduler would find it invalid (wrong values for the operator)."""
    item = _mapping(value, where)
    key, operator = item.get("key"), item.get("operator")
    values = _sequence(item.get("values"), f"{where}.values")
    _bounded(values, MAX_REQUIREMENT_VALUES, f"{where}.values")
    if not isinstance(key, str) or not key or not all(isinstance(v, str) for v in values):
        return None
    if on_field and (key != "metadata.name" or operator not in ("In", "NotIn")):
        return None  # the one field selector kube-scheduler supports
    if operator in ("In", "NotIn"):
        return Requirement(key, operator, frozenset(values)) if values else None
    if operator in ("Exists", "DoesNotExist"):
        return None if values else Requirement(key, operator)
    if operator in ("Gt", "Lt") and len(values) == 1:
        bound = _integer(values[0])
        return None if bound is None else Requirement(key, operator, bound=bound)
    return None


def _integer(text: str | None) -> int | None:
    """A label value as Go's strconv.ParseInt(text, 10, 64) reads it; None where that fails."""
    if text is None or not 0 < len(text) <= 20:
        return None
    digits = text[1:] if text[0] in "+-" else text
    if not digits.isascii() or not digits.isdigit():
        return None
    number = int(text)
    return number if -(2**63) <= number < 2**63 else None


def _tolerations(value: Any) -> tuple[Toleration, ...]:
    items = _sequence(value, "spec.tolerations")
    _bounded(items, MAX_TOLERATIONS, "spec.tolerations")
    tolerations = []
    for index, item in enumerate(items):
        where = f"spec.tolerations[{index}]"
        toleration = _mapping(item, where)
        tolerations.append(
            Toleration(
                key=_string(toleration.get("key"), f"{where}.key"),
                operator=_string(toleration.get("operator"), f"{where}.operator") or "Equal",
                value=_string(toleration.get("value"), f"{where}.value"),
                effect=_string(toleration.get("effect"), f"{where}.effect"),
            )
        )
    return tuple(tolerations)


def _depends_on_pods(spec: Mapping[str, Any]) -> str:
    """What in the spec makes where the pod may run depend on where other pods run; empty when nothing."""
    spread = _sequence(spec.get("topologySpreadConstraints"), "spec.topologySpreadConstraints")
    for index, item in enumerate(spread):
        if _mapping(item, f"spec.topologySpreadConstraints[{index}]").get("whenUnsatisfiable") == "DoNotSchedule":
            return "a topology spread constraint with whenUnsatisfiable: DoNotSchedule"
    affinity = _mapping(spec.get("affinity"), "spec.affinity")
    for kind, words in (("podAffinity", "required pod affinity"), ("podAntiAffinity", "required pod anti-affinity")):
        section = _mapping(affinity.get(kind), f"spec.affinity.{kind}")
        if section.get("requiredDuringSchedulingIgnoredDuringExecution"):
            return words
    return ""


class _Unreadable(ValueError):
    """Placement rules that cannot be read; the message names the field."""


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _Unreadable(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _sequence(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Unreadable(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _string(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Unreadable(f"{where}: expected a string, got {type(value).__name__}")
    return value
