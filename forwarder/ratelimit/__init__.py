"""The rate gate every send passes, in parts that each read on their own:

- local.py    this daemon's own budget (aiolimiter's leaky bucket on 50 ms ticks);
- headers.py  Intercom's budget as X-RateLimit-* and 429s tell it;
- share.py    this daemon's share of that budget when others spend it too (no Redis);
- gate.py     RateGate: the waiting, and the order the parts are asked in, with an
              optional FleetPart (a Redis-shared budget, forwarder/fleet_budget.py).

`from forwarder.ratelimit import RateGate` is the public entry point.
"""

from .gate import FleetPart, RateGate
from .headers import BEHIND_BACKOFF_S, FIRST_BACKOFF_S, TOO_MANY_REQUESTS, HeaderBudget
from .local import PACING_TICK_S, Bucket, LocalLimiter, TickedLimiter
from .share import FleetShare

__all__ = [
    "BEHIND_BACKOFF_S",
    "FIRST_BACKOFF_S",
    "PACING_TICK_S",
    "TOO_MANY_REQUESTS",
    "Bucket",
    "FleetPart",
    "FleetShare",
    "HeaderBudget",
    "LocalLimiter",
    "RateGate",
    "TickedLimiter",
]
