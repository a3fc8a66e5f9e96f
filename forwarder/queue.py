"""Bounded ready queue plus a delay heap for retries.

Intake offers, workers take. Accepted events are never dropped here: the bound applies
only to offer(), which intake turns into a 503; retries, requeues and the spool reload
always go in, because those events were already accepted.

Waiting is parking.py's, shared with DiskQueue: a take() that finds nothing ready parks
on a future of its own (32 idle workers are 32 futures, no tasks). When retries are
waiting in the delay heap, exactly one parked take() is the timekeeper and also sleeps
until the heap's head is due, so there is never more than one timer and never a task
per event. Something that arrives sooner (offer, requeue_front, an earlier retry_later)
wakes a parked take() at once.

Storage: a queued event is one bytes object, a packed header (first_received_at, due,
attempts, route, key length) followed by the key and the body, not an Event.
- CPython never tracks bytes in its cycle collector, so a full collection does not walk
  the queue: with ~340,000 queued Events those walks took 75-185 ms (the intake's p99)
  and ~10% of the CPU.
- One allocation per event instead of four (Event or tuple, key, float, body), and it is
  also the exact-size copy of orjson's output, whose bytes sit in a ~4 KB allocation
  (its write buffer, shrunk in place): kept as-is, a queue of 100,000 bodies held ~400 MB
  of resident memory instead of ~45 MB (bench/memory.py, its RSS line).
- An Event is rebuilt (~0.4 us, slicing out key and body) when taken.

Cancellation: an event leaves the queue only in the synchronous step that returns it, so
a cancelled take() never holds one. A take() cancelled after being woken passes the
wake-up (and the timekeeper role) on, so no event is left sitting with everyone asleep.
"""

from __future__ import annotations

import heapq
import itertools
import struct
from collections import deque
from collections.abc import Iterable

from forwarder.clock import Clock
from forwarder.event import Event, Route
from forwarder.parking import Parking

_ROUTES = tuple(Route)
_ROUTE_INDEX = {route: i for i, route in enumerate(_ROUTES)}
_EVENTS = Route.EVENTS  # index 0; compared by identity, since hashing an Enum runs Python

# Header of a packed event: first_received_at, due, attempts, route index, key length.
_HEAD = struct.Struct("<ddIBH")
# The largest attempts and key length the header holds ("I", "H"); the spool refuses
# lines beyond them rather than let restore() fail at start.
MAX_ATTEMPTS = 2**32 - 1
MAX_KEY_BYTES = 2**16 - 1
_head = _HEAD.pack
_HEAD_SIZE = _HEAD.size
_join = b"".join

Packed = bytes


def _pack(e: Event) -> Packed:
    key = e.key
    return _join((_head(e.first_received_at, e.due, e.attempts,
                        0 if e.route is _EVENTS else _ROUTE_INDEX[e.route], len(key)),
                  key, e.body))


def _unpack(p: Packed) -> Event:
    first_received_at, due, attempts, route, key_len = _HEAD.unpack_from(p)
    body_at = _HEAD_SIZE + key_len
    return Event(body=p[body_at:], key=p[_HEAD_SIZE:body_at], route=_ROUTES[route],
                 attempts=attempts, first_received_at=first_received_at, due=due)


