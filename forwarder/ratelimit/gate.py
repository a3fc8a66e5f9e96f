"""The rate gate every send passes, in order:

1. the local budget (local.py): rate_limit.requests per per_seconds for this daemon;
2. Intercom's budget as its headers tell it (headers.py): Remaining, Reset, 429 holds;
3. this daemon's share of that budget when others spend it too (share.py), learnt from
   Remaining falling faster than this daemon's own sends explain; alone, it does nothing;
4. optionally a budget shared through Redis (FleetPart, forwarder/fleet_budget.py): a
   permit leased from the fleet. While Redis serves, 3 stands aside (the fleet's count is
   exact); while it is down, 3 paces with the smaller of its own share and the last share
   the fleet gave this daemon.

RateGate owns the waiting: workers park on futures woken by release() / hold_for(), or by
the injected clock's sleep when a delay is known. Priority acquires (a person waiting on
GET /events) pass ahead of waiting normal ones; all wait in the local budget in arrival
order.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import TYPE_CHECKING, Protocol

from aiolimiter import AsyncLimiter

from .headers import HeaderBudget
from .local import LocalLimiter, TickedLimiter
from .share import FleetShare

if TYPE_CHECKING:
    from forwarder.clock import Clock
    from forwarder.upstream import RateHeaders


class FleetPart(Protocol):
    """A budget shared with the other daemons of the app (FleetBudget fits)."""

    async def take(self) -> float:
        """0.0: a permit is this daemon's (or the fleet is unreachable: fail open);
        > 0: wait that long, then ask again."""
        ...

    def give_back(self) -> None:
        """Return a permit taken but not used (a hold began meanwhile)."""
        ...

    def observe(self, status: int | None, rate: RateHeaders | None) -> None: ...

    @property
    def fallback_share(self) -> float | None:
        """None while the fleet serves; else the share to pace with locally."""
        ...


class RateGate:
    """Lets a request start only within the local budget, Intercom's known budget and this
    daemon's share of it; every acquire() must be paired with exactly one release()."""

    def __init__(
        self,
        requests: int,
        per_seconds: float,
        clock: Clock,
        *,
        limiter: LocalLimiter | None = None,
        fleet: FleetPart | None = None,
        rng: random.Random | None = None,
    ):
        self._clock = clock
        self._limiter: LocalLimiter = (
            limiter if limiter is not None
            else TickedLimiter(AsyncLimiter(requests, per_seconds))
        )
        self.headers = HeaderBudget(per_seconds, clock)
        self.share = FleetShare(per_seconds, rng)
        self._fleet = fleet
        self._in_flight = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._priority_waiting = 0

    def __repr__(self) -> str:
        h = self.headers
        return (
            f"RateGate(in_flight={self._in_flight}, remaining={h.remaining}, "
            f"limit={h.limit}, held_until={self.held_until}, share={self.share.share:.3f})"
        )

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def held_until(self) -> float | None:
        """Monotonic time until which nobody may start, or None when not held."""
        return self.headers.held_until(self._clock.monotonic())

    async def acquire(self, *, priority: bool = False) -> float:
        """Wait for budget, count the request in flight; returns the seconds waited.

        Cancellation-safe: a cancelled acquire leaves in_flight unchanged (the local
        limiter's slot, if already taken, is spent; a fleet permit goes back).
        """
        started = self._clock.monotonic()
        await self._limiter.acquire()
        if priority:
            self._priority_waiting += 1
        try:
            while True:
                while (delay := self._delay(priority)) > 0:
                    await self._wait(delay)
                if self._fleet is None:
                    break
                delay = await self._fleet.take()
                if delay > 0:
                    await self._wait(delay)
                elif self._delay(priority) > 0:  # a hold began while we asked the fleet
                    self._fleet.give_back()
                else:
                    break
        finally:
            if priority:
                self._priority_waiting -= 1
                self._wake()  # normal waiters held back behind this one re-check
        self._in_flight += 1
        self.share.on_send(self.headers, self._clock.monotonic())
        return self._clock.monotonic() - started

    def release(
        self, status: int | None, rate: RateHeaders | None, retry_after_s: float | None = None
    ) -> None:
        """After the answer (status None for a network error): in_flight -= 1, then learn."""
        self._in_flight = max(0, self._in_flight - 1)
        self.headers.learn(status, rate, retry_after_s, self._clock.monotonic())
        self.share.observe(rate, self._in_flight, self.headers)
        if self._fleet is not None:
            self._fleet.observe(status, rate)
        self._wake()

    def hold_for(self, seconds: float) -> None:
        """Hold every worker (priority ones too) for `seconds` from now."""
        self.headers.hold_for(seconds)
        self._wake()

    # internals -------------------------------------------------------------------------

    def _delay(self, priority: bool) -> float:
        """0 when a request may start now; else how long to wait at most before re-checking
        (math.inf: only a release or a priority pass can change the answer)."""
        now = self._clock.monotonic()
        delay = self.headers.delay(now, self._in_flight)
        if delay > 0:
            return delay
        if self._fleet is None:
            delay = self.share.delay(now, self._in_flight, self.headers)
        elif (cap := self._fleet.fallback_share) is not None:
            delay = self.share.delay(now, self._in_flight, self.headers, cap)
        if delay > 0:
            return delay
        if not priority and self._priority_waiting:
            return math.inf
        return 0.0

    async def _wait(self, delay: float) -> None:
        """Until a release / hold / priority pass wakes us, or `delay` passes on the clock."""
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(woken)
        sleeper = None
        try:
            if math.isinf(delay):
                await woken
            else:
                sleeper = asyncio.ensure_future(self._clock.sleep(delay))
                await asyncio.wait((woken, sleeper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if sleeper is not None:
                sleeper.cancel()
            if not woken.done():
                woken.cancel()
                self._waiters.remove(woken)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
