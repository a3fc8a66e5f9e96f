"""Bounded window of recently accepted dedup keys, by age and by count.

Intake calls add_if_absent(key) (one lookup) and forget(key) when the queue then refuses
the event, so a 503 never poisons the client's retry; a dead-lettered event's key is
forget()-ten so that a replay is not a "duplicate".

Memory layout (the window is meant to hold ~1e6 keys in well under 150 bytes each):

- A key is stored as the int of the digest's first 60 bits, not as the 16-byte bytes
  object: an int below 2**60 is two 30-bit digits, a 32-byte object (64 bits take a
  third digit, 36 bytes, which the allocator rounds to 48), and a 16-byte bytes object is
  56 bytes. The 60 bits against 64 save ~10 MB per million keys (measured: a dict of 1e6
  such ints grew RSS by 81.5 MB, against 91.5 MB at 64 bits: bench/dedup_key_bits.py),
  which keeps a restart with a full window and a 1e6-event disk backlog under 150 MB
  (bench/RESULTS.md, disk-http).
  Truncating the blake2b digest to 60 bits keeps collisions negligible: with n = 1e6 keys
  held, a new key is wrongly taken for a duplicate with probability n / 2**60 ~= 8.7e-13
  per lookup, and the chance that any two held keys collide is n**2 / 2**61 ~= 4.3e-7.
  At 1,000 events/s with a full window that is about one wrongly dropped event every
  36,000 years.
- Ages are kept per generation, not per key: time is cut into GENERATIONS slices of the
  window, and every key added during one slice maps to the same float object, its
  _Generation's expires_at (one dict value shared by thousands of keys, so no per-key
  float, and a dict of ints and floats that the cycle collector does not track). A key is therefore
  remembered for at least window_seconds and at most window_seconds * (1 + 1/GENERATIONS).
- Each generation also keeps its keys in insertion order in an array of unsigned 64-bit
  ints (8 bytes a key), so expiry drops a whole generation in one pass and the count bound
  evicts the oldest keys from the front with a cursor. Popping the front of a dict
  instead (next(iter(d))) rescans the deleted slots every time and degrades to O(n).

A key that is re-added or forgotten leaves a stale entry in its old generation's array;
stale entries are recognised (the dict no longer maps them to that generation's float)
and skipped. So that memory stays bounded by max_keys whatever the traffic (a 503 storm
adds and forgets a key per refused event; 2M such cycles used to leave ~16 MB behind),
each generation counts its stale entries and is compacted (rebuilt from its live
entries) once they outnumber its live ones by more than _STALE_SLACK: the compaction
costs one pass over the generation, paid for by the forgets that made it necessary, and
it pauses the loop for that one generation's keys, not the whole window's. Likewise the
count bound's cursor: once it has passed half of a generation's array, the passed half
is cut off, so a small window under heavy traffic does not keep every key it evicted.
"""

from __future__ import annotations

import struct
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice

from forwarder.clock import Clock

GENERATIONS = 64

_U64 = struct.Struct("<Q")
_first_u64 = _U64.unpack_from
_KEY_MASK = (1 << 60) - 1  # see "Memory layout" above: a 32-byte int, not a 48-byte one

# Stale entries a generation may hold beyond its live ones before it is compacted. Not 0,
# so that a generation with few live keys is not rebuilt on every forget(); it bounds the
# extra memory to GENERATIONS * _STALE_SLACK * 8 bytes (~32 KB) plus one entry per live key.
_STALE_SLACK = 64


class _Generation:
    """Keys added during one slice of time; they all expire together."""

    __slots__ = ("closes_at", "cursor", "expires_at", "keys", "stale")

    def __init__(self, closes_at: float, expires_at: float):
        self.closes_at = closes_at  # adds at monotonic time < closes_at land here
        self.expires_at = expires_at  # closes_at + window: the newest key's full window
        self.keys = array("Q")
        self.cursor = 0  # keys[:cursor] were already evicted by the count bound
        self.stale = 0  # entries in keys[cursor:] whose key was forgotten or re-added since


