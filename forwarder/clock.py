"""Time, injected. service.py builds one Clock and hands it to every stage that waits
or measures, so that no other module reads the system clock and tests never sleep.

Monotonic time is for durations, deadlines and ages; wall time only for values that
cross the process boundary (created_at stamps, X-RateLimit-Reset, dead-letter times).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock: time.monotonic, time.time and asyncio.sleep."""

    __slots__ = ()

    # The C functions themselves, not methods wrapping them: the intake reads the clock
    # for every event, and a Python-level call per read is measurable there.
    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that only moves when a test calls advance(); sleep() waits for that.

    wall() keeps a fixed offset from monotonic(), as the real clocks do between steps.
    """

    def __init__(self, start_monotonic: float = 1000.0, start_wall: float = 1_700_000_000.0):
        self._now = start_monotonic
        self._wall_offset = start_wall - start_monotonic
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._sleepers_changed: asyncio.Event | None = None

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        self._notify()
        await fut

    @property
    def sleepers(self) -> int:
        """How many sleeps are pending (cancelled ones excluded)."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def next_deadline(self) -> float | None:
        live = [d for d, _, f in self._sleepers if not f.done()]
        return min(live) if live else None

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has passed."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    async def advance_and_settle(self, seconds: float, steps: int = 20) -> None:
        """advance(), then let woken tasks run a few loop turns."""
        self.advance(seconds)
        for _ in range(steps):
            await asyncio.sleep(0)

    async def wait_for_sleepers(self, n: int = 1, timeout: float = 5.0) -> None:
        """Wait (for real, briefly) until at least n sleeps are pending."""

        async def _wait() -> None:
            while self.sleepers < n:
                if self._sleepers_changed is None:
                    self._sleepers_changed = asyncio.Event()
                self._sleepers_changed.clear()
                await self._sleepers_changed.wait()

        await asyncio.wait_for(_wait(), timeout)

    def _notify(self) -> None:
        if self._sleepers_changed is not None:
            self._sleepers_changed.set()
