"""What Intercom's answers say about its budget: X-RateLimit-Limit, -Remaining and -Reset
(a Unix time) on every authenticated answer, 429 when exceeded, in fixed windows of 10 s
(Intercom's rate-limiting page, quoted in shared/intercom-docs/README.md). HeaderBudget is
plain state on the injected Clock: it never waits, it answers "how long until a request
may start" and learns from each answer. The gate (gate.py) does the waiting.

The rules (all times monotonic):
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
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from forwarder.clock import Clock
    from forwarder.upstream import RateHeaders

TOO_MANY_REQUESTS = 429
FIRST_BACKOFF_S = 1.0
BEHIND_BACKOFF_S = 0.05  # first hold when Intercom's clock is behind ours (see _on_429)


class HeaderBudget:
    """Intercom's budget as its headers told it: the window, what is left in it, holds."""

    def __init__(self, per_seconds: float, clock: Clock):
        self._clock = clock
        self.per_seconds = per_seconds
        self.limit: int | None = None  # last X-RateLimit-Limit seen
        self.remaining: int | None = None  # None: Intercom's budget is unknown
        self.window_ends: float | None = None  # monotonic; set whenever remaining is
        self.window_reset_at: float | None = None  # newest X-RateLimit-Reset seen (epoch)
        self.window_assumed = False  # True after a rollover until an answer confirms it
        self._hold_until = -math.inf
        self._backoff_s = min(FIRST_BACKOFF_S, per_seconds)
        # After a rollover: one request at a time until an answer confirms the new window.
        self.confirming = False
        self._passed_reset_at: float | None = None  # Reset of the live window rolled past
        self._behind_backoff_s = min(BEHIND_BACKOFF_S, per_seconds)

    def held_until(self, now: float) -> float | None:
        """Monotonic time until which nobody may start, or None when not held."""
        self.roll(now)
        until = self._hold_until
        if self.remaining is not None and self.remaining <= 0 and self.window_ends is not None:
            until = max(until, self.window_ends)
        return until if until > now else None

    def hold_for(self, seconds: float) -> None:
        self._hold_until = max(self._hold_until, self._clock.monotonic() + seconds)

    def delay(self, now: float, in_flight: int) -> float:
        """0 when a request may start now as far as Intercom's budget goes; else how long
        to wait at most before asking again (math.inf: only an answer can change it)."""
        self.roll(now)
        if now < self._hold_until:
            return self._hold_until - now
        if self.confirming and in_flight > 0:
            return math.inf  # the answer in flight confirms the window (or not): wait for it
        if self.remaining is not None and self.remaining - in_flight <= 0:
            assert self.window_ends is not None
            return self.window_ends - now
        return 0.0

    def learn(self, status: int | None, rate: RateHeaders | None,
              retry_after_s: float | None, now: float) -> None:
        """Take in one answer (status None for a network error)."""
        self.roll(now)
        if rate is not None and rate.limit:
            self.limit = rate.limit
        if rate is not None and rate.remaining is not None and rate.reset_at is not None:
            self._learn_window(rate.remaining, rate.reset_at, now)
        else:
            if self.remaining is not None:
                self.remaining = max(0, self.remaining - 1)
            if status is not None and status != TOO_MANY_REQUESTS:
                # Intercom answered but the headers did not come through (a proxy): no answer
                # will confirm this window, so stop sending one at a time.
                self.confirming = False
        if status == TOO_MANY_REQUESTS:
            self._on_429(rate, retry_after_s, now)
        elif status is not None:
            self._backoff_s = min(FIRST_BACKOFF_S, self.per_seconds)
            self._behind_backoff_s = min(BEHIND_BACKOFF_S, self.per_seconds)

    def reset_in(self, reset_at: float) -> float:
        """Seconds from now to X-RateLimit-Reset; no window is longer than per_seconds, so a
        reset farther ahead means our wall clock is behind Intercom's: cap it."""
        return min(reset_at - self._clock.wall(), self.per_seconds)

    def _learn_window(self, remaining: int, reset_at: float, now: float) -> None:
        if self.window_reset_at is None or reset_at > self.window_reset_at:
            self.window_reset_at = reset_at
            self.remaining = remaining
            self.window_ends = now + self.reset_in(reset_at)
            self.window_assumed = False
            self.confirming = False
            self.roll(now)  # a reset already past (clock skew) is no knowledge at all
            self._passed_reset_at = None  # never live here, so no evidence of Intercom's clock
        elif reset_at == self.window_reset_at and not self.window_assumed:
            current = self.remaining if self.remaining is not None else remaining
            self.remaining = min(current, remaining)

    def _on_429(self, rate: RateHeaders | None, retry_after_s: float | None, now: float) -> None:
        reset_in = None if rate is None or rate.reset_at is None else self.reset_in(rate.reset_at)
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
            self._behind_backoff_s = min(self._behind_backoff_s * 2, self.per_seconds)
        else:
            until = now + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, self.per_seconds)
        self._hold_until = max(self._hold_until, until)

    def roll(self, now: float) -> None:
        """Past the end of the known window, assume a fresh one holding Limit."""
        if self.window_ends is None or now < self.window_ends:
            return
        self.window_assumed = True
        self.confirming = True
        self._passed_reset_at = self.window_reset_at
        self.remaining = self.limit
        if self.limit is None:
            self.window_ends = None
        else:  # Intercom's windows are fixed; keep the assumed ones on the same grid
            periods = math.floor((now - self.window_ends) / self.per_seconds) + 1
            self.window_ends += periods * self.per_seconds