class EventQueue:
    """Holds at most max_events; offer() never waits."""

    # The intake awaits commit() only for a durable queue (DiskQueue): memory mode's hot
    # path keeps its no-await handlers and today's speed.
    durable = False
    unavailable_reason: str | None = None

    def __init__(self, max_events: int, clock: Clock):
        if max_events <= 0:
            raise ValueError("max_events must be positive")
        self._max_events = max_events
        self._clock = clock
        self._ready: deque[Packed] = deque()
        self._delayed: list[tuple[float, int, Packed]] = []  # (due, seq, event): FIFO per due
        self._seq = itertools.count()
        self._parking = Parking(clock, self._kick)
        self._parked = self._parking.parked  # tested on every offer and take
        self._closed = False

    def __len__(self) -> int:
        return len(self._ready) + len(self._delayed)

    @property
    def ready(self) -> int:
        """Events that a worker may send now (due retries count once a take() moves them)."""
        return len(self._ready)

    @property
    def waiting(self) -> int:
        """Events in the delay heap, waiting for their retry time."""
        return len(self._delayed)

    @property
    def next_due(self) -> float | None:
        """Monotonic time the earliest waiting retry is due; None when none waits."""
        return self._delayed[0][0] if self._delayed else None

    @property
    def closed(self) -> bool:
        """True once close() ran: offer() refuses everything from then on."""
        return self._closed

    def close(self) -> None:
        """Refuse every later offer(). The stop path closes the queue before it takes
        everything for the spool, so nothing offered afterwards can miss the spool.
        Retries, requeues and take() still work: events already accepted stay in."""
        self._closed = True

    # DiskQueue's additions, as no-ops: the intake and the workers use one interface and
    # never know which queue they have (issue 13).

    async def commit(self) -> None:
        """Nothing to make durable: an offered event is in memory already."""

    def settle(self, event: Event) -> None:
        """A delivered or dead-lettered event has left the queue already."""

    def forget_key(self, event: Event) -> None:
        """Keys live in the DedupWindow only, which the service forgets itself."""

    def offer(self, event: Event) -> bool:
        """Queue a newly accepted event; False (and nothing queued) when full or closed."""
        ready = self._ready
        if len(ready) + len(self._delayed) >= self._max_events or self._closed:
            return False
        ready.append(_pack(event))
        if self._parked:
            self._parking.wake_one()
        return True

    def restore(self, events: Iterable[Event]) -> None:
        """Queue events reloaded from the spool, ready now; the bound does not apply."""
        before = len(self._ready)
        for event in events:
            event.due = 0.0
            self._ready.append(_pack(event))
        for _ in range(len(self._ready) - before):
            if not self._parked:
                break
            self._parking.wake_one()

    def retry_later(self, event: Event, delay_s: float) -> None:
        """Hold an accepted event until delay_s from now; always succeeds."""
        due = self._clock.monotonic() + max(0.0, delay_s)
        event.due = due
        heapq.heappush(self._delayed, (due, next(self._seq), _pack(event)))
        if self._parking.has_timekeeper:
            self._parking.rearm(due)  # it sleeps anew only if this one is due sooner
        elif self._parked:  # nobody is watching the clock yet
            self._parking.wake_one()

    def requeue_front(self, event: Event) -> None:
        """Put an event back at the head of the ready queue (a 429 or an auth pause)."""
        self._ready.appendleft(_pack(event))
        if self._parked:
            self._parking.wake_one()

    async def take(self) -> Event:
        """The next ready event, waiting (on the clock for retries) until there is one."""
        while True:
            if self._delayed:
                self._promote_due()
            if self._ready:
                event = _unpack(self._ready.popleft())
                if self._parked:
                    self._kick()  # pass the baton: more ready, or the timer to hold
                return event
            await self._parking.park(self._delayed[0][0] if self._delayed else None)

    def take_all(self) -> list[Event]:
        """Remove and return every event: ready ones in order, then retries by due time."""
        events = [_unpack(p) for p in self._ready]
        self._ready.clear()
        delayed = sorted(self._delayed)
        self._delayed.clear()
        events.extend(_unpack(packed) for _, _, packed in delayed)
        return events

    def _promote_due(self) -> None:
        """Move due retries to the back of the ready queue. Only take() calls this, and
        its kick after taking one wakes the next parked take() for the rest."""
        delayed = self._delayed
        now = self._clock.monotonic()
        while delayed and delayed[0][0] <= now:
            self._ready.append(heapq.heappop(delayed)[2])

    def _kick(self) -> None:
        """Wake a parked take() if there is work nobody has been woken for."""
        if self._parked and (self._ready or (self._delayed and not self._parking.has_timekeeper)):
            self._parking.wake_one()
