"""Prometheus metrics of the extender and the returner, each on a registry of its own (tests make a fresh one each).

Counters are incremented where things happen (binder, returner, watch);
the state of the cluster (loans, free slices) is read from the watch cache
at scrape time by `ClusterCollector`, never updated per event.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from extender.core.cluster import PodRecord, Snapshot
from extender.core.decide import Placement
from extender.core.loan import Loan
from extender.core.mig import short_name
from extender.core.status import loan_pairs, loan_rows, on_loan, slice_totals
from extender.reload import ReloadStatus
from extender.tls import CertificateStatus

# Filter and prioritize answer in well under a millisecond per hundred nodes;
# buckets resolve the range kube-scheduler cares about (its timeout is seconds).
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# A re-carve takes the MIG Manager about two minutes a node (the device plugin, GFD and DCGM paused and back).
RECARVE_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 1200.0)

# What `ClusterCollector` reads: the snapshot and every pod record, or None while the cache is not in sync.
ClusterView = Callable[[], tuple[Snapshot, Iterable[PodRecord]] | None]


class Errors:
    """`migchain_errors_total{component, kind}`: API errors, refused binds, watch restarts, failed returns..."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Without a registry (a component built alone, as in tests) the counts go nowhere.
        self.counter = Counter(
            "migchain_errors",
            "Errors by component (binder, watch, cache, journal, events, lease, returner, http) and kind.",
            ["component", "kind"],
            registry=registry if registry is not None else CollectorRegistry(),
        )

    def count(self, component: str, kind: str, amount: int = 1) -> None:
        self.counter.labels(component, kind).inc(amount)


class UnreadableLoans:
    """`migchain_unreadable_loans_total{reason}`: pods whose loan record migchain does not believe, once each."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.counter = Counter(
            "migchain_unreadable_loans",
            "Pods whose loan record migchain did not believe, each counted once, by reason: forged (its "
            "migchain.io/loan-signature does not match: the record or the pod was edited, or the record copied), "
            "unsigned (no signature: made before loans were signed, or not by migchain). Such a pod is no borrower: "
            "it keeps what it asks for and is never returned.",
            ["reason"],
            registry=registry if registry is not None else CollectorRegistry(),
        )

    def count(self, reason: str) -> None:
        self.counter.labels(reason).inc()


class JournalGauges:
    """`migchain_journal_overdue_entries{kind}` and `migchain_journal_oldest_entry_seconds{kind}`: journal entries
    older than the alert age (a pod there may exist nowhere else), and the age of the oldest unfinished one."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.overdue = Gauge(
            "migchain_journal_overdue_entries",
            "Journal entries (kind: borrow, return) left unfinished longer than --journal-overdue-after: each is a "
            "bare pod that may exist only in the journal. Alert on > 0.",
            ["kind"],
            registry=registry,
        )
        self.oldest = Gauge(
            "migchain_journal_oldest_entry_seconds",
            "Age of the oldest unfinished journal entry of each kind (0 when there is none), as of the last "
            "recovery pass.",
            ["kind"],
            registry=registry,
        )

    def set(self, kind: str, overdue: int, oldest: float) -> None:
        self.overdue.labels(kind).set(overdue)
        self.oldest.labels(kind).set(oldest)


