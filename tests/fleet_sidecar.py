"""One daemon's forwarding path, cut down, for the budget's component tests
(tests/unit/test_fleet_redis.py): a RateGate (with a FleetBudget when given Redis) in
front of the real UpstreamClient, and `senders` loops that each take the next event from a
shared supply, pass the gate, send, release the gate and put a 429'd event back, as
forwarder/workers.py does. Whole daemons are in tests/integration/test_fleet_service.py
(in process), test_fleet_processes.py and bench/fleet.py (real processes)."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import Counter, deque
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from forwarder.clock import Clock, SystemClock
from forwarder.config import IntercomConfig, Secret
from forwarder.dedup import DedupWindow
from forwarder.event import Event
from forwarder.fleet_budget import FleetBudget
from forwarder.fleet_dedup import FleetDedup
from forwarder.fleet_metrics import FleetMetrics
from forwarder.fleet_redis import FleetRedis, connect, fleet_namespace
from forwarder.ratelimit import RateGate
from forwarder.upstream import Outcome, UpstreamClient


def make_event(n: int, run: int = 0) -> Event:
    body = orjson.dumps({"event_name": "order-placed", "created_at": 1_700_000_000 + n,
                         "user_id": f"user-{run:03d}-{n:08d}"})
    return Event(body=body,
                 key=hashlib.blake2b(n.to_bytes(8, "big"), digest_size=16).digest())


class Supply:
    """Events waiting to be sent, shared by the senders of one or more sidecars."""

    def __init__(self, events: list[Event] | None = None):
        self.events: deque[Event] = deque(events or ())
        self._added = asyncio.Event()

    async def get(self) -> Event:
        """The next event, waiting for one if there is none."""
        while not self.events:
            self._added.clear()
            await self._added.wait()
        return self.events.popleft()

    def extend(self, events: list[Event]) -> None:
        self.events.extend(events)
        self._added.set()

    def put_back(self, event: Event) -> None:
        self.events.appendleft(event)
        self._added.set()


class Sidecar:
    """A gate, an upstream client and sender loops; start() and stop() own them."""

    def __init__(self, url: str, token: str, *, requests: int, per_seconds: float,
                 senders: int, supply: Supply, redis_url: str | None = None,
                 workspace_id: str = "ws", clock: Clock | None = None, seed: int = 0,
                 dedup_window_s: float = 3600.0, redis_timeout_s: float | None = None,
                 redis_retry_s: float | None = None):
        self.clock = clock or SystemClock()
        self.registry = CollectorRegistry()
        self.metrics = FleetMetrics(self.registry)
        self.redis: FleetRedis | None = None
        self.budget: FleetBudget | None = None
        self.dedup: FleetDedup | None = None
        if redis_url:
            extra: dict[str, Any] = {}
            if redis_timeout_s is not None:
                extra["timeout_s"] = redis_timeout_s
            if redis_retry_s is not None:
                extra["retry_s"] = redis_retry_s
            client = connect(redis_url, **{k: v for k, v in extra.items() if k == "timeout_s"})
            self.redis = FleetRedis(client, fleet_namespace(workspace_id, Secret(token)),
                                    self.clock, self.metrics, **extra)
            self.budget = FleetBudget(self.redis, requests=requests, per_seconds=per_seconds,
                                      clock=self.clock, metrics=self.metrics,
                                      rng=random.Random(seed))
            self.dedup = FleetDedup(self.redis, DedupWindow(dedup_window_s, 100_000, self.clock),
                                    window_seconds=dedup_window_s, clock=self.clock,
                                    metrics=self.metrics)
        self.gate = RateGate(requests, per_seconds, self.clock, fleet=self.budget,
                             rng=random.Random(seed + 10_000))
        self.upstream = UpstreamClient(IntercomConfig(base_url=url, access_token=Secret(token)),
                                       Secret(token), pool_size=senders, clock=self.clock)
        self.supply = supply
        self.senders = senders
        self.statuses: Counter[int | None] = Counter()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.upstream.start()
        if self.budget is not None:
            await self.budget.start()
        if self.dedup is not None:
            await self.dedup.start()
        self._tasks = [asyncio.create_task(self._send_loop()) for _ in range(self.senders)]

    async def stop(self) -> None:
        """Stop sending; an event cut off in flight goes back to the supply (so sidecars
        sharing one supply stop together: asyncio.gather their stop())."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.dedup is not None:
            await self.dedup.stop()
        if self.budget is not None:
            await self.budget.stop()
        await self.upstream.close()
        if self.redis is not None:
            await self.redis.close()

    async def _send_loop(self) -> None:
        while True:
            event = await self.supply.get()
            try:
                await self.gate.acquire()
            except asyncio.CancelledError:
                self.supply.put_back(event)
                raise
            try:
                verdict = await self.upstream.send(event)
            except asyncio.CancelledError:
                self.supply.put_back(event)
                self.gate.release(None, None)
                raise
            self.gate.release(verdict.status, verdict.rate, verdict.retry_after_s)
            self.statuses[verdict.status] += 1
            if verdict.outcome is not Outcome.DELIVERED:
                self.supply.put_back(event)
