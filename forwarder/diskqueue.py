"""The durable queue (issue 13): EventQueue's interface over a DiskLog, in bounded memory.

Guarantees:
- Once commit() returns, every event offered before it is in the log (durable as the
  log's disk_sync says) and stays there until settle(event) says it reached its final
  place (delivered or dead-lettered). An event a worker holds, or that waits for its
  retry, is still in the log, so a kill -9 at any moment sends it again at the next
  start (Intercom drops a resent event by its key).
- Resident memory does not grow with the backlog: the queue holds a window of at most
  window_events ready events (plus those requeued by workers) and the writes not yet
  committed (at most max_pending_events); take() refills the window from the log in
  chunks, ahead of the workers. Retries wait in the log, not in memory.
- offer() stays synchronous and O(1): it stages the event for the next group commit
  and returns. Only one write is in flight at a time: whatever is staged while it runs
  goes into the next one, so concurrent requests share a commit (group commit) and the
  cost of durability is latency, not throughput.
- An event becomes takeable only once committed, so a worker never sends an event
  whose commit then failed (the client got 503 for it and still owns it).

Take order: never-retried events by log id (their insertion order), and retries due
by (due_at, id); when both wait, a refill takes half of each, so a large backlog does
not starve retries and retries do not starve the backlog. Retry times are wall clock
(clock.wall()) so that a restart keeps them; the monotonic clock is used inside the
process (event.due, next_due, the take() timer).

Waiting is EventQueue's scheme (parking.py): a take() that finds nothing parks on a
future of its own; while retries wait in the log, one parked take() (the timekeeper)
also sleeps on the injected clock until the earliest is due. A refill is one request to
the log's writer thread whose callback fills the window, so no task is created per
refill.

max_bytes bounds the log's live pages plus its uncheckpointed WAL, as measured after
every commit, plus an estimate for the events staged since; a commit may pass it by its
estimate's error (a few rows). The files can hold up to checkpoint_bytes more (a WAL
whose frames are spent) and pages freed since the last idle vacuum.

Writes that fail (a full or failing disk): the offers in them are dropped (their
commit() raises QueueUnavailable and the intake answers 503); settles, retry times and
forgotten keys stay staged and go with the next commit. unavailable_reason holds the
last failure until a commit succeeds again (for /readyz).

Longer than the style's ~400 lines: the window, the two cursors and the counts change
together on every path (commit, refill, retry, take), and split across modules that
state would need an interface of its own.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

from forwarder.clock import Clock
from forwarder.disklog import CommitStats, DiskLog
from forwarder.disksalvage import Damage
from forwarder.disksql import ReadResult, Row, WriteBatch
from forwarder.event import Event, Route
from forwarder.parking import Parking

_ROUTE = {route.value: route for route in Route}
# What an event adds to the file beyond its body and key: its row's header and fields,
# its index entry, page slack (421 bytes a 350-byte event, 55 beyond body and key,
# bench/disk_bytes.py; its key's row in dedup_keys comes when it is delivered). Rounded
# up: only the staged events are estimated; the log measures the file after every commit.
ROW_OVERHEAD_BYTES = 64
READ_RETRY_S = 1.0  # after a failed refill


# QueueUnavailable's reason when commit() comes after stop(): the forwarder is stopping,
# not failing (the intake counts it as shutting_down, not queue_full).
STOPPED = "stopped"


class QueueUnavailable(Exception):
    """commit() could not make the offers durable; `reason` is short and stable
    (SQLITE_FULL, SQLITE_IOERR, STOPPED...). The intake answers 503 with it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Batch:
    """Writes staged together, and the commit() calls waiting for them."""

    __slots__ = ("events", "bytes", "retries", "min_due", "deletes", "forget", "waiters",
                 "error")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.bytes = 0
        self.retries: list[tuple[int, float, int]] = []  # (attempts, due_at, id)
        self.min_due = math.inf
        self.deletes: list[int] = []
        self.forget: list[int] = []  # ids whose dedup key goes
        # One future per waiting commit() (not a shared future behind asyncio.shield,
        # which costs each caller an extra future and two callbacks: ~8 us a request).
        self.waiters: list[asyncio.Future[None]] = []
        self.error: str | None = None


