"""Memory mode's dedup window across a clean restart (issue 13): written at stop beside
the spool, read at the next start, so a client's retry after the restart is answered as
a duplicate instead of spending Intercom's budget again.

Format: a 6-byte magic and version, then 16 bytes a key: the 8-byte digest prefix the
window keeps (dedup.py: all contains() compares) and the wall-clock time it was added,
as a little-endian float64. 1,000,000 keys are 16 MB. Written with replace_atomically, so
a crash mid-write leaves the previous file or none, never a torn one; a file that is not
ours anyway (wrong magic, length not a multiple of 16) is ignored with a log line: the
cost is only that retries of those keys are forwarded once more.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

import structlog

from forwarder.files import replace_atomically

log = structlog.get_logger("forwarder.dedup")

MAGIC = b"FWDK\x00\x01"
_ENTRY = struct.Struct("<8sd")


def write_keys(path: Path, items: Iterable[tuple[bytes, float]], wall_now: float) -> int:
    """Write (key, age_s) pairs as (key, wall time added); returns the count."""
    pack = _ENTRY.pack
    parts = [MAGIC]
    parts += [pack(key[:8], wall_now - age) for key, age in items]
    replace_atomically(path, b"".join(parts))
    return len(parts) - 1


def read_keys(path: Path) -> list[tuple[bytes, float]]:
    """(key, wall time added) pairs in file order (oldest first); [] when there is no
    file or it is not one of ours."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    body = memoryview(data)[len(MAGIC):]
    if not data.startswith(MAGIC) or len(body) % _ENTRY.size:
        log.warning("dedup.keys_unreadable", path=str(path), bytes=len(data))
        return []
    return list(_ENTRY.iter_unpack(body))
