"""The strict loader of chain rule files (YAML) into frozen core values; every problem with file, line, field."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from extender.core.mig import parse_mig_resource
from extender.core.rules import (
    DEFAULT_HEADROOM_SECONDS,
    DEFAULT_RECLAIM_AFTER_SECONDS,
    MAX_HEADROOM_SECONDS,
    NEVER_SAFE_OWNER_KINDS,
    Chain,
    ChainRules,
    NamespaceSelector,
    OwnerKind,
    PodOptOuts,
    Policy,
    ReturnMode,
)

API_VERSION = "migchain.io/v1alpha1"
KIND = "ChainRules"

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_BOOL = "tag:yaml.org,2002:bool"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # a DNS label, so it can travel in annotations
# An ownerReference's apiVersion: "VERSION" (the core group) or "GROUP/VERSION", a group being a DNS subdomain.
_API_VERSION = re.compile(
    r"^(?:[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*/)?[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
)
_KIND = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,62}$")  # a Kind is a CamelCase Go type name

T = TypeVar("T")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{self.file}:{self.line}: {where}{self.message}"


class ConfigError(Exception):
    """Every problem found in the rule files, one per line."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


def load_rules(paths: Iterable[str | Path]) -> ChainRules:
    """Load and validate rule files together; raise ConfigError listing every problem in all of them."""
    chains: list[Chain] = []
    problems: list[Problem] = []
    first_seen: dict[str, str] = {}
    for path in paths:
        located, file_problems = _load_file(Path(path))
        problems += file_problems
        for chain, line, field in located:
            if chain.name in first_seen:
                problems.append(
                    Problem(str(path), line, field, f"chain {chain.name!r} is also defined at {first_seen[chain.name]}")
                )
            else:
                first_seen[chain.name] = f"{path}:{line}"
            chains.append(chain)
    if problems:
        raise ConfigError(problems)
    if not chains:
        raise ConfigError([Problem("(no file)", 0, "", "no chain rule files given")])
    return ChainRules(chains)


def load_rules_at_start(program: str, paths: Iterable[str | Path]) -> ChainRules | None:
    """For a process starting up: the rules, or None after printing every problem (the process exits 2)."""
    try:
        return load_rules(paths)
    except ConfigError as error:
        print(f"{program}: invalid chain rules:\n{error}", file=sys.stderr)
        return None


Located = list[tuple[Chain, int, str]]  # each chain with the line and field of its name, for messages


def _load_file(path: Path) -> tuple[Located, list[Problem]]:
    try:
        data = path.read_bytes()
    except OSError as error:
        return [], [Problem(str(path), 0, "", f"cannot read: {error.strerror or error}")]  # no line to name
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        return [], [Problem(str(path), line, "", f"not UTF-8: byte {data[error.start]:#04x} ({error.reason})")]
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 1
        return [], [Problem(str(path), line, "", f"not valid YAML: {error.problem or error}")]
    except yaml.reader.ReaderError as error:  # a character YAML forbids; it knows the offset, not the line
        line = text[: error.position].count("\n") + 1
        return [], [Problem(str(path), line, "", f"not valid YAML: character {error.character!r} is not allowed")]
    except yaml.YAMLError as error:
        return [], [Problem(str(path), 1, "", f"not valid YAML: {error}")]
    except RecursionError:  # nesting deeper than the parser's recursion: no rules file looks like that
        return [], [Problem(str(path), 1, "", "not valid YAML: nested too deeply")]
    reader = _Reader(str(path))
    if root is None:
        reader.problem(None, "", "the file is empty")
        return [], reader.problems
    located = reader.rules_file(root)
    return located, reader.problems


def _length(node: yaml.Node | None) -> int | None:
    """How many items a list node holds; None for a missing or non-list node (reported elsewhere)."""
    return len(node.value) if isinstance(node, yaml.SequenceNode) else None


@dataclass(frozen=True)
class _ChainFields:
    name: str
    gpu_products: frozenset[str]
    types: tuple[str, ...]


