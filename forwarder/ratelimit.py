"""The rate gate every send passes: a local budget (aiolimiter's leaky bucket) plus pacing
learnt from Intercom's X-RateLimit-* headers and 429s, so workers spend the real budget
without tripping it. Intercom's rate-limiting page: windows of 10 s, every authenticated
answer carries X-RateLimit-Limit, -Remaining and -Reset (Unix time), 429 when exceeded.

How the header budget is kept (all times monotonic, from the injected Clock):
- Reset is converted once per answer: window_ends = now + (reset_at - wall()), capped at
  per_seconds ahead (no window is longer; more means our wall clock is behind Intercom's).
- A later reset_at starts a new window and replaces what we knew; the same reset_at keeps
  the lowest Remaining (answers arrive out of order); an earlier one is stale and ignored.
- A request may start only while remaining - in_flight > 0, counting EVERY request in
  flight, not only those started after the answer. A request still in flight may already
  be counted in Remaining (then we under-use until its answer comes back) or not (then
  skipping it would overshoot): counting them all never overshoots, and once the answers
  are in, remaining is exact again, so the whole window is still used.
- An answer with no usable headers (network error, a proxy's 502) may still have been
  counted by Intercom, so it takes one off what we know.
- Once window_ends passes, the next window is assumed to hold Limit (the last
  X-RateLimit-Limit seen; unknown if never seen) until an answer says otherwise; an
  assumed window lasts per_seconds, so a budget used up by errors alone still refills.
- An assumed window is confirmed by one request before the burst: while it is assumed and
  anything is in flight, nobody else starts (priority acquires neither). If Intercom's
  clock is behind ours, a burst at our rollover would all be 429s; this way one is. The
  wait ends with an answer carrying a later Reset (the new window, learnt as above), or a
  non-429 answer without usable headers (nothing will confirm it: a proxy dropped them).
  Answers with the old Reset (requests sent before the rollover) or network errors keep
  it one at a time. (This deviates from "every waiter goes at the reset": it costs one
  round trip per window, against up to 32 429s and a held window under clock skew.)
- Remaining 0 holds everyone until window_ends. A 429 holds until its Reset when that is
  still ahead, else for Retry-After. Otherwise, a 429 arriving while a hold is on answers
  a request sent before the hold began, so it neither extends nor doubles it (a burst of
  32 such 429s holds for one backoff, not 32 doublings). A 429 whose Reset is the window
  we have just rolled past means Intercom's clock is behind ours and has not reset yet:
  hold 50 ms, doubling up to per_seconds, then confirm again with one request. Any other
  429 (e.g. a Reset already past when first seen: our wall clock ahead of Intercom's)
  holds for a backoff of 1 s doubling up to per_seconds, instead of a tight loop of 429s.
  Both backoffs are reset by the next non-429 answer.
- Priority acquires (a person waiting on GET /events) pass the header gate ahead of
  waiting normal ones; both wait in the local limiter in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from aiolimiter import AsyncLimiter

if TYPE_CHECKING:
    from forwarder.clock import Clock
    from forwarder.upstream import RateHeaders

TOO_MANY_REQUESTS = 429
FIRST_BACKOFF_S = 1.0
BEHIND_BACKOFF_S = 0.05  # first hold when Intercom's clock is behind ours (see _on_429)


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


class RateGate:
    """Lets a request start only within the local budget and Intercom's known budget;
    every acquire() must be paired with exactly one release()."""

    def __init__(
        self,
        requests: int,
        per_seconds: float,
        clock: Clock,
        *,
        limiter: LocalLimiter | None = None,
    ):
        self._clock = clock
        self._per_seconds = per_seconds
        self._limiter: LocalLimiter = (
            limiter if limiter is not None
            else TickedLimiter(AsyncLimiter(requests, per_seconds))
        )
        self._in_flight = 0
        self._limit: int | None = None  # last X-RateLimit-Limit seen
        self._remaining: int | None = None  # None: Intercom's budget is unknown
        self._window_ends: float | None = None  # monotonic; set whenever _remaining is
        self._window_reset_at: float | None = None  # newest X-RateLimit-Reset seen (epoch)
        self._window_assumed = False  # True after a rollover until an answer confirms it
        self._hold_until = -math.inf
        self._backoff_s = min(FIRST_BACKOFF_S, per_seconds)
        # After a rollover: one request at a time until an answer confirms the new window.
        self._confirming = False
        self._passed_reset_at: float | None = None  # Reset of the live window rolled past
        self._behind_backoff_s = min(BEHIND_BACKOFF_S, per_seconds)
        self._waiters: list[asyncio.Future[None]] = []
        self._priority_waiting = 0

    def __repr__(self) -> str:
        return (
            f"RateGate(in_flight={self._in_flight}, remaining={self._remaining}, "
            f"limit={self._limit}, held_until={self.held_until})"
        )

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def held_until(self) -> float | None:
        """Monotonic time until which nobody may start, or None when not held."""
        now = self._clock.monotonic()
        self._roll(now)
        until = self._hold_until
        if self._remaining is not None and self._remaining <= 0 and self._window_ends is not None:
            until = max(until, self._window_ends)
        return until if until > now else None

    async def acquire(self, *, priority: bool = False) -> float:
        """Wait for budget, count the request in flight; returns the seconds waited.

        Cancellation-safe: a cancelled acquire leaves in_flight unchanged (the local
        limiter's slot, if already taken, is spent).
        """
        started = self._clock.monotonic()
        await self._limiter.acquire()
        if priority:
            self._priority_waiting += 1
        try:
            while (delay := self._delay(priority)) > 0:
                await self._wait(delay)
        finally:
            if priority:
                self._priority_waiting -= 1
                self._wake()  # normal waiters held back behind this one re-check
        self._in_flight += 1
        return self._clock.monotonic() - started

    def release(
        self, status: int | None, rate: RateHeaders | None, retry_after_s: float | None = None
    ) -> None:
        """After the answer (status None for a network error): in_flight -= 1, then learn."""
        self._in_flight = max(0, self._in_flight - 1)
        now = self._clock.monotonic()
        self._roll(now)
        if rate is not None and rate.limit:
            self._limit = rate.limit
        if rate is not None and rate.remaining is not None and rate.reset_at is not None:
            self._learn(rate.remaining, rate.reset_at, now)
        else:
            if self._remaining is not None:
                self._remaining = max(0, self._remaining - 1)
            if status is not None and status != TOO_MANY_REQUESTS:
                # Intercom answered but the headers did not come through (a proxy): no answer
                # will confirm this window, so stop sending one at a time.
                self._confirming = False
        if status == TOO_MANY_REQUESTS:
            self._on_429(rate, retry_after_s, now)
        elif status is not None:
            self._backoff_s = min(FIRST_BACKOFF_S, self._per_seconds)
            self._behind_backoff_s = min(BEHIND_BACKOFF_S, self._per_seconds)
        self._wake()

    def hold_for(self, seconds: float) -> None:
        """Hold every worker (priority ones too) for `seconds` from now."""
        self._hold_until = max(self._hold_until, self._clock.monotonic() + seconds)
        self._wake()

    # internals -------------------------------------------------------------------------

    def _reset_in(self, reset_at: float) -> float:
        """Seconds from now to X-RateLimit-Reset; no window is longer than per_seconds, so a
        reset farther ahead means our wall clock is behind Intercom's: cap it."""
        return min(reset_at - self._clock.wall(), self._per_seconds)

    def _learn(self, remaining: int, reset_at: float, now: float) -> None:
        if self._window_reset_at is None or reset_at > self._window_reset_at:
            self._window_reset_at = reset_at
            self._remaining = remaining
            self._window_ends = now + self._reset_in(reset_at)
            self._window_assumed = False
            self._confirming = False
            self._roll(now)  # a reset already past (clock skew) is no knowledge at all
            self._passed_reset_at = None  # never live here, so no evidence of Intercom's clock
        elif reset_at == self._window_reset_at and not self._window_assumed:
            current = self._remaining if self._remaining is not None else remaining
            self._remaining = min(current, remaining)

    def _on_429(self, rate: RateHeaders | None, retry_after_s: float | None, now: float) -> None:
        reset_in = None if rate is None or rate.reset_at is None else self._reset_in(rate.reset_at)
        if reset_in is not None and reset_in > 0:
            until = now + reset_in
        elif retry_after_s is not None and retry_after_s > 0:
            until = now + retry_after_s
        elif now < self._hold_until:
            # Nobody starts while held, so this answers a request sent before the hold began
            # (one of a burst): the hold already covers it, and doubling once per answer
            # would turn a burst of 32 into a hold of a whole window.
            return
        elif rate is not None and rate.reset_at is not None and (
            rate.reset_at == self._passed_reset_at
        ):
            # Intercom still counts the window we have just rolled past: its clock is behind
            # ours, by a little as a rule, so hold briefly and try again with one request.
            until = now + self._behind_backoff_s
            self._behind_backoff_s = min(self._behind_backoff_s * 2, self._per_seconds)
        else:
            until = now + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, self._per_seconds)
        self._hold_until = max(self._hold_until, until)

    def _roll(self, now: float) -> None:
        """Past the end of the known window, assume a fresh one holding Limit."""
        if self._window_ends is None or now < self._window_ends:
            return
        self._window_assumed = True
        self._confirming = True
        self._passed_reset_at = self._window_reset_at
        self._remaining = self._limit
        if self._limit is None:
            self._window_ends = None
        else:  # Intercom's windows are fixed; keep the assumed ones on the same grid
            periods = math.floor((now - self._window_ends) / self._per_seconds) + 1
            self._window_ends += periods * self._per_seconds

    def _delay(self, priority: bool) -> float:
        """0 when a request may start now; else how long to wait at most before re-checking
        (math.inf: only a release or a priority pass can change the answer)."""
        now = self._clock.monotonic()
        self._roll(now)
        if now < self._hold_until:
            return self._hold_until - now
        if self._confirming and self._in_flight > 0:
            return math.inf  # the answer in flight confirms the window (or not): wait for it
        if self._remaining is not None and self._remaining - self._in_flight <= 0:
            assert self._window_ends is not None
            return self._window_ends - now
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
