"""One dedup window for the fleet: a key accepted by any daemon of the app is a duplicate
at every other, through Redis, with this daemon's DedupWindow (forwarder/dedup.py) in
front of it and standing in for it while Redis is unavailable.

add_if_absent_many(keys) is the intake's call, one per request (a single event or a
batch): the local window answers first (a key this daemon has seen costs nothing), then
one pipelined round trip sends SET key 1 NX EX window_seconds for every key left, which
Redis answers atomically per key: set (new to the fleet) or not (another daemon had it,
counted in fleet_duplicates_total). Keys forgotten since the last round trip go first in
the same pipeline as DELs, so a forgotten key that comes straight back is new again.

forget(key) is synchronous like DedupWindow's (the intake calls it when the queue refuses
an event, the workers when one is dead-lettered): it forgets locally at once and queues a
fleet-wide DEL, sent with the next batch or by the flush task (start()/stop()), so a
replay sent to any daemon goes through.

Keys are "{namespace}:d:" + the 16-byte digest (binary-safe); every one expires after
window_seconds, so Redis holds at most a window of keys (sizing in docs/fleet.md).

Redis down or slower than the bound (fleet_redis.py): the local window's answer stands
(fail open). What is lost meanwhile is cross-sidecar dedup: an event sent to two daemons
may reach Intercom twice, where Intercom drops it again by its own composite key at the
cost of one request of the budget. Keys accepted meanwhile are not written to Redis later.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .fleet_redis import RETRY_S, UNAVAILABLE, FleetRedis

if TYPE_CHECKING:
    from forwarder.clock import Clock
    from forwarder.dedup import DedupWindow

    from .fleet_metrics import FleetMetrics

MAX_PENDING_FORGETS = 100_000  # beyond this (Redis down for long) the oldest wait for expiry


class FleetDedup:
    """The fleet's dedup window in front of this daemon's; never raises for Redis trouble."""

    def __init__(self, redis: FleetRedis, local: DedupWindow, *, window_seconds: float,
                 clock: Clock, metrics: FleetMetrics):
        self._redis = redis
        self._local = local
        self._prefix = redis.key("d").encode() + b":"
        self._ttl_s = max(1, math.ceil(window_seconds))
        self._clock = clock
        self._metrics = metrics
        # keys to DEL fleet-wide, in order, each with the sequence number of its forget()
        self._forgotten: dict[bytes, int] = {}
        self._seq = itertools.count()
        self._flush_wanted = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"FleetDedup(local={len(self._local)}, pending_forgets={len(self._forgotten)})"

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop(), name="fleet-dedup-flush")

    async def stop(self) -> None:
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        await self.flush()  # last chance for forgets queued just before the stop

    # -- the intake's calls --------------------------------------------------------------

    async def add_if_absent_many(self, keys: Sequence[bytes]) -> list[bool]:
        """For each key, True if it is new to the fleet (now remembered everywhere), False
        for a duplicate (also within this batch). One round trip at most."""
        local = self._local
        fresh = [local.add_if_absent(k) for k in keys]
        ask = [k for k, new in zip(keys, fresh) if new]
        if not ask and not self._forgotten:
            return fresh
        answers = await self._send(ask)
        if answers is None:
            return fresh  # Redis unavailable: this daemon's window decides alone
        it = iter(answers)
        out = []
        for new in fresh:
            if new and not next(it):  # another daemon accepted it first
                self._metrics.duplicates.inc()
                new = False
            out.append(new)
        return out

    def forget(self, key: bytes) -> None:
        """Forget here now, and fleet-wide with the next round trip."""
        self._local.forget(key)
        if len(self._forgotten) >= MAX_PENDING_FORGETS:
            self._forgotten.pop(next(iter(self._forgotten)))
        self._forgotten.pop(key, None)  # to the end: the newest forget
        self._forgotten[key] = next(self._seq)
        self._flush_wanted.set()

    async def flush(self) -> bool:
        """Send the queued fleet-wide forgets; False if Redis was unavailable."""
        if not self._forgotten:
            return True
        return await self._send(()) is not None

    def __len__(self) -> int:
        return len(self._local)

    # -- internals -----------------------------------------------------------------------

    async def _send(self, keys: Sequence[bytes]) -> list[bool] | None:
        """One pipeline: DEL the queued forgets, then SET NX EX each key. None when Redis
        is unavailable (the forgets stay queued)."""
        forgotten = list(self._forgotten.items())
        prefix, ttl = self._prefix, self._ttl_s

        async def round_trip() -> list[object]:
            pipe = self._redis.client.pipeline(transaction=False)
            if forgotten:
                pipe.delete(*(prefix + k for k, _ in forgotten))
            for k in keys:
                pipe.set(prefix + k, b"1", nx=True, ex=ttl)
            return await pipe.execute()

        result = await self._redis.call("dedup" if keys else "forget", round_trip)
        if result is UNAVAILABLE:
            return None
        for k, seq in forgotten:  # sent; a key forgotten again meanwhile stays queued
            if self._forgotten.get(k) == seq:
                del self._forgotten[k]
        return [bool(r) for r in result[1 if forgotten else 0:]]

    async def _flush_loop(self) -> None:
        """Send forgets soon after forget() queues them (the owner cancels this in stop())."""
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted.clear()
            if not await self.flush():
                await self._clock.sleep(RETRY_S)
                self._flush_wanted.set()
