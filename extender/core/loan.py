"""Loans: the replacement pod a borrow creates and the annotations that are the only record of it; pure.

A borrow cannot change a pod's requests (they are immutable), so it replaces
the pod with a copy asking for the granted types, bound to the chosen node.
The copy carries everything needed to undo it: the original requests of each
container, the chain, the steps and the UID it replaced.

The pod's owner can edit those annotations, so migchain signs the record
(`loan_signature`, an HMAC with a key only migchain reads) and believes only
a record that verifies (`vouched`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from extender.core import untrusted
from extender.core.cluster import (
    ANNOTATION_PREFIX,
    KEPT_ANNOTATIONS,
    REPLACED_UID_ANNOTATION,
    MigCounts,
    ObjectError,
    PodRecord,
    controller_of,
    pod_mig_requests,
    quantity,
)
from extender.core.decide import Placement
from extender.core.mig import is_mig_resource

# The loan annotations, set by migchain on a borrower; documented in README.
ORIGINAL_REQUESTS_ANNOTATION = ANNOTATION_PREFIX + "original-requests"  # "nvidia.com/mig-1g.5gb=1"
BORROWED_REQUESTS_ANNOTATION = ANNOTATION_PREFIX + "borrowed-requests"  # "nvidia.com/mig-2g.10gb=1"
CHAIN_ANNOTATION = ANNOTATION_PREFIX + "chain"  # chain name(s), comma-separated
STEPS_ANNOTATION = ANNOTATION_PREFIX + "steps"  # total steps borrowed (slices x steps)
ORIGINAL_RESOURCES_ANNOTATION = ANNOTATION_PREFIX + "original-resources"  # JSON: container -> its MIG resources
RESTARTS_ANNOTATION = ANNOTATION_PREFIX + "restarts"  # returns so far, carried by bare pods
LOAN_ANNOTATIONS = (
    ORIGINAL_REQUESTS_ANNOTATION,
    BORROWED_REQUESTS_ANNOTATION,
    CHAIN_ANNOTATION,
    STEPS_ANNOTATION,
    ORIGINAL_RESOURCES_ANNOTATION,
    REPLACED_UID_ANNOTATION,
)
# migchain's HMAC over the loan record (see loan_signature), written with it.
LOAN_SIGNATURE_ANNOTATION = ANNOTATION_PREFIX + "loan-signature"
# What the signature covers: the loan, and the returns a bare pod carries across them.
SIGNED_ANNOTATIONS = (*LOAN_ANNOTATIONS, RESTARTS_ANNOTATION)
MIN_LOAN_KEY_BYTES = 32  # the HMAC-SHA256 key: as long as its output
# Why a pod's loan record is not believed (see vouched).
UNSIGNED = "unsigned"  # no signature: written before loans were signed, or not by migchain
FORGED = "forged"  # a signature that does not match: the record or the pod was edited, or copied
UNREADABLE = "unreadable"  # a record that cannot be read back whole, or does not match the pod

# A ReplicaSet scaling down removes, among its running and ready pods, those of
# lowest deletion cost first. The pending original a borrow replaces is given
# the lowest cost of all (it must go, not a sibling); a borrower one less than
# its exact-fit siblings, so a scale-down frees the larger slices it holds first.
DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
LOWEST_DELETION_COST = -(2**31)
HIGHEST_DELETION_COST = 2**31 - 1

# Fields the API server owns: a new object must not carry them.
# Pod spec fields the API server refuses in a create, or may: `spec.ephemeralContainers` is written only through
# the pod's ephemeralcontainers subresource (`kubectl debug`); `spec.overhead` is set by the RuntimeClass admission
# plugin from the pod's RuntimeClass, and a copy whose overhead no longer matches the class is refused.
_REFUSED_ON_CREATE = ("ephemeralContainers", "overhead")
_SERVER_METADATA = (
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "managedFields",
    "generation",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)


@dataclass(frozen=True)
class Loan:
    """A borrower's record, read back from its annotations."""

    original: MigCounts
    borrowed: MigCounts
    chains: tuple[str, ...]
    steps: int
    replaced_uid: str
    restarts: int = 0  # returns of this pod so far (RESTARTS_ANNOTATION): the restart cap counts them


