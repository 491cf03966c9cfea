"""Prometheus metrics of one calculator instance, in a registry of its own."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class CalculatorMetrics:
    """Everything the calculator counts; one instance per process (or per test)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.records = Counter(
            "calculator_records", "Input records consumed", ["topic"], registry=r
        )
        self.undecodable = Counter(
            "calculator_undecodable_records",
            "Input records skipped because their key or value could not be decoded",
            ["topic"],
            registry=r,
        )
        self.published = Counter(
            "calculator_sellable_published", "Sellable values produced", registry=r
        )
        self.reservations_decided = Counter(
            "calculator_reservations_decided",
            "Validated reservations decided by this instance (replays not counted)",
            ["status"],
            registry=r,
        )
        self.lag = Gauge(
            "calculator_lag_records",
            "Records between the broker's end offset and the next offset to process",
            ["topic", "partition"],
            registry=r,
        )
        self.forwarded_waits = Gauge(
            "calculator_forwarded_waits",
            "Read-your-writes GETs being relayed to their owner right now",
            registry=r,
        )
        self.forwarded_waits_refused = Counter(
            "calculator_forwarded_waits_refused",
            "Read-your-writes GETs answered 503 too_many_waits "
            "(CALCULATOR_MAX_FORWARDED_WAITS were being relayed already)",
            registry=r,
        )
        self.rebalances = Counter(
            "calculator_rebalances",
            "Assignments of partitions this instance received from the calculator group",
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "calculator_assigned_partitions",
            "Partitions assigned to this instance, by state (restoring, active)",
            ["state"],
            registry=r,
        )
        self.partitions_restored = Counter(
            "calculator_partitions_restored",
            "Partitions restored (from the local store and the changelog topic)",
            registry=r,
        )
        self.records_restored = Counter(
            "calculator_changelog_records_restored",
            "Changelog records applied while restoring partitions",
            registry=r,
        )
        self.restore_seconds = Histogram(
            "calculator_restore_seconds",
            "Time to restore one partition (records restored / this = records restored per s)",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.standby_partitions = Gauge(
            "calculator_standby_partitions",
            "Partitions this instance keeps as a standby replica, by state (warm, catching_up)",
            ["state"],
            registry=r,
        )
        self.standby_records = Counter(
            "calculator_standby_records",
            "Changelog records applied to standby partitions",
            registry=r,
        )
        self.stale_answers = Counter(
            "calculator_stale_answers",
            "GETs answered from a standby replica while the owner was unavailable, by reason",
            ["reason"],
            registry=r,
        )
        self.get_seconds = Histogram(
            "calculator_get_seconds",
            "Latency of GET /inventory/locations/{location}/skus/{sku}",
            ["served"],
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        # Bound once: a label lookup is measurable on a path as hot as the GET.
        self.local_get_seconds = self.get_seconds.labels("local")
        self.forwarded_get_seconds = self.get_seconds.labels("forwarded")
