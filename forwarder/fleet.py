"""A fleet's shared parts, built from one [fleet] redis_url (docs/fleet.md): the Redis
client with its namespace, the budget (FleetBudget, the rate gate's fleet part) and the
dedup window (FleetDedup, in front of this daemon's DedupWindow). Service owns one Fleet,
starts it before the workers and stops it after them.

While Redis is down, a probe (PING, every RETRY_S) brings the fleet back even when no
request or send would try Redis: an idle daemon does not report Redis down for hours
after a blip. At start, one probe says at once (fleet.redis_unavailable) when the URL
points nowhere.

The namespace is the token's digest at start: a token rotated by SIGHUP keeps this
daemon in its fleet, since every sidecar of the app rotates at its own moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field

import structlog

from .clock import Clock
from .config import Config
from .dedup import DedupWindow
from .fleet_budget import FleetBudget
from .fleet_dedup import FleetDedup
from .fleet_metrics import FleetMetrics
from .fleet_redis import RETRY_S, FleetRedis, connect, fleet_namespace

log = structlog.get_logger("forwarder.fleet")


@dataclass(slots=True)
class Fleet:
    redis: FleetRedis
    budget: FleetBudget
    dedup: FleetDedup
    clock: Clock
    _prober: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    def build(cls, config: Config, local_dedup: DedupWindow, *, clock: Clock,
              rng: random.Random, metrics: FleetMetrics) -> Fleet:
        """No I/O: the client connects on its first round trip."""
        redis = FleetRedis(
            connect(config.fleet.redis_url.reveal()),
            fleet_namespace(config.intercom.workspace_id, config.intercom.access_token),
            clock, metrics)
        budget = FleetBudget(redis, requests=config.rate_limit.requests,
                             per_seconds=config.rate_limit.per_seconds, clock=clock,
                             metrics=metrics, rng=rng)
        dedup = FleetDedup(redis, local_dedup, window_seconds=config.dedup.window_seconds,
                           clock=clock, metrics=metrics)
        return cls(redis, budget, dedup, clock)

    async def start(self) -> None:
        log.info("fleet.enabled", namespace=self.redis.namespace)
        await self._probe()  # bounded: logs fleet.redis_unavailable now if it is
        await self.budget.start()  # its hold pusher; permits come with the first take()
        await self.dedup.start()  # its forget flusher
        self._prober = asyncio.create_task(self._probe_while_down(), name="fleet-probe")

    async def stop(self) -> None:
        """Bounded: the dedup's last flush of queued forgets waits on Redis no longer than
        one round trip's bound. The client closes even if a part fails to stop."""
        prober, self._prober = self._prober, None
        if prober is not None:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
        try:
            await self.dedup.stop()
            await self.budget.stop()
        finally:
            await self.redis.close()

    async def _probe(self) -> None:
        await self.redis.call("probe", self.redis.client.ping)

    async def _probe_while_down(self) -> None:
        while True:
            await self.clock.sleep(RETRY_S)
            if not self.redis.up:
                await self._probe()  # skipped (and cheap) until the retry time