@dataclass(frozen=True)
class UnreadableLoan:
    """A loan record that cannot be read back, or does not match its pod: that pod is no borrower.

    Its pod's owner can edit the record, or forge one: the pod is skipped,
    counted and reported once, and nothing else is held up by it.
    """

    why: str  # names the annotation; shows the pod's text only as a short escaped excerpt


@dataclass(frozen=True)
class BorrowPlan:
    """Replace `original` (pending) by `replacement` (bound to the node), keeping the pod's name or not.

    Owned pods (ReplicaSet, Job, any controller) get a new name and are
    created before the original is deleted, so the controller never counts
    fewer pods than it wants. Bare pods keep their name: nothing else would
    remember them, so the original is journaled, deleted, then recreated.
    """

    original: Mapping[str, Any]
    replacement: Mapping[str, Any]
    placement: Placement
    keeps_name: bool

    @property
    def namespace(self) -> str:
        return str(self.original["metadata"].get("namespace") or "default")

    @property
    def original_name(self) -> str:
        return str(self.original["metadata"]["name"])

    @property
    def original_uid(self) -> str:
        return str(self.original["metadata"]["uid"])

    @property
    def replacement_name(self) -> str:
        return str(self.replacement["metadata"]["name"])

    def describe(self) -> str:
        grants = ", ".join(
            f"{grant.granted} for {grant.requested}" for grant in self.placement.grants if grant.borrowed
        )
        return f"borrowed {grants} on node {self.placement.node}"


def counts_text(counts: MigCounts) -> str:
    return ",".join(f"{resource}={count}" for resource, count in counts)


def parse_counts(text: str) -> MigCounts:
    """`nvidia.com/mig-1g.5gb=1,...` read back; ValueError unless each entry is a MIG type, named once, with
    an ASCII count of 1 to MAX_SLICES, and there are at most MAX_TYPES of them."""
    counts: dict[str, int] = {}
    for item in filter(None, text.split(",")):
        resource, _, written = item.partition("=")
        number = untrusted.count(written, untrusted.MAX_SLICES)
        if not untrusted.MIG_RESOURCE.fullmatch(resource) or not number or resource in counts:
            raise ValueError(f"expected MIG type=count entries, each count 1 to {untrusted.MAX_SLICES}")
        counts[resource] = number
        if len(counts) > untrusted.MAX_TYPES:
            raise ValueError(f"more than {untrusted.MAX_TYPES} MIG types")
    return tuple(sorted(counts.items()))


def read_loan(annotations: Mapping[str, str]) -> Loan | UnreadableLoan | None:
    """The loan recorded in a pod's annotations; None for a pod that borrows nothing; UnreadableLoan for
    a record that cannot be read back whole (its pod's owner can edit it), naming the annotation.

    Every field goes through the one reader of pod-written text (core/untrusted.py):
    counts are ASCII digits under caps no real loan reaches, names match the
    patterns the API server and the rules loader allow, the original-resources
    JSON is size-capped and checked against its schema.
    """
    record = untrusted.kept(annotations, KEPT_ANNOTATIONS)
    if REPLACED_UID_ANNOTATION not in record or ORIGINAL_REQUESTS_ANNOTATION not in record:
        return None
    key = ORIGINAL_REQUESTS_ANNOTATION
    try:
        original = _some_counts(record[key])
        key = BORROWED_REQUESTS_ANNOTATION
        borrowed = _some_counts(record.get(key, ""))
        key = CHAIN_ANNOTATION
        chains = tuple(filter(None, record.get(key, "").split(",")))
        if len(chains) > untrusted.MAX_CHAINS or not all(map(untrusted.CHAIN_NAME.fullmatch, chains)):
            raise ValueError(f"expected at most {untrusted.MAX_CHAINS} chain names, comma-separated")
        key = STEPS_ANNOTATION
        most = untrusted.MAX_STEPS_PER_SLICE * sum(count for _, count in borrowed)
        steps = untrusted.count(record.get(key, "0"), most)
        if steps is None:
            raise ValueError(f"expected a count of 0 to {most}")
        key = RESTARTS_ANNOTATION
        restarts = untrusted.count(record.get(key, "0"), untrusted.MAX_RESTARTS)
        if restarts is None:
            raise ValueError(f"expected a count of 0 to {untrusted.MAX_RESTARTS}")
        key = REPLACED_UID_ANNOTATION
        if not untrusted.UID.fullmatch(record[key]):
            raise ValueError("expected a pod UID")
        key = ORIGINAL_RESOURCES_ANNOTATION
        if key in record:
            _original_resources(record[key])
    except ObjectError as error:  # the original-resources record's, naming it
        return UnreadableLoan(str(error))
    except ValueError as error:
        return UnreadableLoan(f"annotation {key}={untrusted.excerpt(record.get(key, ''))}: {error}")
    return Loan(original, borrowed, chains, steps, record[REPLACED_UID_ANNOTATION], restarts)