class DiskQueue:
    """Every accepted event stays in the log until settled; memory holds a bounded window."""

    durable = True  # the intake awaits commit() before answering

    def __init__(self, path: Path, clock: Clock, *, disk_sync: str = "normal",
                 max_bytes: int = 1 << 30, window_events: int = 2048,
                 max_pending_events: int = 20_000, key_window_s: float | None = None,
                 checkpoint_bytes: int = 4 << 20, idle_s: float = 1.0,
                 busy_timeout_s: float = 10.0,
                 on_commit: Callable[[CommitStats], None] | None = None):
        if window_events < 2 or max_pending_events < 1:
            raise ValueError("window_events must be >= 2 and max_pending_events >= 1")
        self.log = DiskLog(path, clock, disk_sync=disk_sync, checkpoint_bytes=checkpoint_bytes,
                           idle_s=idle_s, key_window_s=key_window_s,
                           busy_timeout_s=busy_timeout_s, on_commit=on_commit)
        self._clock = clock
        self._max_bytes = max_bytes
        self._window = window_events
        self._low_water = window_events // 2
        self._max_pending = max_pending_events
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False  # between start() and stop()
        self._closed = False
        self._ready: deque[Event] = deque()
        self._open: _Batch | None = None  # staging
        self._inflight: _Batch | None = None  # handed to the log
        self._submit_scheduled = False
        self._pending_events = 0  # offered, not yet committed
        self._pending_bytes = 0
        self._next_id = 1
        # Never-retried rows: those with id <= _fresh_cursor are (or were) in memory;
        # _fresh_unloaded of them, up to _fresh_hi, are in the log only.
        self._fresh_cursor = 0
        self._fresh_hi = 0
        self._fresh_unloaded = 0
        # Retry rows after the (due_at, id) cursor are in the log only; the earliest
        # committed one is due at _next_due_wall (None: none known).
        self._retry_cursor: tuple[float, int] = (0.0, 0)
        self._retry_unloaded = 0
        self._next_due_wall: float | None = None
        self._reading: asyncio.Future[ReadResult] | None = None
        self._read_state = (0, 0, 0)  # fresh unloaded, upto and limit when the read left
        self._read_retry_at = -math.inf
        self._parking = Parking(clock, self._kick)
        self.unavailable_reason: str | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the log and count what it holds (counts only: a 1e6-event backlog is not
        read into memory)."""
        state = await self.log.start()
        self._loop = asyncio.get_running_loop()
        self._next_id = state.max_id + 1
        self._fresh_hi = state.max_id
        self._fresh_unloaded = state.fresh
        self._retry_unloaded = state.retries
        self._next_due_wall = state.next_due
        self._running = True

    async def stop(self) -> None:
        """Refuse offers, commit what is staged (settles, retry times), close the log.
        Idempotent. A write that fails here is logged by the log; its settles are lost,
        so those events are sent again after the restart (Intercom drops them by key)."""
        self._closed = True
        if self._running:
            while self._open is not None or self._inflight is not None:
                if self._inflight is None:
                    self._submit()
                batch = self._inflight
                assert batch is not None
                await self._wait(batch)
                if batch.error is not None:
                    break
            self._running = False
        await self.log.close()

    def close(self) -> None:
        """Refuse every later offer(); retries, requeues, settles and take() still work."""
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    # -- EventQueue's interface -----------------------------------------------------------

    def __len__(self) -> int:
        return self.ready + self.waiting

    @property
    def ready(self) -> int:
        """Events a worker may take now or soon: staged, in memory, never retried in the log."""
        return self._pending_events + len(self._ready) + self._fresh_unloaded

    @property
    def waiting(self) -> int:
        """Events waiting in the log for their retry time (due ones until a take loads them)."""
        return self._retry_unloaded

    @property
    def next_due(self) -> float | None:
        """Monotonic time the earliest waiting retry is due; None when none waits."""
        if not self._retry_unloaded:
            return None
        due = min([self._next_due_wall or math.inf,
                   *(b.min_due for b in (self._open, self._inflight) if b is not None)])
        if due == math.inf:
            return None
        return self._clock.monotonic() + (due - self._clock.wall())

    def offer(self, event: Event) -> bool:
        """Stage a newly accepted event for the next commit; False (nothing staged) when
        closed, stopped, past max_bytes or past max_pending_events. Await commit() before
        answering the client."""
        size = len(event.body) + len(event.key) + ROW_OVERHEAD_BYTES
        if (self._closed or not self._running or self._pending_events >= self._max_pending
                or self.log.used_bytes + self._pending_bytes + size > self._max_bytes):
            return False
        self._stage_insert(event, size)
        return True

    def restore(self, events: Iterable[Event]) -> None:
        """Stage events reloaded from a memory-mode spool; bounds do not apply. Await
        commit() before removing the spool: if it raises, keep the spool."""
        for event in events:
            event.due = 0.0
            self._stage_insert(event, len(event.body) + len(event.key) + ROW_OVERHEAD_BYTES)

    def retry_later(self, event: Event, delay_s: float) -> None:
        """Hold a taken event in the log until delay_s from now (its attempts and wall-clock
        retry time are written with the next commit); always succeeds."""
        if not event.log_id:
            raise ValueError("retry_later() takes an event from this queue's take()")
        delay_s = max(0.0, delay_s)
        due = self._clock.wall() + delay_s
        if (due, event.log_id) <= self._retry_cursor:
            # The wall clock stepped back: stay after the cursor, or no refill finds it.
            due = math.nextafter(self._retry_cursor[0], math.inf)
        event.due = self._clock.monotonic() + delay_s
        batch = self._stage()
        batch.retries.append((event.attempts, due, event.log_id))
        batch.min_due = min(batch.min_due, due)
        self._retry_unloaded += 1
        self._schedule_submit(urgent=False)

    def requeue_front(self, event: Event) -> None:
        """Put a taken event back at the head (a 429, an auth pause); its row is unchanged."""
        if not event.log_id:
            raise ValueError("requeue_front() takes an event from this queue's take()")
        self._ready.appendleft(event)
        if self._parking:
            self._parking.wake_one()

    async def take(self) -> Event:
        """The next ready event, refilling from the log and waiting (on the clock for
        retries) until there is one. The event stays in the log until settle()."""
        while True:
            if len(self._ready) < self._low_water:
                self._refill()
            if self._ready:
                event = self._ready.popleft()
                if self._parking:
                    self._kick()  # pass the baton: more ready, or the timer to hold
                return event
            await self._parking.park(self._wake_deadline() if self._reading is None else None)

    def take_all(self) -> list[Event]:
        """[]: in disk mode every accepted event is already in the log and is taken from
        there at the next start, so the stop path writes no spool. Staged writes are
        handed to the log now; stop() waits until they are committed."""
        if self._running and self._inflight is None and self._open is not None:
            self._submit()
        return []

    # -- disk mode's additions ----------------------------------------------------------------

    async def commit(self) -> None:
        """Wait until every write staged before the call (offers above all) is committed.
        Raises QueueUnavailable if one of those writes failed: the events offered in it
        are not queued, and the intake answers 503. Call it in the same step as the
        offers it covers (no await in between), as the intake does."""
        if not self._running:
            raise QueueUnavailable(STOPPED)
        batches = [b for b in (self._inflight, self._open) if b is not None]
        if not batches:
            return
        if self._inflight is None:
            self._submit()
        await self._wait(batches[-1])  # batches commit in order: the last one ends last
        for batch in batches:
            if batch.error is not None:
                raise QueueUnavailable(batch.error)

    def settle(self, event: Event) -> None:
        """The event reached its final place (delivered or dead-lettered): delete it from
        the log with the next commit. Its dedup key stays for the window (a delivered
        event's retry by the client is a duplicate); forget_key() drops it. An event in
        no log (log_id 0) has nothing to delete."""
        if event.log_id:
            self._stage().deletes.append(event.log_id)
            self._schedule_submit(urgent=False)

    def forget_key(self, event: Event) -> None:
        """Drop the event's dedup key from the log with the next commit: a dead-lettered
        event must not be taken for a duplicate when it is replayed after a restart."""
        if event.log_id and event.key:
            self._stage().forget.append(event.log_id)
            self._schedule_submit(urgent=False)

    def load_keys(self, since_wall: float, chunk: int = 10_000
                  ) -> AsyncIterator[list[tuple[bytes, float]]]:
        """The dedup keys added since since_wall (wall clock), as (key, added_at) chunks."""
        return self.log.load_keys(since_wall, chunk)

    @property
    def resident(self) -> int:
        """Events held in memory: the window, requeued ones and staged offers."""
        return len(self._ready) + self._pending_events

    @property
    def events_on_disk(self) -> int:
        return self.log.rows

    @property
    def bytes_on_disk(self) -> int:
        return self.log.file_bytes

    @property
    def damage(self) -> Damage | None:
        """What start() found wrong with the file (moved aside, salvaged), if anything."""
        return self.log.damage

    # -- writes -----------------------------------------------------------------------------

    def _stage(self) -> _Batch:
        batch = self._open
        if batch is None:
            assert self._loop is not None, "DiskQueue.start() was not called"
            batch = self._open = _Batch()
        return batch

    async def _wait(self, batch: _Batch) -> None:
        assert self._loop is not None
        waiter = self._loop.create_future()
        batch.waiters.append(waiter)
        await waiter

    def _stage_insert(self, event: Event, size: int) -> None:
        event.log_id = self._next_id
        self._next_id += 1
        batch = self._stage()
        batch.events.append(event)
        batch.bytes += size
        self._pending_events += 1
        self._pending_bytes += size
        self._schedule_submit(urgent=True)

    def _schedule_submit(self, urgent: bool) -> None:
        # call_soon, not now: a batch request offers its events in one step, and they
        # belong in one commit. After a failed write only offers retry at once, so a
        # failing disk is not hammered by settles.
        if self._inflight is None and not self._submit_scheduled and (
                urgent or self.unavailable_reason is None):
            assert self._loop is not None
            self._submit_scheduled = True
            self._loop.call_soon(self._submit)

    def _submit(self) -> None:
        self._submit_scheduled = False
        batch = self._open
        if self._inflight is not None or batch is None:
            return
        self._open = None
        self._inflight = batch
        write = WriteBatch(events=batch.events, retries=batch.retries,
                           deletes=batch.deletes, forget_keys=batch.forget)
        self.log.write(write).add_done_callback(self._written)

    def _written(self, future: asyncio.Future[CommitStats]) -> None:
        batch = self._inflight
        assert batch is not None
        self._inflight = None
        self._pending_events -= len(batch.events)
        self._pending_bytes -= batch.bytes
        error = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if error is None:
            self.unavailable_reason = None
            self._committed(batch)
        else:
            batch.error = self.unavailable_reason = getattr(error, "reason", repr(error))
            for event in batch.events:
                event.log_id = 0
            if batch.retries or batch.deletes or batch.forget:
                again = self._stage()
                again.retries[:0] = batch.retries
                again.min_due = min(again.min_due, batch.min_due)
                again.deletes[:0] = batch.deletes
                again.forget[:0] = batch.forget
        for waiter in batch.waiters:
            if not waiter.done():  # a cancelled commit() leaves its future cancelled
                waiter.set_result(None)
        if self._open is not None:
            self._schedule_submit(urgent=bool(self._open.events))

    def _committed(self, batch: _Batch) -> None:
        events = batch.events
        if events:
            self._fresh_hi = events[-1].log_id
            if self._fresh_unloaded:  # older rows wait in the log: these go after them
                self._fresh_unloaded += len(events)
            else:  # nothing waits in the log: straight into the window, no read
                placed = events[:max(0, self._window - len(self._ready))]
                self._ready.extend(placed)
                if placed:
                    self._fresh_cursor = placed[-1].log_id
                self._fresh_unloaded = len(events) - len(placed)
        if batch.retries and (self._next_due_wall is None or batch.min_due < self._next_due_wall):
            self._next_due_wall = batch.min_due
            self._rearm_timer()
        self._kick()

    # -- reads ------------------------------------------------------------------------------

    def _refill(self) -> None:
        """Ask the log for the next chunk when the window runs low; one read at a time."""
        if self._reading is not None or not self._running:
            return
        due = self._next_due_wall
        retries = bool(self._retry_unloaded) and due is not None and due <= self._clock.wall()
        fresh = self._fresh_unloaded > 0
        if not (retries or fresh) or self._clock.monotonic() < self._read_retry_at:
            return
        room = self._window - len(self._ready)
        due_limit = (max(1, room // 2) if fresh else room) if retries else 0
        fresh_limit = room - due_limit if fresh else 0
        self._read_state = (self._fresh_unloaded, self._fresh_hi, fresh_limit)
        self._reading = self.log.read(
            fresh_after=self._fresh_cursor, fresh_upto=self._fresh_hi, fresh_limit=fresh_limit,
            due_after=self._retry_cursor, now_wall=self._clock.wall(), due_limit=due_limit)
        self._reading.add_done_callback(self._refilled)

    def _refilled(self, future: asyncio.Future[ReadResult]) -> None:
        self._reading = None
        if future.cancelled() or future.exception() is not None:
            # The log has logged it; try again in a while (the timekeeper wakes for it).
            self._read_retry_at = self._clock.monotonic() + READ_RETRY_S
            self._kick()
            return
        result = future.result()
        unloaded_then, upto, fresh_limit = self._read_state
        mono, wall = self._clock.monotonic(), self._clock.wall()
        self._ready.extend(_event(row, mono, wall) for row in result.fresh)
        if len(result.fresh) < fresh_limit:  # everything up to `upto` is loaded now
            self._fresh_cursor = upto
            self._fresh_unloaded -= unloaded_then  # leaves what was committed meanwhile
        elif result.fresh:
            self._fresh_cursor = result.fresh[-1][0]
            self._fresh_unloaded -= len(result.fresh)
        self._ready.extend(_event(row, mono, wall) for row in result.due)
        if result.due:
            last = result.due[-1]
            self._retry_cursor = (last[6], last[0])
            self._retry_unloaded = max(0, self._retry_unloaded - len(result.due))
        self._next_due_wall = result.next_due
        self._kick()

    # -- waiting ----------------------------------------------------------------------------

    def _wake_deadline(self) -> float | None:
        """Monotonic time at which the passing of time alone may make an event takeable."""
        deadline = math.inf
        if self._retry_unloaded and self._next_due_wall is not None:
            deadline = self._clock.monotonic() + (self._next_due_wall - self._clock.wall())
        if self._read_retry_at > self._clock.monotonic():
            deadline = min(deadline, self._read_retry_at)
        return None if deadline == math.inf else deadline

    def _rearm_timer(self) -> None:
        self._parking.rearm(self._wake_deadline())

    def _kick(self) -> None:
        """Wake a parked take() if there is something nobody has been woken for."""
        parking = self._parking
        if parking and (self._ready or (not parking.has_timekeeper and self._reading is None
                                        and self._wake_deadline() is not None)):
            parking.wake_one()


def _event(row: Row, mono: float, wall: float) -> Event:
    log_id, route, key, body, attempts, first_received_at, due_at = row
    return Event(body=body, key=key, route=_ROUTE[route], attempts=attempts,
                 first_received_at=first_received_at,
                 due=mono + (due_at - wall) if due_at else 0.0, log_id=log_id)