class DedupWindow:
    """Remembers keys for at least window_seconds, holding at most max_keys (oldest out first).

    contains(), add() and forget() are O(1) amortised; expiry of a generation costs one
    pass over it. Whatever was forgotten or evicted, the arrays hold at most ~4 entries
    (32 bytes) per max_keys plus ~32 KB, beside the dict's one entry per live key.
    """

    __slots__ = ("_clock", "_gens", "_max_keys", "_where", "_width_s", "_window_s")

    def __init__(self, window_seconds: float, max_keys: int, clock: Clock):
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        if max_keys <= 0:
            raise ValueError("max_keys must be positive")
        self._window_s = float(window_seconds)
        self._width_s = self._window_s / GENERATIONS
        self._max_keys = max_keys
        self._clock = clock
        # key -> its generation's expires_at float (one shared object per generation, so
        # `is` names the generation). Only ints and floats: CPython stops tracking such a
        # dict in its cycle collector, which otherwise walked all 1e6 entries on every
        # full collection (~14 ms, the intake's p99).
        self._where: dict[int, float] = {}
        self._gens: deque[_Generation] = deque()

    def contains(self, key: bytes) -> bool:
        """True if key was added within the window and not forgotten or evicted since."""
        expires_at = self._where.get(_first_u64(key)[0] & _KEY_MASK)
        return expires_at is not None and expires_at > self._clock.monotonic()

    def add_if_absent(self, key: bytes) -> bool:
        """contains() and add() in one lookup: False (and nothing changes) for a key still
        in the window, else remember it and return True. The intake's hot path."""
        k = _first_u64(key)[0] & _KEY_MASK
        now = self._clock.monotonic()
        where = self._where
        expires_at = where.get(k)
        if expires_at is not None and expires_at > now:
            return False
        gens = self._gens
        if gens and now < gens[-1].closes_at and gens[0].expires_at > now \
                and len(where) < self._max_keys:
            # _add()'s common case, written out: the current generation is open, none has
            # expired and the count bound is not reached.
            gen = gens[-1]
            gen.keys.append(k)
            where[k] = gen.expires_at
            return True
        self._add(k, now)
        return True

    async def add_if_absent_many(self, keys: Sequence[bytes]) -> list[bool]:
        """add_if_absent() for each key in order (a key twice: the second is a duplicate).
        The intake's one call per request; a coroutine so that the fleet's window
        (fleet_dedup.py), which asks Redis, has the same shape. It never suspends here."""
        add = self.add_if_absent
        return [add(k) for k in keys]

    def add(self, key: bytes) -> None:
        """Remember key from now on (re-adding an old key restarts its window)."""
        self.forget(key)  # a key still remembered: its old entry goes stale, counted there
        self._add(_first_u64(key)[0] & _KEY_MASK, self._clock.monotonic())

    def _add(self, k: int, now: float) -> None:
        gens = self._gens
        if gens and gens[0].expires_at <= now:
            self._expire(now)
        if gens and now < gens[-1].closes_at:
            gen = gens[-1]
        else:
            closes_at = now + self._width_s
            gen = _Generation(closes_at, closes_at + self._window_s)
            gens.append(gen)
        gen.keys.append(k)
        where = self._where
        where[k] = gen.expires_at
        if len(where) > self._max_keys:
            self._evict_oldest(len(where) - self._max_keys)

    def add_aged(self, key: bytes, age_s: float) -> None:
        """Remember key as if it had been added age_s ago, so it is forgotten
        window_seconds after that (a restart reloading the window from the disk queue or
        dedup.keys). Give keys oldest first: a key older than the newest generation joins
        that generation, so it is remembered a little longer, never shorter. A key whose
        window has passed is ignored."""
        now = self._clock.monotonic()
        added = now - max(0.0, age_s)
        if added + self._window_s <= now:
            return
        self.forget(key)
        gens = self._gens
        if gens and gens[0].expires_at <= now:
            self._expire(now)
        if gens and added < gens[-1].closes_at:
            gen = gens[-1]
        else:
            closes_at = added + self._width_s
            gen = _Generation(closes_at, closes_at + self._window_s)
            gens.append(gen)
        k = _first_u64(key)[0] & _KEY_MASK
        gen.keys.append(k)
        where = self._where
        where[k] = gen.expires_at
        if len(where) > self._max_keys:
            self._evict_oldest(len(where) - self._max_keys)

    def add_aged_many(self, pairs: Iterable[tuple[bytes, float]], now_wall: float) -> None:
        """add_aged(key, now_wall - added_at) for every (key, added_at) pair (added_at in
        wall-clock seconds, as the disk queue and dedup.keys keep them), oldest first, with
        the same answers, in one pass: a start reloads 1e6 keys in a fraction of add_aged's
        ~2 s, which the intake waits for. What makes it cheaper: the clock is read, expiry
        checked and the current generation looked up once, not per key; and the count
        bound evicts once at the end, the same oldest keys as per-key eviction would (it
        takes from the front, the new keys go to the back)."""
        now = self._clock.monotonic()
        gens = self._gens
        if gens and gens[0].expires_at <= now:
            self._expire(now)
        where = self._where
        window, width = self._window_s, self._width_s
        gen = gens[-1] if gens else None
        # The newest generation's fields in locals; a key joins it while added < closes_at.
        closes_at = gen.closes_at if gen is not None else float("-inf")
        append = gen.keys.append if gen is not None else None
        expires_at = gen.expires_at if gen is not None else 0.0
        for key, added_at in pairs:
            age = now_wall - added_at  # add_aged's arithmetic, so the answers are the same
            added = now - age if age > 0.0 else now
            if added + window <= now:
                continue  # its window has passed
            k = _first_u64(key)[0] & _KEY_MASK
            if k in where:  # rare: a key twice in the input, or already remembered
                self.forget(key)
                if gen is not None:
                    append = gen.keys.append  # forget() may have compacted gen's array
            if added >= closes_at:
                closes_at = added + width
                gen = _Generation(closes_at, closes_at + window)
                gens.append(gen)
                append = gen.keys.append
                expires_at = gen.expires_at
            append(k)
            where[k] = expires_at
        if len(where) > self._max_keys:
            self._evict_oldest(len(where) - self._max_keys)

    def items(self) -> Iterator[tuple[bytes, float]]:
        """(key, age_s) of every remembered key, oldest first, for writing the window at
        stop. The key is the digest prefix the window keeps, 60 bits in 8 bytes (all that contains()
        compares); the age is its generation's, so at most window/GENERATIONS younger
        than the truth: reloaded, a key is remembered a little longer, never shorter."""
        now = self._clock.monotonic()
        pack = _U64.pack
        where = self._where
        for gen in list(self._gens):
            if gen.expires_at <= now:
                continue
            age = max(0.0, now - (gen.expires_at - self._window_s))
            expires_at = gen.expires_at
            for k in gen.keys[gen.cursor:]:
                if where.get(k) is expires_at:
                    yield pack(k), age

    def forget(self, key: bytes) -> None:
        """Drop key, so that the next contains(key) is False. Unknown keys are ignored."""
        expires_at = self._where.pop(_first_u64(key)[0] & _KEY_MASK, None)
        if expires_at is None:
            return
        # Its entry stays in its generation's array, stale: count it there, and compact
        # that generation once stale entries outnumber its live ones.
        gens = self._gens
        gen = gens[-1]  # the intake forgets the key it has just added: the newest generation
        if gen.expires_at is not expires_at:  # a dead letter's key: an older one (<= 65)
            gen = next(g for g in gens if g.expires_at is expires_at)
        gen.stale += 1
        if 2 * gen.stale > len(gen.keys) - gen.cursor + _STALE_SLACK:
            self._compact(gen)

    def _compact(self, gen: _Generation) -> None:
        """Rebuild gen's array from its live entries only, in the same order. A key
        forgotten and re-added within one generation has several entries that all map to
        it: the first one stays, as the first one is what eviction would have taken."""
        expires_at = gen.expires_at
        where_get = self._where.get
        live = (k for k in islice(gen.keys, gen.cursor, None) if where_get(k) is expires_at)
        gen.keys = array("Q", dict.fromkeys(live))
        gen.cursor = 0
        gen.stale = 0

    def __len__(self) -> int:
        """Keys currently remembered (expired generations are dropped first)."""
        now = self._clock.monotonic()
        if self._gens and self._gens[0].expires_at <= now:
            self._expire(now)
        return len(self._where)

    def _expire(self, now: float) -> None:
        gens = self._gens
        where = self._where
        while gens and gens[0].expires_at <= now:
            gen = gens.popleft()
            keys = gen.keys if gen.cursor == 0 else gen.keys[gen.cursor :]
            for k in keys:
                if where.get(k) is gen.expires_at:
                    del where[k]

    def _evict_oldest(self, n: int) -> None:
        gens = self._gens
        where = self._where
        while n > 0:
            gen = gens[0]
            keys = gen.keys
            i = gen.cursor
            end = len(keys)
            while n > 0 and i < end:
                k = keys[i]
                i += 1
                if where.get(k) is gen.expires_at:
                    del where[k]
                    n -= 1
                else:
                    gen.stale -= 1
            if i >= end:
                gens.popleft()
            elif 2 * i > end:
                # Cut off the passed half: one memmove of the rest, paid for by the
                # evictions that passed it, so the array keeps only what they have not.
                del keys[:i]
                i = 0
            gen.cursor = i