def _some_counts(text: str) -> MigCounts:
    counts = parse_counts(text)
    if not counts:
        raise ValueError("names no MIG slice")
    return counts


def loan_of(annotations: Mapping[str, str]) -> Loan | None:
    """The loan recorded on a pod, or None for a pod that borrows nothing (or a record that is unreadable)."""
    loan = read_loan(annotations)
    return loan if isinstance(loan, Loan) else None


def record_loan(record: PodRecord) -> Loan | UnreadableLoan | None:
    """The loan of a pod the cache keeps, read back and checked against the pod: what it asks for now must
    be what the loan says it borrowed (a loan forged on any other pod, one with no MIG request
    included, is no loan)."""
    loan = read_loan(record.migchain)
    if isinstance(loan, Loan) and loan.borrowed != record.request.mig:
        holds = untrusted.excerpt(counts_text(record.request.mig), 80) or "no MIG slice"
        return UnreadableLoan(
            f"annotation {BORROWED_REQUESTS_ANNOTATION} does not match what the pod asks for ({holds})"
        )
    return loan


def replacement_name(name: str, uid: str) -> str:
    """A name derived from the original's UID: a retried borrow finds the replacement it already made."""
    suffix = hashlib.sha256(uid.encode()).hexdigest()[:5]
    return f"{name[:57]}-{suffix}"


