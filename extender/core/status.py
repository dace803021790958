"""What `migchain status` and the metrics show: MIG slices per node and the loans in force, as rows and text; pure.

Loans are read back from the borrowers' annotations with `record_loan`, slices in
use from the snapshot the ledger builds: the same reading the returner acts
on. No clock: the caller passes `now` where an age is shown.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from extender.core.cluster import REPLACED_UID_ANNOTATION, MigCounts, PodRecord, Snapshot
from extender.core.loan import Loan, record_loan
from extender.core.mig import parse_mig_resource, short_name


@dataclass(frozen=True)
class Slices:
    """One MIG type on one node (or summed over nodes)."""

    allocatable: int = 0
    used: int = 0  # by bound pods that are not Succeeded or Failed (and, in the extender, its reservations)
    borrowed: int = 0  # of `used`, held by borrowers for a request of a smaller type
    free: int = 0  # what a pod could be given now: 0 on a node being repartitioned

    def __add__(self, other: Slices) -> Slices:
        return Slices(
            self.allocatable + other.allocatable,
            self.used + other.used,
            self.borrowed + other.borrowed,
            self.free + other.free,
        )


@dataclass(frozen=True)
class NodeRow:
    name: str
    gpu_product: str
    mig_config_state: str | None  # the MIG manager's label; None on a node partitioned by hand
    offers_slices: bool
    slices: Mapping[str, Slices] = field(default_factory=dict)  # MIG resource -> counts


@dataclass(frozen=True)
class LoanRow:
    """A borrower: which pod holds what instead of what it asked for, and since when."""

    namespace: str
    pod: str
    node: str
    loan: Loan
    created: str  # the borrower's creationTimestamp: a borrow creates the pod, so this is when it borrowed

    @property
    def pairs(self) -> tuple[tuple[str, str, int], ...]:
        return loan_pairs(self.loan)


@dataclass(frozen=True)
class ClusterStatus:
    nodes: tuple[NodeRow, ...] = ()
    loans: tuple[LoanRow, ...] = ()
    # Pods whose loan record migchain did not believe (namespace/name; core/loan.py vouched): they hold no loan.
    doubted: tuple[str, ...] = ()

    def types(self) -> list[str]:
        """Every MIG type on some node, smallest first."""
        return sorted({resource for node in self.nodes for resource in node.slices}, key=type_order)

    def totals(self) -> dict[str, Slices]:
        totals: dict[str, Slices] = {}
        for node in self.nodes:
            for resource, slices in node.slices.items():
                totals[resource] = totals.get(resource, Slices()) + slices
        return totals


def type_order(resource: str) -> tuple[int, int, str, str]:
    """Smaller profiles first (compute slices, then memory); names that do not parse last."""
    try:
        profile = parse_mig_resource(resource)
    except ValueError:
        return (1 << 30, 0, "", resource)
    return (profile.compute_slices, profile.memory_gb, profile.suffix, resource)


def loan_pairs(loan: Loan) -> tuple[tuple[str, str, int], ...]:
    """Which requested type each borrowed slice stands in for: (requested, granted, count), borrowed slices only.

    The annotations record totals, not pairs. A type both asked for and held
    is held for itself; the rest are paired in size order, smallest request
    with smallest grant, which is how a borrow up a chain lines them up. A pod
    borrowing for one type (the usual case) has exactly one pair.

    Counts are matched as numbers, never spelled out one slice at a time: a
    loan record is pod-written text (the reader caps its counts, and this
    costs the same whatever they are).
    """
    original = dict(loan.original)
    held = dict(loan.borrowed)
    for resource in original.keys() & held.keys():
        exact = min(original[resource], held[resource])
        original[resource] -= exact
        held[resource] -= exact
    requested = [(r, original[r]) for r in sorted(original, key=type_order) if original[r] > 0]
    granted = [(r, held[r]) for r in sorted(held, key=type_order) if held[r] > 0]
    pairs: Counter[tuple[str, str]] = Counter()
    asking = giving = 0  # both lists in size order: the smallest request takes the smallest grant
    left, spare = (requested[0][1] if requested else 0), (granted[0][1] if granted else 0)
    while asking < len(requested) and giving < len(granted):
        paired = min(left, spare)
        pairs[requested[asking][0], granted[giving][0]] += paired
        left, spare = left - paired, spare - paired
        if left == 0:
            asking += 1
            left = requested[asking][1] if asking < len(requested) else 0
        if spare == 0:
            giving += 1
            spare = granted[giving][1] if giving < len(granted) else 0
    return tuple((requested, granted, count) for (requested, granted), count in sorted(pairs.items()))


def loan_rows(records: Iterable[PodRecord]) -> list[LoanRow]:
    """The borrowers that hold slices now, sorted by namespace and name. A pod whose loan record cannot be
    read or does not match it (`record_loan`) holds no loan: the loan guard counted and reported it."""
    loans = []
    for record in records:
        # Only a borrower carries the replaced UID: a cheap test before reading the record.
        if REPLACED_UID_ANNOTATION not in record.migchain or not record.node or record.terminal:
            continue
        loan = record_loan(record)
        if isinstance(loan, Loan):
            request = record.request
            loans.append(LoanRow(request.namespace, request.name, record.node, loan, record.created))
    loans.sort(key=lambda row: (row.namespace, row.pod))
    return loans


def on_loan(loans: Iterable[LoanRow]) -> dict[tuple[str, str], int]:
    """Slices on loan now: (requested type, granted type) -> count."""
    counts: Counter[tuple[str, str]] = Counter()
    for row in loans:
        for requested, granted, count in row.pairs:
            counts[requested, granted] += count
    return dict(counts)


def slice_totals(snapshot: Snapshot) -> dict[str, tuple[int, int]]:
    """Allocatable and free slices per MIG type over all nodes (free only on nodes that offer slices).

    The sums of `cluster_status(...).totals()`, without building a row per
    node: the metrics read this at every scrape.
    """
    allocatable: dict[str, int] = {}
    free: dict[str, int] = {}
    for node in snapshot.nodes.values():
        for resource, count in node.allocatable.items():
            allocatable[resource] = allocatable.get(resource, 0) + count
        if node.offers_slices:
            for resource, count in node.free.items():
                free[resource] = free.get(resource, 0) + count
    return {resource: (count, free.get(resource, 0)) for resource, count in allocatable.items()}


def cluster_status(snapshot: Snapshot, records: Iterable[PodRecord], doubted: Iterable[str] = ()) -> ClusterStatus:
    """Nodes that have MIG slices, and the borrowers that hold some, both sorted by name; `doubted`, the pods
    whose loan record was not believed."""
    loans = loan_rows(records)
    borrowed: dict[str, Counter[str]] = {}
    for row in loans:
        for _, granted, count in row.pairs:
            borrowed.setdefault(row.node, Counter())[granted] += count
    nodes = []
    for node in sorted(snapshot.nodes.values(), key=lambda node: node.name):
        lent = borrowed.get(node.name, Counter())
        slices = {
            resource: Slices(
                allocatable=node.allocatable.get(resource, 0),
                used=node.used.get(resource, 0),
                borrowed=lent[resource],
                free=node.free.get(resource, 0) if node.offers_slices else 0,
            )
            for resource in sorted(node.allocatable.keys() | node.used.keys(), key=type_order)
        }
        if slices:
            nodes.append(NodeRow(node.name, node.gpu_product, node.mig_config_state, node.offers_slices, slices))
    return ClusterStatus(tuple(nodes), tuple(loans), tuple(sorted(doubted)))


# -- showing it ---------------------------------------------------------------


def age_seconds(created: str, now: datetime.datetime) -> int | None:
    """Whole seconds since an RFC 3339 timestamp; None when there is none to read."""
    try:
        moment = datetime.datetime.fromisoformat(created)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return max(0, int((now - moment).total_seconds()))


def human_age(seconds: int) -> str:
    """An age as kubectl prints one: 45s, 3m12s, 95m, 5h3m, 30h, 3d4h, 12d, 2y30d."""
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if days < 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    return f"{days // 365}y{days % 365}d" if days < 365 * 8 and days % 365 else f"{days // 365}y"


def counts_short(counts: MigCounts) -> str:
    """`1g.5gb`, `2x 1g.5gb`, `1g.5gb+2g.10gb`: a loan's side in a table cell."""
    return "+".join(short_name(r) if n == 1 else f"{n}x {short_name(r)}" for r, n in counts) or "-"