class Metrics:
    """The extender's: its HTTP verbs, binds and borrows, errors, and the cluster as the watch sees it."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "migchain_extender_requests",
            "Extender calls by verb and HTTP status.",
            ["verb", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "migchain_extender_request_duration_seconds",
            "Time to answer an extender call, by verb.",
            ["verb"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.binds = Counter(
            "migchain_binds",
            "Bind calls by outcome: bound, or refused (the scheduler retries the pod), and kind: exact or borrow, "
            "what was placed (refused: the borrow refused as needless, an exact fit being free elsewhere), or none.",
            ["outcome", "kind"],
            registry=self.registry,
        )
        self.borrows = Counter(
            "migchain_borrows",
            "Slices borrowed: a slice of type `granted` given to a pod that asked for type `requested`.",
            ["requested", "granted"],
            registry=self.registry,
        )
        self.dry_run_borrows = Counter(
            "migchain_dry_run_borrows",
            "Slices a bind would have borrowed, had dry-run not been on (the pod stays pending).",
            ["requested", "granted"],
            registry=self.registry,
        )
        self.requeues = Counter(
            "migchain_requeues",
            "Pods refused while migchain's view of the cluster lagged kube-scheduler's that migchain then asked "
            "kube-scheduler to retry (an annotation patch), by outcome: requeued, gone (the pod went or was "
            "replaced first), refused (the API server refused the patch), failed (no answer or a server error; "
            "given up after retries).",
            ["outcome"],
            registry=self.registry,
        )
        self.leader = Gauge(
            "migchain_extender_leader",
            "1 while this extender replica leads (holds the lease, has relisted since) and so answers the verbs, "
            "else 0.",
            registry=self.registry,
        )
        self.errors = Errors(self.registry)
        self.unreadable_loans = UnreadableLoans(self.registry)
        self.journal = JournalGauges(self.registry)

    def count_borrow(self, placement: Placement, *, dry_run: bool = False) -> None:
        counter = self.dry_run_borrows if dry_run else self.borrows
        for grant in placement.grants:
            if grant.borrowed:
                counter.labels(short_name(grant.requested), short_name(grant.granted)).inc(grant.count)

    def watch_cluster(self, view: ClusterView) -> None:
        """Export loans and slices read from `view` at every scrape."""
        self.registry.register(ClusterCollector(view))


class ReturnerMetrics:
    """The returner's: returns by outcome, errors, and whether this replica leads."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.returns = Counter(
            "migchain_returns",
            "Borrowed slices the returner tried to give back, by type and outcome: returned, reclaimed (taken back "
            "for a pod waiting for that type; the borrower back to Pending), blocked "
            "(a PodDisruptionBudget refused the eviction; retried later), failed (API error), "
            "gone (the borrower left or changed first), dry-run (decided and announced, not done).",
            ["requested", "granted", "outcome"],
            registry=self.registry,
        )
        self.preemptions = Counter(
            "migchain_preemptions",
            "Preemptions the returner tried for a pending pod of higher priority, by outcome: preempted, blocked "
            "(a PodDisruptionBudget refused a victim's eviction; that victim is spared a while, another tried), "
            "failed (API error), gone (the pod or a victim changed first), dry-run (decided and announced, not done).",
            ["outcome"],
            registry=self.registry,
        )
        self.preempted = Counter(
            "migchain_preempted_pods",
            "Pods a preemption evicted, by fate: returned (a borrower, to its own type on a free slice), pending "
            "(a borrower, to its own type, Pending until one frees), evicted (a pod that fit exactly).",
            ["fate"],
            registry=self.registry,
        )
        self.turned_away = Counter(
            "migchain_turned_away_borrowers",
            "Borrowing copies their node's kubelet refused at admission (UnexpectedAdmissionError, OutOf<MIG type>: "
            "the slices were not free after all), by what migchain did: brought-back (a bare pod, recreated pending "
            "with its original request), left-to-controller (an owned pod), failed (not yet: retried), dry-run.",
            ["outcome"],
            registry=self.registry,
        )
        self.leader = Gauge(
            "migchain_returner_leader",
            "1 while this returner replica holds the lease (and so acts), else 0.",
            registry=self.registry,
        )
        self.recarves = Counter(
            "migchain_recarves",
            "Re-carves of idle nodes (every GPU to a new MIG layout, through the GPU Operator's MIG Manager), by "
            "outcome: applied (the node's allocatable shows the new layout), failed (the MIG Manager refused; the "
            "label put back), abandoned (a pod took a slice first, or the label or node changed under it: nothing "
            "changed), timed-out (not applied after the timeout; still followed), dry-run (planned and announced), "
            "drain-abandoned (a busy node cordoned to drain for a re-carve, uncordoned: no longer worth it).",
            ["outcome"],
            registry=self.registry,
        )
        self.drain_evictions = Counter(
            "migchain_recarve_drain_evictions",
            "Pods evicted (Eviction API) from a node drained for a re-carve: the restarts drain to re-carve costs.",
            registry=self.registry,
        )
        self.recarve_seconds = Histogram(
            "migchain_recarve_seconds",
            "Time to capacity of a re-carve: from the node's nvidia.com/mig.config label set to its allocatable "
            "showing the new layout.",
            buckets=RECARVE_BUCKETS,
            registry=self.registry,
        )
        self.errors = Errors(self.registry)
        self.unreadable_loans = UnreadableLoans(self.registry)
        self.journal = JournalGauges(self.registry)

    def count_recarve(self, outcome: str) -> None:
        self.recarves.labels(outcome).inc()

    def count_return(self, loan: Loan, outcome: str) -> None:
        for requested, granted, count in loan_pairs(loan):
            self.returns.labels(short_name(requested), short_name(granted), outcome).inc(count)

    def watch_leadership(self, leading: Callable[[], bool]) -> None:
        self.leader.set_function(lambda: 1.0 if leading() else 0.0)