class _Reader:
    """Walks composed YAML nodes, so every value keeps the line it was written on."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def problem(self, node: yaml.Node | None, field: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.problems.append(Problem(self.file, line, field, message))

    # -- shapes ---------------------------------------------------------------

    def mapping(
        self, node: yaml.Node, field: str, required: Sequence[str], optional: Sequence[str]
    ) -> dict[str, yaml.Node] | None:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, field, "expected a mapping")
            return None
        allowed = [*required, *optional]
        fields: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            inner = f"{field}.{key}" if field else str(key)
            if key not in allowed:
                self.problem(key_node, inner, f"unknown key (allowed: {', '.join(allowed)})")
            elif key in fields:
                self.problem(key_node, inner, "duplicate key")
            else:
                fields[key] = value_node
        for key in required:
            if key not in fields:
                self.problem(node, f"{field}.{key}" if field else key, "required key is missing")
        return fields

    def sequence(self, node: yaml.Node, field: str) -> list[yaml.Node] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, field, "expected a list")
            return None
        return list(node.value)

    def scalar(self, node: yaml.Node, field: str, tag: str, what: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != tag:
            hint = " (quote it)" if tag == _STR and isinstance(node, yaml.ScalarNode) else ""
            self.problem(node, field, f"expected {what}{hint}")
            return None
        return str(node.value)

    def string(self, node: yaml.Node, field: str) -> str | None:
        value = self.scalar(node, field, _STR, "a string")
        if value == "":
            self.problem(node, field, "must not be empty")
            return None
        return value

    def boolean(self, node: yaml.Node, field: str) -> bool | None:
        value = self.scalar(node, field, _BOOL, "true or false")
        return None if value is None else value.lower() in ("true", "yes", "on")

    def integer(self, node: yaml.Node, field: str) -> int | None:
        value = self.scalar(node, field, _INT, "a whole number")
        return None if value is None else int(value, 0)

    def strings(
        self, node: yaml.Node, field: str, check: Callable[[yaml.Node, str, str], str | None] | None = None
    ) -> list[tuple[str, yaml.Node]]:
        """A list of unique strings, each optionally checked; returns (value, node) pairs that passed."""
        items = self.sequence(node, field)
        if items is None:
            return []
        seen: set[str] = set()
        values = []
        for index, item in enumerate(items):
            item_field = f"{field}[{index}]"
            value = self.string(item, item_field)
            if value is None:
                continue
            if check is not None and check(item, item_field, value) is None:
                continue
            if value in seen:
                self.problem(item, item_field, f"{value!r} is listed twice")
                continue
            seen.add(value)
            values.append((value, item))
        return values

    def resource(self, node: yaml.Node, field: str, value: str) -> str | None:
        try:
            parse_mig_resource(value)
        except ValueError as error:
            self.problem(node, field, str(error))
            return None
        return value

    # -- the schema -----------------------------------------------------------

    def rules_file(self, root: yaml.Node) -> Located:
        fields = self.mapping(root, "", required=("apiVersion", "kind", "chains"), optional=("policy",))
        if fields is None:
            return []
        for key, expected in (("apiVersion", API_VERSION), ("kind", KIND)):
            if key in fields and self.string(fields[key], key) not in (expected, None):
                self.problem(fields[key], key, f"must be {expected}")
        parsed: list[tuple[_ChainFields, yaml.Node, str]] = []
        if "chains" in fields:
            items = self.sequence(fields["chains"], "chains")
            if items is not None and not items:
                self.problem(fields["chains"], "chains", "must list at least one chain")
            for index, item in enumerate(items or []):
                chain = self.chain(item, f"chains[{index}]")
                if chain is not None:
                    parsed.append((chain, item, f"chains[{index}].name"))
        seen: set[str] = set()
        for chain, node, field in parsed:
            if chain.name in seen:
                self.problem(node, field, f"chain {chain.name!r} is defined twice in this file")
            seen.add(chain.name)
        on_chains = {t for chain, _, _ in parsed for t in chain.types}
        policy = self.policy(fields["policy"], on_chains) if "policy" in fields else Policy()
        return [
            (
                Chain(name=c.name, gpu_products=c.gpu_products, types=c.types, policy=policy, source=self.file),
                node.start_mark.line + 1,
                field,
            )
            for c, node, field in parsed
        ]

    def chain(self, node: yaml.Node, field: str) -> _ChainFields | None:
        fields = self.mapping(node, field, required=("name", "gpuProducts", "types"), optional=("allowShrinkingSteps",))
        if fields is None:
            return None
        before = len(self.problems)
        name = self.string(fields["name"], f"{field}.name") if "name" in fields else None
        if name is not None and not _NAME.match(name):
            self.problem(fields["name"], f"{field}.name", "must be a DNS label (lower case letters, digits and '-')")
        products = self.strings(fields["gpuProducts"], f"{field}.gpuProducts") if "gpuProducts" in fields else []
        if _length(fields.get("gpuProducts")) == 0:
            self.problem(fields["gpuProducts"], f"{field}.gpuProducts", "must name at least one GPU model")
        shrinking = False
        if "allowShrinkingSteps" in fields:
            shrinking = bool(self.boolean(fields["allowShrinkingSteps"], f"{field}.allowShrinkingSteps"))
        types = self.strings(fields["types"], f"{field}.types", self.resource) if "types" in fields else []
        if _length(fields.get("types")) in (0, 1):
            self.problem(fields["types"], f"{field}.types", "a chain needs at least two types")
        if not shrinking:
            self.monotone(types, f"{field}.types")
        if len(self.problems) > before or name is None:
            return None
        return _ChainFields(name, frozenset(p for p, _ in products), tuple(t for t, _ in types))

    def monotone(self, types: list[tuple[str, yaml.Node]], field: str) -> None:
        """Each step must keep at least the memory and the compute of the type before it."""
        for index in range(1, len(types)):
            (low, _), (high, node) = types[index - 1], types[index]
            small, large = parse_mig_resource(low), parse_mig_resource(high)
            if large.memory_gb < small.memory_gb or large.compute_slices < small.compute_slices:
                self.problem(
                    node,
                    f"{field}[{index}]",
                    f"{high} has less memory or compute than {low} before it; a pod sized for "
                    f"{low} may not run in it (set allowShrinkingSteps: true to allow it anyway)",
                )

    def policy(self, node: yaml.Node, on_chains: set[str]) -> Policy:
        fields = self.mapping(
            node,
            "policy",
            required=(),
            optional=(
                "borrowing",
                "maxSteps",
                "allowedTypes",
                "returnMode",
                "reclaimAfterSeconds",
                "headroomSeconds",
                "namespaces",
                "dryRun",
                "podOptOuts",
                "ownerKinds",
            ),
        )
        if fields is None:
            return Policy()
        borrowing = self.optional(fields, "borrowing", "policy.borrowing", self.boolean, True)
        max_steps = self.optional(fields, "maxSteps", "policy.maxSteps", self.integer, None)
        if max_steps is not None and max_steps < 0:
            self.problem(fields["maxSteps"], "policy.maxSteps", "must be 0 or more")
            max_steps = None
        allowed: frozenset[str] | None = None
        if "allowedTypes" in fields:

            def on_a_chain(item: yaml.Node, item_field: str, value: str) -> str | None:
                if self.resource(item, item_field, value) is None:
                    return None
                if value not in on_chains:
                    self.problem(item, item_field, f"{value} is on no chain of this file")
                    return None
                return value

            allowed = frozenset(t for t, _ in self.strings(fields["allowedTypes"], "policy.allowedTypes", on_a_chain))
        return_mode = ReturnMode.ON_DEMAND
        if "returnMode" in fields:
            mode = self.string(fields["returnMode"], "policy.returnMode")
            modes = [m.value for m in ReturnMode]
            if mode is not None and mode not in modes:
                self.problem(fields["returnMode"], "policy.returnMode", f"must be one of {', '.join(modes)}")
            elif mode is not None:
                return_mode = ReturnMode(mode)
        reclaim_after = self.optional(
            fields, "reclaimAfterSeconds", "policy.reclaimAfterSeconds", self.integer, DEFAULT_RECLAIM_AFTER_SECONDS
        )
        if reclaim_after < 0:
            self.problem(fields["reclaimAfterSeconds"], "policy.reclaimAfterSeconds", "must be 0 or more")
            reclaim_after = DEFAULT_RECLAIM_AFTER_SECONDS
        headroom = self.optional(
            fields, "headroomSeconds", "policy.headroomSeconds", self.integer, DEFAULT_HEADROOM_SECONDS
        )
        if not 0 <= headroom <= MAX_HEADROOM_SECONDS:
            self.problem(
                fields["headroomSeconds"], "policy.headroomSeconds", f"must be from 0 to {MAX_HEADROOM_SECONDS}"
            )
            headroom = DEFAULT_HEADROOM_SECONDS
        namespaces = NamespaceSelector()
        if "namespaces" in fields:
            namespaces = self.namespace_selector(fields["namespaces"], "policy.namespaces") or namespaces
        dry_run: NamespaceSelector | None = None
        if "dryRun" in fields:
            # `dryRun: true` (every namespace), `false`, or `{namespaces: {include, exclude}}`.
            node = fields["dryRun"]
            if isinstance(node, yaml.ScalarNode):
                dry_run = NamespaceSelector() if self.boolean(node, "policy.dryRun") else None
            else:
                spec = self.mapping(node, "policy.dryRun", ("namespaces",), ())
                if spec is not None and "namespaces" in spec:
                    dry_run = self.namespace_selector(spec["namespaces"], "policy.dryRun.namespaces")
        opt_outs = PodOptOuts()
        if "podOptOuts" in fields:
            opt_outs = self.pod_opt_outs(fields["podOptOuts"], "policy.podOptOuts")
        owner_kinds = self.owner_kinds(fields["ownerKinds"], "policy.ownerKinds") if "ownerKinds" in fields else []
        return Policy(
            owner_kinds=frozenset(owner_kinds),
            borrowing=bool(borrowing),
            max_steps=max_steps,
            allowed_types=allowed,
            return_mode=return_mode,
            reclaim_after_seconds=reclaim_after,
            headroom_seconds=headroom,
            namespaces=namespaces,
            dry_run=dry_run,
            pod_opt_outs=opt_outs,
        )

    def owner_kinds(self, node: yaml.Node, field: str) -> list[OwnerKind]:
        """`ownerKinds: [{apiVersion: GROUP/VERSION, kind: Kind}]`: controllers whose pods a borrow may replace.

        Written as the controller writes its pods' ownerReferences; the version counts (an ownerReference
        names one). StatefulSet and DaemonSet recreate their pods by name or per node: never listed.
        """
        kinds: list[OwnerKind] = []
        for index, item in enumerate(self.sequence(node, field) or []):
            item_field = f"{field}[{index}]"
            entry = self.mapping(item, item_field, ("apiVersion", "kind"), ())
            if entry is None or "apiVersion" not in entry or "kind" not in entry:
                continue
            api_version = self.string(entry["apiVersion"], f"{item_field}.apiVersion")
            kind = self.string(entry["kind"], f"{item_field}.kind")
            if api_version is not None and not _API_VERSION.match(api_version):
                self.problem(
                    entry["apiVersion"], f"{item_field}.apiVersion", "must be VERSION or GROUP/VERSION, e.g. apps/v1"
                )
                api_version = None
            if kind is not None and not _KIND.match(kind):
                self.problem(entry["kind"], f"{item_field}.kind", "not a kind (a CamelCase name, e.g. ReplicaSet)")
                kind = None
            if api_version is None or kind is None:
                continue
            owner = OwnerKind(api_version, kind)
            if owner in NEVER_SAFE_OWNER_KINDS:
                self.problem(
                    item, item_field, f"{kind} pods never borrow: their controller recreates them by name or per node"
                )
            elif owner in kinds:
                self.problem(item, item_field, f"{api_version} {kind} is listed twice")
            else:
                kinds.append(owner)
        return kinds

    def pod_opt_outs(self, node: yaml.Node, field: str) -> PodOptOuts:
        """`podOptOuts: {return: BOOL, maxRestarts: BOOL, namespaces: {include, exclude}}`; each off by default."""
        fields = self.mapping(node, field, (), ("return", "maxRestarts", "namespaces"))
        if fields is None:
            return PodOptOuts()
        namespaces = NamespaceSelector()
        if "namespaces" in fields:
            namespaces = self.namespace_selector(fields["namespaces"], f"{field}.namespaces") or namespaces
        return PodOptOuts(
            never_return=bool(self.optional(fields, "return", f"{field}.return", self.boolean, False)),
            max_restarts=bool(self.optional(fields, "maxRestarts", f"{field}.maxRestarts", self.boolean, False)),
            namespaces=namespaces,
        )

    def namespace_selector(self, node: yaml.Node, field: str) -> NamespaceSelector | None:
        selector = self.mapping(node, field, (), ("include", "exclude"))
        if selector is None:
            return None
        lists = {
            key: frozenset(n for n, _ in self.strings(selector[key], f"{field}.{key}"))
            for key in ("include", "exclude")
            if key in selector
        }
        return NamespaceSelector(**lists)

    def optional(
        self,
        fields: dict[str, yaml.Node],
        key: str,
        field: str,
        read: Callable[[yaml.Node, str], T | None],
        default: Any,
    ) -> Any:
        if key not in fields:
            return default
        value = read(fields[key], field)
        return default if value is None else value
