"""Prometheus metrics, all named intercom_forwarder_*. Passive: no tasks, no I/O.

Each Service gets its own CollectorRegistry, so tests (and two services in one process)
never share counters. Labels are low-cardinality by design: never an event name or a
contact id. The registry also carries prometheus_client's standard process_* and python_*
collectors (memory, CPU, open fds, GC, interpreter version), read from /proc at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "intercom_forwarder"


class Tally:
    """One series of a LoopCounter."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class LoopCounter:
    """A labelled counter for code that runs on the event loop's thread only: the intake
    counts every request, and prometheus_client's Counter takes a lock on each inc()
    (~380 ns, bench/stages.py "count"); a Tally is a plain int addition (~60 ns).

    Exposed through a custom collector, prometheus_client's documented extension point,
    so /metrics and registry.get_sample_value() read it like any Counter (`_total`).
    Read at scrape time on the same thread, so no increment is ever half-seen.
    """

    def __init__(self, name: str, documentation: str, labelnames: list[str],
                 registry: CollectorRegistry):
        self._name = name
        self._documentation = documentation
        self._labelnames = labelnames
        self._series: dict[tuple[str, ...], Tally] = {}
        registry.register(self)

    def labels(self, *values: str) -> Tally:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
        tally = self._series.get(values)
        if tally is None:
            tally = self._series[values] = Tally()
        return tally

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def describe(self) -> list[CounterMetricFamily]:
        return [self._family()]

    def collect(self) -> list[CounterMetricFamily]:
        family = self._family()
        for values, tally in self._series.items():
            family.add_metric(list(values), tally.value)
        return [family]


class Metrics:
    """Every metric the daemon exports; see docs/metrics.md for what each one means."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events_received = LoopCounter(
            f"{PREFIX}_events_received",
            "Events received at the intake, by outcome",
            ["outcome"],  # accepted | duplicate | rejected | queue_full | shutting_down
            registry=r,
        )
        # Every metric below is intercom_forwarder_<name> (prometheus_client's namespace).
        counter = partial(Counter, namespace=PREFIX, registry=r)
        gauge = partial(Gauge, namespace=PREFIX, registry=r)
        histogram = partial(Histogram, namespace=PREFIX, registry=r)
        self.metadata_keys_dropped = counter(
            "metadata_keys_dropped",
            "Metadata keys beyond Intercom's 10-key limit that were dropped")
        self.unknown_fields_dropped = counter(
            "unknown_fields_dropped", "Unknown top-level event fields dropped at the intake")
        self.events_forwarded = counter(
            "events_forwarded",
            "Forwarding results: delivered, retried (a retry scheduled) or dead_lettered",
            ["result", "reason"])
        self.queue_depth = gauge("queue_depth", "Events ready to send, waiting in the queue")
        self.retry_waiting = gauge("retry_waiting", "Events waiting for their retry time")
        self.events_held = gauge(
            "events_held",
            "Accepted events not yet settled: queued, waiting for a retry, at the rate gate, "
            "on the wire, or held by the auth probe")
        self.upstream_requests = counter(
            "upstream_requests",
            "Requests sent to Intercom, by HTTP status (or 'error' for network failures)",
            ["status"])
        self.upstream_latency = histogram(
            "upstream_latency_seconds", "Latency of requests to Intercom",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
        self.rate_limit_wait = counter(
            "rate_limit_wait_seconds", "Time workers spent waiting on the rate limit")
        self.rate_limited = counter("rate_limited", "429 Too Many Requests answers from Intercom")
        self.paused = gauge(
            "paused", "1 while forwarding is paused because Intercom refused the token (401/403)")
        self.proxy_reads = counter(
            "proxy_reads",
            "GET /events reads served through the daemon, by the status it answered", ["status"])
        self.spool_loaded = gauge(
            "spool_loaded_events", "Events reloaded from the spool when the daemon started")

        # Disk mode (issue 13). Absent work reads 0: in memory mode these stay 0.
        self.queue_disk_bytes = gauge(
            "queue_disk_bytes",
            "Disk mode: bytes the queue's log holds (live pages and WAL), what "
            "queue.max_disk_bytes bounds")
        self.queue_disk_events = gauge(
            "queue_disk_events",
            "Disk mode: accepted events in the log, not yet delivered or dead-lettered")
        self.queue_commit_latency = histogram(
            "queue_commit_latency_seconds",
            "Disk mode: from a write's submission to its commit (what a 202 waits for)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
        self.queue_events_per_commit = histogram(
            "queue_events_per_commit",
            "Disk mode: events inserted by one commit (group commit: concurrent requests "
            "share one)",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 1000, 5000))
        self.queue_damaged_logs = counter(
            "queue_damaged_logs",
            "Disk mode: damaged logs found at start, moved aside after what could be read "
            "was kept")
        # The standard runtime metrics (the deploy docs size memory limits with
        # process_resident_memory_bytes). Their own names, not intercom_forwarder_*.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        # Series that exist from the start read 0 rather than absent, so rate() and
        # increase() see the first event of each kind.
        for outcome in ("accepted", "duplicate", "rejected", "queue_full", "shutting_down"):
            self.events_received.labels(outcome)
        self.events_forwarded.labels("delivered", "")
        for reason in ("server_error", "timeout", "connection_error"):
            self.events_forwarded.labels("retried", reason)
        for reason in ("contact_not_found", "rejected", "retries_exhausted"):
            self.events_forwarded.labels("dead_lettered", reason)

    def bind_queue(self, ready: Callable[[], int], waiting: Callable[[], int]) -> None:
        """Read queue sizes at scrape time, so the hot path never updates a gauge."""
        self.queue_depth.set_function(ready)
        self.retry_waiting.set_function(waiting)

    def bind_disk(self, disk_bytes: Callable[[], int], disk_events: Callable[[], int]) -> None:
        """Read the disk queue's size at scrape time (see bind_queue)."""
        self.queue_disk_bytes.set_function(disk_bytes)
        self.queue_disk_events.set_function(disk_events)

    def observe_commit(self, stats: object) -> None:
        """One commit of the disk queue (disklog.CommitStats), on the loop's thread."""
        self.queue_commit_latency.observe(stats.latency_s)  # type: ignore[attr-defined]
        if stats.events:  # type: ignore[attr-defined]  # settles-only commits add no events
            self.queue_events_per_commit.observe(stats.events)  # type: ignore[attr-defined]

    def bind_held(self, held: Callable[[], int]) -> None:
        """Read the number of unsettled events at scrape time (see bind_queue)."""
        self.events_held.set_function(held)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
