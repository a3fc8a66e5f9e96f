"""Unsent events written at stop and reloaded at start.

One JSON object per line, body last so it can be sliced back out byte for byte:

    {"route":"/events","attempts":2,"first_received_at":1700000000.5,"key":"<hex>","body":{...}}

The body is embedded with orjson.Fragment (the exact bytes Intercom will receive, never
re-serialised).

write() builds the new spool in a temporary file in the same directory, fsyncs it, renames
it over the old one and fsyncs the directory, so a crash leaves the old spool or the new
one, never half of one. When the disk refuses part of it (ENOSPC, EIO, EACCES), write()
keeps what fits: the file is cut back to the last whole line, renamed into place all the
same, and SpoolWriteError says how many events were kept and how many were not, so the
stop path can log the loss with its count instead of failing with nothing kept.

load() never raises on bad lines, because a damaged spool must not keep the daemon from
starting: it returns the readable events and moves the file aside
(spool.jsonl.corrupt-<UTC time>) so the unreadable lines are never deleted. It also
removes temporary files left by a write that was killed half-way; one daemon owns the
state dir (statedir lock), so no other writer's file can be among them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from glob import escape as glob_escape
from pathlib import Path

import orjson
import structlog

from forwarder.event import Event, Route
from forwarder.files import fsync_dir, write_all
from forwarder.queue import MAX_ATTEMPTS, MAX_KEY_BYTES

log = structlog.get_logger(__name__)

_FIELDS = ("route", "attempts", "first_received_at", "key", "body")
# Lines past MAX_ATTEMPTS / MAX_KEY_BYTES (what the queue's packed header holds) were not
# written by the daemon (16-byte keys, attempts up to retry.max_attempts): corrupt.
_BODY_SEP = b',"body":'
# Lines go to the disk in chunks of about this size; only a chunk the disk refuses is
# retried line by line, to keep every event that fits.
_CHUNK_BYTES = 1 << 20


class SpoolWriteError(Exception):
    """The disk took only part of the spool: `written` events are in it, `lost` are not."""

    def __init__(self, written: int, lost: int, cause: OSError):
        super().__init__(f"spool kept {written} events, could not keep {lost}: {cause}")
        self.written = written
        self.lost = lost
        self.cause = cause

    @property
    def reason(self) -> str:
        return os.strerror(self.cause.errno) if self.cause.errno else repr(self.cause)


class Spool:
    """Owns one spool file; write() keeps every event the disk takes, load() never raises
    on bad lines."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, events: Sequence[Event]) -> int:
        """Replace the spool with these events; with none, remove it. Returns the count
        written; raises SpoolWriteError (after keeping what fits) if the disk refused some."""
        if not events:
            self.remove()
            return 0
        lines = [_line(e) for e in events]
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                       dir=directory)
        except OSError as exc:
            raise SpoolWriteError(0, len(lines), exc) from exc
        kept, error = 0, None
        try:
            kept, error = _write_lines(fd, lines)
            if kept:
                try:
                    os.fsync(fd)
                except OSError as exc:  # what is in the page cache survives a process exit
                    error = error or exc
        finally:
            os.close(fd)
        try:
            if kept:
                os.replace(tmp, self.path)
                fsync_dir(directory)
            else:
                os.unlink(tmp)
                self.remove()
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise SpoolWriteError(0, len(lines), exc) from exc
        if error is not None:
            raise SpoolWriteError(kept, len(lines) - kept, error) from error
        return kept

    def load(self) -> list[Event]:
        """Events from the spool, in file order; [] if there is none. A spool with
        unreadable lines is moved aside, never deleted."""
        self._remove_temporary_files()
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
            aside = self.path.with_name(
                f"{self.path.name}.corrupt-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}")
            os.replace(self.path, aside)
            log.error(
                "spool.corrupt_lines",
                path=str(self.path),
                moved_to=str(aside),
                skipped=len(bad_lines),
                lines=bad_lines[:20],
                loaded=len(events),
            )
        return events

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _remove_temporary_files(self) -> None:
        pattern = f".{glob_escape(self.path.name)}.*.tmp"
        for tmp in self.path.parent.glob(pattern):
            tmp.unlink(missing_ok=True)
            log.warning("spool.temporary_file_removed", path=str(tmp))


def _line(e: Event) -> bytes:
    return orjson.dumps(
        {
            "route": e.route.value,
            "attempts": e.attempts,
            "first_received_at": e.first_received_at,
            "key": e.key.hex(),
            "body": orjson.Fragment(e.body),
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )


def _write_lines(fd: int, lines: list[bytes]) -> tuple[int, OSError | None]:
    """Write whole lines from the start of fd until the disk refuses one. Returns how many
    were written and the error that stopped it; a partly written line is cut off."""
    offset = 0
    i = 0
    while i < len(lines):
        j, size = i, 0
        while j < len(lines) and (j == i or size + len(lines[j]) <= _CHUNK_BYTES):
            size += len(lines[j])
            j += 1
        try:
            write_all(fd, b"".join(lines[i:j]))
            offset += size
            i = j
            continue
        except OSError as exc:
            _cut_back(fd, offset)
            if j - i == 1:
                return i, exc
        for k in range(i, j):  # the chunk did not fit: keep as many of its lines as do
            try:
                write_all(fd, lines[k])
            except OSError as exc:
                _cut_back(fd, offset)
                return k, exc
            offset += len(lines[k])
        i = j
    return len(lines), None


def _cut_back(fd: int, offset: int) -> None:
    os.ftruncate(fd, offset)
    os.lseek(fd, offset, os.SEEK_SET)


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