def _cell(slices: Slices | None) -> str:
    if slices is None:
        return "-"
    text = f"{slices.used}/{slices.allocatable}"
    return f"{text} b{slices.borrowed}" if slices.borrowed else text


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell, two spaces apart, as kubectl prints them."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


DOUBTED_SHOWN = 10  # pods named in the line about loan records not believed


def status_text(status: ClusterStatus, now: datetime.datetime) -> str:
    """Two tables: nodes x MIG types (used/allocatable, borrowed), then the loans in force."""
    lines: list[str] = []
    types = status.types()
    if status.nodes:
        header = ["NODE", "GPU", "MIG STATE", *map(short_name, types)]
        rows = [
            [
                node.name,
                node.gpu_product or "-",
                node.mig_config_state or "-",
                *(_cell(node.slices.get(t)) for t in types),
            ]
            for node in status.nodes
        ]
        if len(status.nodes) > 1:
            totals = status.totals()
            rows.append(["TOTAL", "", "", *(_cell(totals.get(t)) for t in types)])
        lines += text_table(header, rows)
        lines.append("(used/allocatable slices; bN: N of them held by borrowers)")
    else:
        lines.append("no node has MIG slices")
    lines.append("")
    if status.loans:
        header = ["NAMESPACE", "POD", "ORIGINAL", "BORROWED", "NODE", "CHAIN", "AGE"]
        rows = []
        for row in status.loans:
            age = age_seconds(row.created, now)
            rows.append(
                [
                    row.namespace,
                    row.pod,
                    counts_short(row.loan.original),
                    counts_short(row.loan.borrowed),
                    row.node,
                    ",".join(row.loan.chains) or "-",
                    "-" if age is None else human_age(age),
                ]
            )
        lines += text_table(header, rows)
    else:
        lines.append("no active loans")
    if status.doubted:
        shown = ", ".join(status.doubted[:DOUBTED_SHOWN])
        more = len(status.doubted) - DOUBTED_SHOWN
        lines.append(
            f"{len(status.doubted)} pod(s) whose loan record is not believed (forged, unsigned or unreadable), "
            f"not counted as loans: {shown}" + (f" and {more} more" if more > 0 else "")
        )
    return "\n".join(lines)


