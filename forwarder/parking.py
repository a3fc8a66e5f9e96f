"""Parked take() calls of a queue, and the one of them that watches the clock.

The waiting scheme both queues share (EventQueue in memory, DiskQueue on disk): a take()
that finds nothing parks on a future of its own, so 32 idle workers are 32 futures and
no tasks. When the queue knows a time at which something becomes takeable (a retry
due), exactly one parked take() is the timekeeper: it also sleeps on the injected clock
until then, in a sleep it owns and cancels itself, so there is never more than one timer
and none outlives its take().

The queue decides what is takeable; Parking only parks and wakes. A take() cancelled
after being woken calls the queue's kick, so that the wake-up (or the timer it held) is
passed on instead of dying with it.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable

from forwarder.clock import Clock


class Parking:
    """Parked take() futures; at most one of them also sleeps until a deadline."""

    def __init__(self, clock: Clock, kick: Callable[[], None]):
        self._clock = clock
        self._kick = kick  # the queue's "wake someone if there is work nobody was woken for"
        # The parked futures, oldest first. Public so that a queue's hot path can test it
        # for emptiness as a plain deque (no Python call, ~30 ns an offer); only Parking
        # changes it.
        self.parked: deque[asyncio.Future[None]] = deque()
        self._keeper: asyncio.Future[None] | None = None
        self._keeper_due = math.inf

    def __bool__(self) -> bool:
        """True while a take() is parked."""
        return bool(self.parked)

    @property
    def has_timekeeper(self) -> bool:
        return self._keeper is not None

    async def park(self, deadline: float | None) -> None:
        """Wait until woken; if deadline (monotonic) is given and no take() watches the
        clock yet, also until then."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.parked.append(fut)
        timer: asyncio.Future[None] | None = None
        try:
            if deadline is not None and self._keeper is None:
                self._keeper, self._keeper_due = fut, deadline
                timer = asyncio.ensure_future(
                    self._clock.sleep(deadline - self._clock.monotonic()))
                await asyncio.wait((fut, timer), return_when=asyncio.FIRST_COMPLETED)
                if timer.done():
                    timer.result()  # surface a failing clock instead of spinning
            else:
                await fut
        except BaseException:
            self._unpark(fut, timer)
            self._kick()  # a wake-up, or the timer we held, must not die with us
            raise
        self._unpark(fut, timer)

    def rearm(self, deadline: float | None) -> None:
        """Something is due sooner than the timekeeper sleeps: wake it to sleep anew."""
        keeper = self._keeper
        if keeper is not None and deadline is not None and deadline < self._keeper_due \
                and not keeper.done():
            self.parked.remove(keeper)
            keeper.set_result(None)

    def wake_one(self) -> None:
        """Wake one parked take(), the timekeeper last (it is watching the clock)."""
        getters = self.parked
        for fut in getters:
            if fut is not self._keeper and not fut.done():
                break
        else:
            fut = self._keeper
            if fut is None or fut.done() or fut not in getters:
                return
        getters.remove(fut)
        fut.set_result(None)

    def _unpark(self, fut: asyncio.Future[None], timer: asyncio.Future[None] | None) -> None:
        if timer is not None and not timer.done():
            timer.cancel()
        if self._keeper is fut:
            self._keeper, self._keeper_due = None, math.inf
        if not fut.done():
            fut.cancel()
        if fut in self.parked:
            self.parked.remove(fut)
