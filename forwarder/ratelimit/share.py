"""Pacing without Redis: this daemon's share of an app budget that others spend too.

Intercom's budget is per app, and every sidecar of the app (and any other client of it)
spends from it, but each learns Remaining only from its own answers. The evidence that
others spend is in those answers: Limit - Remaining is what the whole app has used in the
window, and this daemon knows how many of its own requests can be in that count (those
answered with this window's Reset, those answered without usable headers, which Intercom
may have counted, and every one still in flight). What is left over was someone else's:

    others = (Limit - lowest Remaining of the window) - (answered + blind + in_flight)

For a daemon alone this is never above 0 (all Intercom counted is among what it sent),
so nothing here changes what a single daemon does (bench/forwarding.py's figures). The
first value of a window is a baseline (clamped at 0): a daemon that starts mid-window
sees what was spent before it started. Only growth beyond the baseline while this daemon
watches, Remaining falling faster than its own sends explain, is evidence of others.

Share. Between the window's first answer and its latest, this daemon's sends over what
the whole app used in the same stretch is its share of the spending: both are counted
over one interval, so neither how long the window has run nor a burst at its start skews
it. When a window ends (an answer carries a later Reset), the share kept is 3/4 this
window's and 1/4 the last one (at most double the last), so one noisy window does not
swing it; 0.98 or more is "alone" (1.0). Why it converges: if every daemon spends its
share s_i of the window, each measures s_i / sum(s_j) next window, so the shares sum to
one after a window whatever they started at. A daemon with less to send spends less than
its share; one that ran out of quota in a window where the app left budget unused scales
its share up by the unused part (at most 4x a window, else 2x), so the others grow into
what it leaves. A daemon paced so low that a window holds too few of its answers to
measure, while it had more to send, doubles its share.

While others are seen (share < 1), three rules apply on top of the header budget:
1. Quota: at most share * Limit * FILL sends per window (FILL leaves room for the
   estimate's noise); its fraction is rounded up with that probability (rng injected), so
   a daemon whose share is below one request a window still sends, at the right rate.
2. Pacing: the quota is spread over the window, one send per T / quota, the first at
   the window's start + a jitter drawn once per window in [0, T / quota): N daemons start
   each window at N different moments instead of N bursts at the Reset. A daemon that
   fell behind catches up by one slot, never by a burst of every slot it missed.
3. In flight: at most share * Remaining (at least one) of this daemon's requests, so the
   daemons together never put more in flight than Intercom has left.
In the window where others are first seen, that window's share so far stands in.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from forwarder.upstream import RateHeaders

    from .headers import HeaderBudget

ALONE_SHARE = 0.98  # a measured share at or above this is a daemon alone (noise, restarts)
FILL = 0.95  # of the share's quota spent per window: margin for the estimate's noise
MIN_SHARE = 1 / 256  # never pace to nothing: a starved daemon must still be measured
MIN_EVIDENCE = 2  # others below this many requests a window are noise, not a fleet


class FleetShare:
    """This daemon's estimated share of the app's budget, and the pacing that follows."""

    def __init__(self, per_seconds: float, rng: random.Random | None = None):
        self._per_seconds = per_seconds
        self._rng = rng or random.Random()
        self.share = 1.0  # of the app's budget, learnt from the windows that ended
        # the window being measured (by its X-RateLimit-Reset)
        self._reset_at: float | None = None
        self._limit = 0
        self._lowest = 0  # lowest Remaining seen in it
        self._answered = 0  # own answers carrying this Reset
        self._blind = 0  # own answers without usable headers since it began
        self._sent_base = 0  # own sends in the window at its first answer
        self._others_base = 0  # others' spend then (before we watched), clamped at 0
        self._sent = 0  # own sends at the latest answer
        self._others = 0  # others' spend then
        # the window being paced (by the header budget's monotonic window end)
        self._paced_ends: float | None = None
        self._sends = 0
        self._quota = 0
        self._next_at = 0.0  # monotonic: when the next paced send may start
        self._hit_quota = False  # this window's quota ran out while there was more to send
        self._hit_quota_before = False  # the same for the window before (closed late)

    def __repr__(self) -> str:
        return f"FleetShare(share={self.share:.3f}, others_seen={self._others - self._others_base})"

    def current(self) -> float:
        """The share to pace with now: the learnt one, or this window's if others are new."""
        if self.share < 1.0:
            return self.share
        window_share = self._window_share()
        return 1.0 if window_share is None else window_share

    # -- learning ------------------------------------------------------------------------

    def observe(self, rate: RateHeaders | None, in_flight: int, headers: HeaderBudget) -> None:
        """One answer (after the header budget learnt it); in_flight excludes it."""
        if rate is None or rate.remaining is None or rate.reset_at is None:
            self._blind += 1
            return
        if rate.limit:
            self._limit = rate.limit
        fresh = self._reset_at is None or rate.reset_at > self._reset_at
        if fresh:
            self._close()
            self._reset_at, self._lowest = rate.reset_at, rate.remaining
            self._answered = self._blind = 0
        elif rate.reset_at < self._reset_at:
            return  # counted in a window already closed
        self._answered += 1
        self._lowest = min(self._lowest, rate.remaining)
        sent = self._answered + self._blind + in_flight
        others = (self._limit - self._lowest) - sent
        if fresh:
            self._sent_base, self._others_base = sent, max(0, others)
        self._sent, self._others = sent, others

    def _window_share(self) -> float | None:
        """This window's share so far; None while the window says too little either way.

        Others' growth below `evidence` is noise, and it proves "alone" only if this
        daemon sent plenty meanwhile: a daemon paced to a few sends a window sees little
        growth between two close answers, which says nothing about the others. A share
        is read only over a stretch where the app used a tenth of its Limit or more.
        """
        evidence = max(MIN_EVIDENCE, 0.01 * self._limit)
        own, others = self._sent - self._sent_base, self._others - self._others_base
        if others >= evidence and own + others >= 0.1 * self._limit:
            # (Not from the first few answers: 1 send against 12 of others' at the start
            # of a window said 8% where the share was 20%, and climbing back took windows.)
            return max(MIN_SHARE, own / (own + others))
        if others < evidence and own >= 4 * evidence:
            return 1.0
        return None

    def _close(self) -> None:
        window_share = self._window_share() if self._reset_at is not None else None
        if window_share is None:
            if self.share < 1.0 and (self._hit_quota or self._hit_quota_before):
                # Too few answers to measure (a daemon paced to a send or two a window
                # gets no second answer) while it had more to send: without this it could
                # never measure its way up again.
                self.share = min(1.0, 2 * self.share)
            return
        used = self._limit - self._lowest
        step = 2.0  # at most doubling a window, so one odd window is no jump
        if window_share < 1.0 and (self._hit_quota or self._hit_quota_before) \
                and 0 < used < FILL * self._limit:
            # This daemon had more to send than its quota while the app left budget
            # unused (others had less to send): grow into what they left, faster.
            window_share *= FILL * self._limit / used
            step = 4.0
        if self.share >= 1.0:
            mean = window_share
        else:  # mostly the new (a share learnt low must climb back fast: it wastes budget),
            # some of the old against noise
            mean = min(0.25 * self.share + 0.75 * window_share, step * self.share)
        self.share = 1.0 if mean >= ALONE_SHARE else max(MIN_SHARE, mean)

    # -- pacing --------------------------------------------------------------------------

    def delay(self, now: float, in_flight: int, headers: HeaderBudget,
              cap: float | None = None) -> float:
        """0 when this daemon's share allows a request now; else how long to wait at most
        (math.inf: until an answer). `cap` lowers the share (the fleet's last, Redis down)."""
        share = self.current() if cap is None else min(self.current(), cap)
        if share >= 1.0 or headers.window_ends is None or not (headers.limit or self._limit):
            return 0.0
        self._enter(headers, share, in_flight)
        if self._sends >= self._quota:
            self._hit_quota = True
            return max(headers.window_ends - now, 1e-3)
        if headers.remaining is not None and in_flight >= max(1.0, share * headers.remaining):
            return math.inf
        return max(0.0, self._next_at - now)

    def on_send(self, headers: HeaderBudget, now: float) -> None:
        if headers.window_ends is None or headers.window_ends != self._paced_ends:
            return
        self._sends += 1
        # The next slot; a daemon that fell behind (no work, or waiting on an answer) may
        # catch up by one slot, not burst every slot it missed.
        slot_s = self._per_seconds / max(self._quota, 1)
        self._next_at = max(self._next_at, now - slot_s) + slot_s

    def _enter(self, headers: HeaderBudget, share: float, in_flight: int) -> None:
        """At a new window: draw its quota and its start's jitter. Entered mid-window (the
        window where others were first seen), what this daemon sent in it counts."""
        if headers.window_ends == self._paced_ends:
            return
        self._paced_ends = headers.window_ends
        self._hit_quota_before, self._hit_quota = self._hit_quota, False
        same = (not headers.window_assumed and headers.window_reset_at is not None
                and headers.window_reset_at == self._reset_at)
        self._sends = self._answered + self._blind + in_flight if same else 0
        exact = share * (headers.limit or self._limit) * FILL
        self._quota = math.floor(exact) + (self._rng.random() < exact - math.floor(exact))
        slot_s = self._per_seconds / max(self._quota, 1)
        start = headers.window_ends - self._per_seconds
        self._next_at = start + self._rng.uniform(0.0, slot_s) + self._sends * slot_s
