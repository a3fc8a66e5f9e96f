"""The local budget: `rate_limit.requests` per `rate_limit.per_seconds` for this daemon
alone (aiolimiter's leaky bucket), entered on 50 ms ticks. It knows nothing of Intercom's
headers or of other daemons; forwarder/ratelimit/gate.py puts it in front of the parts that
do.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol


class LocalLimiter(Protocol):
    """The local budget; aiolimiter.AsyncLimiter fits. It may read the loop clock."""

    async def acquire(self) -> None: ...


class Bucket(Protocol):
    def has_capacity(self, amount: float = 1) -> bool: ...

    async def acquire(self) -> None: ...


PACING_TICK_S = 0.05


class TickedLimiter:
    """The local budget (aiolimiter's leaky bucket), entered on 50 ms ticks while it is
    empty, so paced sends leave in small groups instead of one per drip.

    Paced one at a time, every send wakes an idle event loop on its own: the same
    UpstreamClient.send costs ~680 us of CPU after a 6 ms idle gap against ~190 us back
    to back (measured here), and at 166 sends/s that was ~10% of a core. Waiting for the
    next tick lets the permits that dripped in meanwhile go out together, one wake-up for
    several sends. The budget is unchanged; a send waits at most one tick longer.

    One ticker task sleeps for all waiters, and a tick wakes only as many (oldest first)
    as the bucket has permits for: with 32 workers each sleeping to the tick on its own
    timer, ~640 wake-ups a second mostly found no permit, a visible share of the CPU per
    send. While anyone waits (or holds a permit granted at a tick but not yet taken),
    newcomers queue behind them, so acquires are served in arrival order.

    Times are the loop's (aiolimiter reads loop.time() itself); tests inject both.
    """

    def __init__(self, bucket: Bucket, tick_s: float = PACING_TICK_S, *,
                 now: Callable[[], float] | None = None,
                 sleep: Callable[[float], Awaitable[None]] | None = None):
        self._bucket = bucket
        self._tick_s = tick_s
        self._now = now
        self._sleep = sleep or asyncio.sleep
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._granted = 0  # woken at a tick, not yet in the bucket
        self._ticker: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        bucket = self._bucket
        if self._waiters or self._granted or not bucket.has_capacity():
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            if self._ticker is None:
                self._ticker = loop.create_task(self._tick())
            try:
                await fut
            except asyncio.CancelledError:
                if fut.cancelled():
                    with contextlib.suppress(ValueError):  # ValueError: popped by _grant
                        self._waiters.remove(fut)
                else:  # granted, then cancelled before taking it: the permit goes on
                    self._granted -= 1
                    self._grant()
                if not self._waiters and self._ticker is not None:
                    # Nobody left to tick for: no task or timer outlives the last waiter.
                    self._ticker.cancel()
                    self._ticker = None
                raise
            self._granted -= 1
        await bucket.acquire()  # has capacity (granted by a tick): returns without waiting

    async def _tick(self) -> None:
        try:
            while self._waiters:
                now = self._now() if self._now else asyncio.get_running_loop().time()
                await self._sleep(math.floor(now / self._tick_s + 1) * self._tick_s - now)
                self._grant()
        finally:
            if self._ticker is asyncio.current_task():
                self._ticker = None

    def _grant(self) -> None:
        """Wake the oldest waiters, as many as the bucket holds permits for now."""
        waiters, bucket = self._waiters, self._bucket
        while waiters and bucket.has_capacity(self._granted + 1):
            fut = waiters.popleft()
            if fut.done():  # cancelled; its acquire() has not run its except clause yet
                continue
            fut.set_result(None)
            self._granted += 1
