"""The fleet's Prometheus metrics (issue 14), registered on the registry the caller gives:
service.py passes Metrics.registry, so /metrics shows them beside the rest, and tests
pass a fresh CollectorRegistry. Passive: no tasks, no I/O. Labels stay low-cardinality:
op is one of OPS, result one of RESULTS.
"""

from __future__ import annotations

from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .metrics import PREFIX

OPS = ("lease", "hold", "dedup", "forget", "probe")
RESULTS = ("ok", "error", "timeout", "skipped")


class FleetMetrics:
    """What the fleet costs and what it catches; see docs/fleet.md for each series."""

    def __init__(self, registry: CollectorRegistry, *, redis: bool = True):
        # redis=False (no [fleet] redis_url): only the share is exported. The Redis series
        # go to a registry that nothing renders: a redis_up there would be a lie, and an
        # alert on it would fire for every daemon that needs no Redis.
        r = registry if redis else CollectorRegistry(auto_describe=False)
        counter = partial(Counter, namespace=PREFIX, registry=r)
        gauge = partial(Gauge, namespace=PREFIX, registry=r)
        self.redis_round_trips = counter(
            "fleet_redis_round_trips",
            "Round trips to Redis, by operation and result (skipped: Redis known down)",
            ["op", "result"])
        self.redis_latency = Histogram(
            "fleet_redis_latency_seconds", "Latency of Redis round trips that completed",
            ["op"], namespace=PREFIX, registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1))
        self.fallbacks = counter(
            "fleet_fallbacks",
            "Times this daemon fell back to local dedup and a local budget (Redis down)")
        self.redis_up = gauge(
            "fleet_redis_up", "1 while Redis answers, 0 while this daemon runs on local fallbacks")
        self.permits_leased = counter(
            "fleet_permits_leased",
            "Permits (one request each) this daemon leased from the fleet's budget")
        self.share = Gauge(
            "fleet_share",
            "This daemon's share of the app's Intercom budget in the last window (1: alone)",
            namespace=PREFIX, registry=registry)  # exported with or without Redis
        self.duplicates = counter(
            "fleet_duplicates",
            "Events another daemon of the fleet had already accepted (caught through Redis)")
        self.share.set(1.0)
        self.redis_up.set(1.0)
        for op in OPS:
            for result in RESULTS:
                self.redis_round_trips.labels(op, result)
