"""Unsent events written at stop and reloaded at start.

One JSON object per line, body last so it can be sliced back out byte for byte:

    {"route":"/events","attempts":2,"first_received_at":1700000000.5,"key":"<hex>","body":{...}}

The body is embedded with orjson.Fragment (the exact bytes Intercom will receive, never
re-serialised). write() replaces the whole file atomically: temp file in the same
directory, fsync, rename, fsync the directory, so a crash leaves the old spool or the new
one, never half of one. load() skips a line it cannot read and logs the count, because a
damaged spool must not keep the daemon from starting.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import orjson
import structlog

from forwarder.event import Event, Route
from forwarder.files import replace_atomically
from forwarder.queue import MAX_ATTEMPTS, MAX_KEY_BYTES

log = structlog.get_logger(__name__)

_FIELDS = ("route", "attempts", "first_received_at", "key", "body")
# Lines past MAX_ATTEMPTS / MAX_KEY_BYTES (what the queue's packed header holds) were not
# written by the daemon (16-byte keys, attempts up to retry.max_attempts): corrupt.
_BODY_SEP = b',"body":'


class Spool:
    """Owns one spool file; write() is all-or-nothing, load() never raises on bad lines."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, events: Sequence[Event]) -> int:
        """Replace the spool with these events; with none, remove it. Returns the count."""
        if not events:
            self.remove()
            return 0
        dumps = orjson.dumps
        fragment = orjson.Fragment
        newline = orjson.OPT_APPEND_NEWLINE
        data = b"".join(
            dumps(
                {
                    "route": e.route.value,
                    "attempts": e.attempts,
                    "first_received_at": e.first_received_at,
                    "key": e.key.hex(),
                    "body": fragment(e.body),
                },
                option=newline,
            )
            for e in events
        )
        replace_atomically(self.path, data)
        return len(events)

    def load(self) -> list[Event]:
        """Events from the spool, in file order; [] if there is none."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        events: list[Event] = []
        bad_lines: list[int] = []
        for number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            event = _parse_line(line)
            if event is None:
                bad_lines.append(number)
            else:
                events.append(event)
        if bad_lines:
            log.warning(
                "spool.corrupt_lines",
                path=str(self.path),
                skipped=len(bad_lines),
                lines=bad_lines[:20],
                loaded=len(events),
            )
        return events

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _parse_line(line: bytes) -> Event | None:
    try:
        obj = orjson.loads(line)
        route = Route(obj["route"])
        attempts = obj["attempts"]
        received = obj["first_received_at"]
        key = bytes.fromhex(obj["key"])
        body_obj = obj["body"]
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
        return None
    if type(attempts) is not int or not 0 <= attempts <= MAX_ATTEMPTS \
            or type(received) not in (int, float) or len(key) > MAX_KEY_BYTES:
        return None
    if tuple(obj) == _FIELDS and line.endswith(b"}"):
        # Every field before the body is a scalar and JSON strings cannot hold an
        # unescaped quote, so the first ',"body":' is the separator we wrote.
        body = line[line.index(_BODY_SEP) + len(_BODY_SEP) : -1]
    else:  # written by something else (or edited): serialise once instead
        body = orjson.dumps(body_obj)
    return Event(
        body=body, key=key, route=route, attempts=attempts, first_received_at=float(received)
    )
