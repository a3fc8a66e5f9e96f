"""The record that travels the data path once intake has accepted something.

An Event carries the exact bytes Intercom will receive (serialised once, by validate),
so the queue, the workers, the spool and the dead-letter file all reuse them.
"""

from __future__ import annotations

import enum
from dataclasses import KW_ONLY, dataclass


class Route(str, enum.Enum):
    """Which Intercom endpoint an accepted body goes to."""

    EVENTS = "/events"
    SUMMARIES = "/events/summaries"


@dataclass(slots=True)
class Event:
    """One accepted write, waiting to be forwarded.

    body: the JSON body for Intercom, already normalised (orjson bytes).
    key: 16-byte dedup digest of Intercom's composite key; b"" where none applies.
    attempts: failed sends so far (429s are not counted).
    first_received_at: wall-clock seconds when intake first accepted it.
    due: monotonic time before which a retry must not be sent (0 = now).

    attempts and the two times can only be given by name: first_received_at (wall) and
    due (monotonic) are both floats, so a positional call that swapped them would run.
    """

    body: bytes
    key: bytes
    route: Route = Route.EVENTS
    _: KW_ONLY
    attempts: int = 0
    first_received_at: float = 0.0
    due: float = 0.0
    log_id: int = 0  # its row in the disk queue's log (disklog.py); 0 = in no log