def recreatable(pod: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of `pod` that can be created again: server-owned fields and status dropped, and what the API
    server refuses on create (ephemeral containers: `kubectl debug` adds them, only to a pod that exists; the
    overhead its RuntimeClass sets again)."""
    fresh = copy.deepcopy(dict(pod))
    fresh.pop("status", None)
    for key in _SERVER_METADATA:
        fresh["metadata"].pop(key, None)
    if isinstance(fresh.get("spec"), dict):
        for key in _REFUSED_ON_CREATE:
            fresh["spec"].pop(key, None)
    return fresh


def plan_borrow(pod: Mapping[str, Any], placement: Placement, loan_key: bytes) -> BorrowPlan:
    """The replacement of a pending `pod` that asks for the placement's granted types on its node.

    Its loan record is signed with `loan_key`. The returns the pod carries
    (`migchain.io/restarts`) go with it only if migchain signed them when it
    restored the pod; a count its owner wrote is dropped.
    """
    metadata = pod["metadata"]
    controller = controller_of(metadata)
    keeps_name = controller is None
    replacement = recreatable(pod)
    new_metadata = replacement["metadata"]
    if not keeps_name:
        new_metadata["name"] = replacement_name(metadata["name"], metadata["uid"])
        new_metadata.pop("generateName", None)
    grants = {grant.requested: grant.granted for grant in placement.grants}
    original_resources: dict[str, Any] = {}
    spec = replacement["spec"]
    for section in ("initContainers", "containers"):
        for container in spec.get(section) or []:
            resources = container.get("resources") or {}
            kept = {}
            for kind in ("limits", "requests"):
                granted, mig = _granted_resources(resources.get(kind) or {}, grants)
                if mig:
                    kept[kind] = mig
                    resources[kind] = granted
            if kept:
                original_resources[f"{section}/{container['name']}"] = kept
    spec["nodeName"] = placement.node
    original = tuple(sorted((grant.requested, grant.count) for grant in placement.grants))
    annotations = dict(new_metadata.get("annotations") or {})
    if not signed_by_migchain(pod, loan_key):
        annotations.pop(RESTARTS_ANNOTATION, None)
    annotations.update(
        {
            ORIGINAL_REQUESTS_ANNOTATION: counts_text(_merge(original)),
            # What the replacement asks for, read back as the scheduler reads it: the
            # slices the pod holds (see _granted_resources for when that is fewer
            # than the placement's).
            BORROWED_REQUESTS_ANNOTATION: counts_text(pod_mig_requests(spec)),
            CHAIN_ANNOTATION: ",".join(sorted({grant.chain for grant in placement.grants if grant.chain})),
            STEPS_ANNOTATION: str(placement.cost),
            ORIGINAL_RESOURCES_ANNOTATION: json.dumps(original_resources, sort_keys=True, separators=(",", ":")),
            REPLACED_UID_ANNOTATION: metadata["uid"],
        }
    )
    if controller is not None and controller.get("kind") == "ReplicaSet":
        annotations[DELETION_COST_ANNOTATION] = str(_borrower_deletion_cost(annotations.get(DELETION_COST_ANNOTATION)))
    namespace = str(metadata.get("namespace") or "default")
    annotations[LOAN_SIGNATURE_ANNOTATION] = loan_signature(
        loan_key, namespace, new_metadata["name"], pod_mig_requests(spec), annotations
    )
    new_metadata["annotations"] = annotations
    return BorrowPlan(original=pod, replacement=replacement, placement=placement, keeps_name=keeps_name)


def restored_pod(borrower: Mapping[str, Any], restarts: int, loan_key: bytes) -> dict[str, Any]:
    """The borrower as it was before it borrowed: original requests, unbound, no loan record; for bare pods.

    `restarts` is written to the restarts annotation, signed with `loan_key`,
    so the count holds across returns. The scheduler places it again (on a
    slice of its own type).
    Raises ObjectError when the loan record cannot be read back (the pod's
    owner can edit it): such a pod is not restored.
    """
    restored = recreatable(borrower)
    annotations = dict(restored["metadata"].get("annotations") or {})
    original = _original_resources(annotations.get(ORIGINAL_RESOURCES_ANNOTATION, "{}"))
    for key in LOAN_ANNOTATIONS:
        annotations.pop(key, None)
    annotations[RESTARTS_ANNOTATION] = str(restarts)
    restored["metadata"]["annotations"] = annotations
    spec = restored["spec"]
    spec.pop("nodeName", None)
    for section in ("initContainers", "containers"):
        for container in spec.get(section) or []:
            kept = original.get(f"{section}/{container['name']}")
            if kept is None:
                continue
            resources = container.setdefault("resources", {})
            for kind in ("limits", "requests"):
                values = {k: v for k, v in (resources.get(kind) or {}).items() if not is_mig_resource(k)}
                values.update(kept.get(kind) or {})
                if values:
                    resources[kind] = values
                else:
                    resources.pop(kind, None)
    metadata = restored["metadata"]
    annotations[LOAN_SIGNATURE_ANNOTATION] = loan_signature(
        loan_key, str(metadata.get("namespace") or "default"), metadata["name"], pod_mig_requests(spec), annotations
    )
    return restored


def put_back(original: Mapping[str, Any], loan_key: bytes) -> dict[str, Any]:
    """The original of a borrow that could not be finished, to create again as it was: pending, its own request.

    It carries a restore record (`migchain.io/restarts`, signed with
    `loan_key`, as `restored_pod` writes it), which is how the API server's
    admission policy tells a pod migchain puts back from any other pod
    (manifests/admission-policy.yaml). The returns it had are kept only if
    migchain signed them; loan annotations its owner wrote are dropped.
    """
    fresh = recreatable(original)
    metadata = fresh["metadata"]
    written = dict(metadata.get("annotations") or {})
    restarts = untrusted.count(written.get(RESTARTS_ANNOTATION, ""), untrusted.MAX_RESTARTS)
    if restarts is None or not signed_by_migchain(original, loan_key):
        restarts = 0
    dropped = (*LOAN_ANNOTATIONS, LOAN_SIGNATURE_ANNOTATION)
    annotations = {key: value for key, value in written.items() if key not in dropped}
    annotations[RESTARTS_ANNOTATION] = str(restarts)
    fresh["spec"].pop("nodeName", None)
    annotations[LOAN_SIGNATURE_ANNOTATION] = loan_signature(
        loan_key,
        str(metadata.get("namespace") or "default"),
        metadata["name"],
        pod_mig_requests(fresh["spec"]),
        annotations,
    )
    metadata["annotations"] = annotations
    return fresh


def loan_signature(key: bytes, namespace: str, name: str, mig: MigCounts, annotations: Mapping[str, Any]) -> str:
    """migchain's signature of a pod's loan record: an HMAC-SHA256, under `key`, of the signed annotations
    (absent ones too), the pod's namespace and name, and the MIG slices it asks for.

    It binds the record to what is known when the pod is written, before it
    has a UID: the name (a bare pod keeps its own, an owned one gets a name
    derived from the original's UID) and its requests, which are immutable.
    Copied onto another pod, or edited, it no longer verifies. The fields are
    encoded as one JSON list, so no two records share an encoding.
    """
    fields: list[object] = ["migchain-loan/v1", namespace, name, counts_text(mig)]
    fields += [annotations.get(key) for key in SIGNED_ANNOTATIONS]
    message = json.dumps(fields, separators=(",", ":")).encode()
    return "v1:" + hmac.new(key, message, hashlib.sha256).hexdigest()


def _signature_matches(key: bytes, namespace: str, name: str, mig: MigCounts, annotations: Mapping[str, Any]) -> bool:
    given = annotations.get(LOAN_SIGNATURE_ANNOTATION)
    expected = loan_signature(key, namespace, name, mig, annotations)
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


def signed_by_migchain(pod: Mapping[str, Any], key: bytes) -> bool:
    """Whether this Pod object (as the API server returns it) carries a record migchain signed; False when it
    cannot be read."""
    try:
        metadata = pod["metadata"]
        annotations = metadata.get("annotations") or {}
        namespace = str(metadata.get("namespace") or "default")
        return _signature_matches(key, namespace, str(metadata["name"]), pod_mig_requests(pod["spec"]), annotations)
    except (KeyError, TypeError, AttributeError, ObjectError):
        return False


def vouched(record: PodRecord, key: bytes | None) -> tuple[PodRecord, str]:
    """The pod as migchain may believe it, and why its loan was not believed ("" when nothing was wrong).

    A record migchain signed, that reads back whole and matches the pod, is
    kept whole. Otherwise the signed annotations (the loan, the restart count)
    and the signature are dropped and `replaces` cleared: the pod is an
    ordinary pod holding what it asks for, never returned, confirming no
    reservation. The reason (UNSIGNED, FORGED, UNREADABLE; see `loan_doubt`)
    is given only when the pod claimed a loan. Without a key (an admin's
    command that cannot read it) the signature is not checked, the rest is.
    """
    claimed = [key for key in (*SIGNED_ANNOTATIONS, LOAN_SIGNATURE_ANNOTATION) if key in record.migchain]
    if not claimed and not record.replaces:
        return record, ""
    request = record.request
    problem = ""
    if key is None or _signature_matches(key, request.namespace, request.name, request.mig, record.migchain):
        # Signed by migchain, so written by it; read all the same: a record from an older version, or one
        # taken as written, must cost that pod alone.
        if not isinstance(record_loan(record), UnreadableLoan):
            return record, ""
        problem = UNREADABLE
    elif record.replaces or any(name in record.migchain for name in LOAN_ANNOTATIONS):
        problem = FORGED if LOAN_SIGNATURE_ANNOTATION in record.migchain else UNSIGNED
    kept = {name: value for name, value in record.migchain.items() if name not in claimed}
    return dataclasses.replace(record, replaces="", migchain=kept), problem


def loan_doubt(record: PodRecord, reason: str) -> str:
    """Why the loan record of `record` (as written) was not believed, `vouched` giving `reason`; "" if it was."""
    consequence = "it is not treated as a borrower: it keeps the slices it asks for and is never returned"
    if reason == FORGED:
        return (
            f"{LOAN_SIGNATURE_ANNOTATION} does not match this pod's loan record (its migchain.io/ annotations "
            f"were edited, or copied from another pod): {consequence}"
        )
    if reason == UNSIGNED:
        return (
            f"this pod's loan record carries no {LOAN_SIGNATURE_ANNOTATION} (made before loans were signed, or "
            f"not by migchain): {consequence}"
        )
    if reason == UNREADABLE:
        read = record_loan(record)
        why = read.why if isinstance(read, UnreadableLoan) else "it cannot be read back"
        return f"this pod's loan record cannot be read back whole ({why}): {consequence}"
    return ""


def _original_resources(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """The original-resources record: container -> limits/requests -> MIG resource -> count.

    ObjectError when it is not that shape; the message quotes none of it (the
    pod's owner can write it).
    """
    where = f"annotation {ORIGINAL_RESOURCES_ANNOTATION}"
    try:
        record = untrusted.json_document(text, KEPT_ANNOTATIONS[ORIGINAL_RESOURCES_ANNOTATION])
    except ValueError as error:
        raise ObjectError(f"{where}: {error}") from None
    if not isinstance(record, dict):
        raise ObjectError(f"{where}: expected an object of containers")
    for kinds in record.values():
        if not isinstance(kinds, dict) or not set(kinds) <= {"limits", "requests"}:
            raise ObjectError(f"{where}: expected limits and requests per container")
        for values in kinds.values():
            if not isinstance(values, dict) or not all(
                untrusted.MIG_RESOURCE.fullmatch(resource)
                and isinstance(count, str)
                and untrusted.count(count, untrusted.MAX_SLICES) is not None
                for resource, count in values.items()
            ):
                raise ObjectError(f"{where}: expected whole numbers of MIG resources")
    return record


def _borrower_deletion_cost(own: Any) -> int:
    """One less than the pod's own deletion cost, the one its exact-fit siblings have (0 when it has none)."""
    cost = int(own) if isinstance(own, str) and re.fullmatch(r"-?[0-9]{1,10}", own) else 0
    if not LOWEST_DELETION_COST < cost <= HIGHEST_DELETION_COST:
        cost = 0  # the mark a borrow puts on the pending original (a retried borrow reads it back), or out of range
    return cost - 1


def _granted_resources(values: Mapping[str, Any], grants: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One container's limits (or requests) asking for the granted types; and its MIG entries as they were.

    The new map is built from the original one, never rewritten in place: two
    requested types granted as one type add up, and a type granted as another
    requested type must not erase what that one was just granted (issue 16).
    Summed over containers this is the placement's slices, except where an
    ordinary init container's slices, now of the app containers' type, are
    reused by them once it has run: the pod then needs fewer slices.
    """
    mig = {resource: value for resource, value in values.items() if is_mig_resource(resource)}
    granted = {resource: value for resource, value in values.items() if not is_mig_resource(resource)}
    counts: dict[str, int] = {}
    for resource, value in mig.items():
        target = grants.get(resource, resource)
        counts[target] = counts.get(target, 0) + quantity(value, f"resources[{resource}]")
    granted.update((resource, str(count)) for resource, count in counts.items())
    return granted, mig


def _merge(counts: MigCounts) -> MigCounts:
    merged: dict[str, int] = {}
    for resource, count in counts:
        merged[resource] = merged.get(resource, 0) + count
    return tuple(sorted(merged.items()))