class ClusterCollector:
    """Gauges computed at scrape time from the cache's current snapshot and pod records."""

    def __init__(self, view: ClusterView) -> None:
        self._view = view

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "migchain_loans",
                "Slices on loan now: held by a running borrower of type `granted` for a request of type `requested`.",
                labels=["requested", "granted"],
            ),
            GaugeMetricFamily(
                "migchain_free_slices",
                "Free MIG slices per type, over nodes that offer slices (not being repartitioned).",
                labels=["type"],
            ),
            GaugeMetricFamily(
                "migchain_allocatable_slices",
                "Allocatable MIG slices per type, over all nodes.",
                labels=["type"],
            ),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        loans, free, allocatable = self._families()
        current = self._view()
        if current is not None:  # before the first lists, no numbers rather than zeros
            snapshot, records = current
            for (requested, granted), count in sorted(on_loan(loan_rows(records)).items()):
                loans.add_metric([short_name(requested), short_name(granted)], count)
            for resource, (total, available) in sorted(slice_totals(snapshot).items()):
                free.add_metric([short_name(resource)], available)
                allocatable.add_metric([short_name(resource)], total)
        yield from (loans, free, allocatable)


# What `RulesCollector` reads: the reload status of the chain rules in force.
RulesStatus = Callable[[], ReloadStatus]


class RulesCollector:
    """The chain rules' reload state, read at scrape time: failures, the last good load, a rejected edit now."""

    def __init__(self, status: RulesStatus) -> None:
        self._status = status

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            CounterMetricFamily(
                "migchain_config_reload_failures",
                "Edits of the chain rule files rejected (YAML or validation errors); the last good rules stayed.",
            ),
            GaugeMetricFamily(
                "migchain_config_last_reload_success_timestamp_seconds",
                "When the chain rules in force were loaded (Unix time).",
            ),
            GaugeMetricFamily(
                "migchain_config_last_reload_rejected",
                "1 while the files on disk hold a rejected edit (the rules in force are older than the files), else 0.",
            ),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        failures, last_good, rejected = self._families()
        status = self._status()
        failures.add_metric([], status.failures)
        last_good.add_metric([], status.last_good)
        rejected.add_metric([], 1.0 if status.error else 0.0)
        yield from (failures, last_good, rejected)


def watch_rules(registry: CollectorRegistry, status: RulesStatus) -> None:
    """Export the reload state of the chain rules on `registry` (the extender's or the returner's)."""
    registry.register(RulesCollector(status))


class CertificateCollector:
    """The extender's certificates, read at scrape time: when each expires, how many days are left, reloads."""

    def __init__(self, status: Callable[[], CertificateStatus], clock: Callable[[], float]) -> None:
        self._status = status
        self._clock = clock

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, CounterMetricFamily, GaugeMetricFamily]:
        certificates = (
            "by certificate: serving (the extender's), client-ca (the last CA of the bundle it verifies "
            "kube-scheduler with to expire), client (the last verified client certificate it was shown)"
        )
        return (
            GaugeMetricFamily(
                "migchain_certificate_expiry_timestamp_seconds",
                f"When a certificate expires (Unix time), {certificates}.",
                labels=["certificate"],
            ),
            GaugeMetricFamily(
                "migchain_certificate_days_left",
                f"Days until a certificate expires (negative once it has), {certificates}. Renewal keeps the "
                "leaves above 30 days of their 90; alert below 20.",
                labels=["certificate"],
            ),
            CounterMetricFamily(
                "migchain_certificate_reload_failures",
                "Changes of the TLS files that could not be loaded (a key that is not the certificate's, a broken "
                "file); the credentials before them stayed in use.",
            ),
            GaugeMetricFamily(
                "migchain_certificate_last_reload_timestamp_seconds",
                "When the TLS credentials in use were loaded (Unix time).",
            ),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        expiry, days_left, failures, last_reload = self._families()
        status = self._status()
        now = self._clock()
        for certificate, not_after in (
            ("serving", status.serving_not_after),
            ("client-ca", status.client_ca_not_after),
            ("client", status.client_not_after),
        ):
            if not_after:
                expiry.add_metric([certificate], not_after)
                days_left.add_metric([certificate], (not_after - now) / 86400)
        failures.add_metric([], status.failures)
        last_reload.add_metric([], status.last_reload)
        yield from (expiry, days_left, failures, last_reload)


def watch_certificates(
    registry: CollectorRegistry, status: Callable[[], CertificateStatus], clock: Callable[[], float] = time.time
) -> None:
    """Export the expiry and reloads of the extender's TLS credentials on `registry`."""
    registry.register(CertificateCollector(status, clock))