def _slices_document(slices: Mapping[str, Slices]) -> dict[str, dict[str, int]]:
    return {
        resource: {"allocatable": s.allocatable, "used": s.used, "borrowed": s.borrowed, "free": s.free}
        for resource, s in slices.items()
    }


def status_document(status: ClusterStatus, now: datetime.datetime) -> dict[str, Any]:
    """The same as JSON-ready data, with full resource names, for tools."""
    return {
        "nodes": [
            {
                "name": node.name,
                "gpu_product": node.gpu_product,
                "mig_config_state": node.mig_config_state,
                "offers_slices": node.offers_slices,
                "slices": _slices_document(node.slices),
            }
            for node in status.nodes
        ],
        "totals": _slices_document(dict(sorted(status.totals().items(), key=lambda item: type_order(item[0])))),
        "loans": [
            {
                "namespace": row.namespace,
                "pod": row.pod,
                "node": row.node,
                "original": dict(row.loan.original),
                "borrowed": dict(row.loan.borrowed),
                "chains": list(row.loan.chains),
                "steps": row.loan.steps,
                "replaced_uid": row.loan.replaced_uid,
                "created": row.created,
                "age_seconds": age_seconds(row.created, now),
            }
            for row in status.loans
        ],
        "doubted_loans": list(status.doubted),
    }
