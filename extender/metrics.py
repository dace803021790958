"""Prometheus metrics of the extender, on a registry of its own (tests make a fresh one each)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# Filter and prioritize answer in well under a millisecond per hundred nodes;
# buckets resolve the range kube-scheduler cares about (its timeout is seconds).
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
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
            "Bind calls by outcome: bound, or refused (the scheduler retries the pod).",
            ["outcome", "kind"],
            registry=self.registry,
        )
