"""Append-only dead-letter.jsonl of events Intercom refused for good, with rotation;
list the entries and replay them through a running daemon's intake.

One JSON object per line:

    {"event":{...},"route":"/events","reason":"contact_not_found","status":404,
     "response":"<Intercom's body, at most 2048 chars>","attempts":1,
     "first_received_at":"2023-11-14T22:13:20.000Z","dead_lettered_at":"..."}

The event is the exact body Intercom received, embedded with orjson.Fragment.

Whole lines only: an append the disk refuses part-way (ENOSPC after a short write, EIO)
is truncated back to the file's size before it and still raises OSError, so the caller
keeps the event and the next record does not start glued to half a line.

Off the event loop: flock waits as long as another process holds the lock, and disk
writes can stall, so DeadLetterFile.append only serialises the line on the loop and
hands the lock, fstat, rotation, write and truncate-back to one writer thread of its
own (started by the first append, ended by close()). One thread keeps appends in the
order they were made.

Locking: the daemon appends while `forwarder dead-letters replay` may be rewriting the
same files from another process. Every change to the file set (append, rotation, the
swap of a file a replay rewrote) holds fcntl.flock LOCK_EX on the sidecar
dead-letter.jsonl.lock rather than on the data file: rotation and rewrite replace the
data file's inode, and a lock on a replaced inode protects nothing. The appender keeps
its O_APPEND fd between appends and, under the lock, checks that it still names the
path's inode, reopening it after a rotation or a replay's rename; so a line appended
during a replay lands in the rewritten file, never in an unlinked one.

Readers and replays hold the lock briefly, never for a whole file's I/O, because the
daemon's appends wait for it. `list` opens and measures every file under LOCK_SH, then
reads them unlocked: an open fd still reads a file that was rotated or replaced since,
and the daemon only ever adds after the measured end. A replay reads, filters and writes
each new file (fsynced) unlocked; under LOCK_EX it then checks that the file is still
the one it read, copies over the lines the daemon appended since, and renames. A file
that was rotated or replaced meanwhile is not swapped: the replay starts over from the
current files, and on its last attempt holds the lock for each whole file instead.

Appends are not fsynced: a burst of 404s would otherwise hold the writer thread, and the
workers waiting on it, on the disk. A dead letter written before a process crash
survives; one written within the kernel's writeback interval before a power loss may not.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import stat
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from glob import escape as glob_escape
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson
import structlog

from forwarder.clock import Clock
from forwarder.event import Event
from forwarder.files import fsync_dir, write_all

log = structlog.get_logger(__name__)

DEAD_LETTER_NAME = "dead-letter.jsonl"
RESPONSE_MAX_CHARS = 2048
_FILE_MODE = 0o600  # event bodies carry contact identities and e-mail addresses
# Optimistic swaps a replay tries before it holds the lock for each whole file: each
# failed one means the daemon rotated (every 64 MiB by default) during that attempt.
_REPLAY_ATTEMPTS = 5


class DeadLetterFile:
    """Owns the daemon's appends: one whole line per event, or none; rotates at max_bytes,
    keeping keep_files older files (dead-letter.jsonl.1 is the newest of them). Its file
    I/O runs on one writer thread of its own, so appends never block the event loop."""

    def __init__(self, path: Path, *, max_bytes: int, keep_files: int, clock: Clock):
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if keep_files < 0:
            raise ValueError("keep_files must not be negative")
        self.path = Path(path)
        self._max_bytes = max_bytes
        self._keep_files = keep_files
        self._clock = clock
        self._writer: ThreadPoolExecutor | None = None  # started by the first append
        # Used only on the writer thread.
        self._fd: int | None = None
        self._lock_fd: int | None = None

    async def append(
        self, event: Event, *, reason: str, status: int | None, response_body: bytes
    ) -> None:
        """Record one refused event. Raises OSError, with the file left as it was, if the
        disk refuses the line. A line handed to the writer thread cannot be taken back, so
        a cancellation waits for its outcome: CancelledError then means the line is in the
        file; OSError still means it is not (and the task stays cancelled)."""
        line = orjson.dumps(
            {
                "event": orjson.Fragment(event.body),
                "route": event.route.value,
                "reason": reason,
                "status": status,
                "response": response_body.decode("utf-8", errors="replace")[:RESPONSE_MAX_CHARS],
                "attempts": event.attempts,
                "first_received_at": _iso_utc(event.first_received_at),
                "dead_lettered_at": _iso_utc(self._clock.wall()),
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1,
                                              thread_name_prefix="forwarder-deadletter")
        await _outcome(asyncio.wrap_future(self._writer.submit(self._write, line)))

    async def close(self) -> None:
        """Let the appends already made finish, close the files and end the writer thread.
        Calling it again does nothing; an append after it starts a new writer thread."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            # Queued behind every pending append, so those are written first.
            await asyncio.wrap_future(writer.submit(self._close_files))
        finally:
            # No waiting on the loop: the thread exits once its queue is done, which
            # still includes closing the files if this await was cancelled.
            writer.shutdown(wait=False)

    def _write(self, line: bytes) -> None:
        """On the writer thread: the whole line at the end of the current file, or nothing."""
        if self._lock_fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _open_lock(self.path)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            fd = self._current_fd()
            size = os.fstat(fd).st_size
            if size and size + len(line) > self._max_bytes:
                self._rotate()
                fd = self._current_fd()
                size = os.fstat(fd).st_size
            try:
                _write_all(fd, line)
            except OSError:
                # Part of the line may be on disk (a short write, then ENOSPC). Cut it off:
                # the next line would be glued to it and `list` could read neither.
                os.ftruncate(fd, size)
                raise
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _close_files(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None

    def _current_fd(self) -> int:
        """The O_APPEND fd of the file at self.path now (reopened if it was replaced)."""
        if self._fd is not None:
            held = os.fstat(self._fd)
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return self._fd
            os.close(self._fd)
            self._fd = None
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, _FILE_MODE)
        return self._fd

    def _rotate(self) -> None:
        """dead-letter.jsonl -> .1 -> .2 ...; the oldest beyond keep_files is deleted."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        keep = self._keep_files
        for n, older in _rotated_files(self.path):
            if n >= keep:  # would be shifted past keep_files (also after keep_files shrank)
                older.unlink()
        for n in range(keep - 1, 0, -1):
            older = _rotated(self.path, n)
            if older.exists():
                os.replace(older, _rotated(self.path, n + 1))
        if keep:
            os.replace(self.path, _rotated(self.path, 1))
        else:
            self.path.unlink()
        fsync_dir(self.path.parent)
        log.info("deadletter.rotated", path=str(self.path), keep_files=keep)


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """One dead-letter line as read: where it is, its exact bytes and its parsed fields."""

    file: Path
    line: int  # 1-based, at the time it was read
    raw: bytes  # the line without its newline; what a replay removes
    record: dict[str, Any] = field(repr=False)

    @property
    def reason(self) -> str:
        return self.record["reason"]

    @property
    def status(self) -> int | None:
        return self.record.get("status")

    @property
    def route(self) -> str:
        return self.record.get("route") or "/events"

    @property
    def body(self) -> bytes:
        """The event body to re-submit (orjson round-trips its own output byte for byte)."""
        return orjson.dumps(self.record["event"])


@dataclass(frozen=True, slots=True)
class ReplayResult:
    accepted: int  # answered 2xx and removed from the files
    rejected: list[tuple[DeadLetterEntry, int, bytes]]  # (entry, status, the intake's body)
    failed: int  # never answered: daemon down, timeout, connection reset


def read_entries(state_dir: Path, reason: str | None = None) -> list[DeadLetterEntry]:
    """Entries in every dead-letter file, oldest first, optionally only one reason.
    A line that is not a dead-letter record is logged (deadletter.corrupt_line) and skipped."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return []
    entries: list[DeadLetterEntry] = []
    for path, data in _snapshot(state_dir):
        for number, raw in enumerate(data.splitlines(), start=1):
            if not raw.strip():
                continue
            record = _parse_record(raw)
            if record is None:
                log.warning("deadletter.corrupt_line", file=str(path), line=number)
            elif reason is None or record["reason"] == reason:
                entries.append(DeadLetterEntry(path, number, raw, record))
    return entries


async def replay(
    state_dir: Path,
    *,
    base_url: str | None = None,
    unix_socket: str | None = None,
    reason: str | None = None,
    timeout_s: float = 10,
) -> ReplayResult:
    """Re-submit entries to a running daemon's intake (base_url like http://127.0.0.1:8377,
    or its Unix socket) and remove only those it accepted (2xx)."""
    if (base_url is None) == (unix_socket is None):
        raise ValueError("give exactly one of base_url or unix_socket")
    entries = read_entries(state_dir, reason)
    accepted: list[bytes] = []
    rejected: list[tuple[DeadLetterEntry, int, bytes]] = []
    failed = 0
    if not entries:
        return ReplayResult(0, rejected, 0)
    root = "http://localhost" if unix_socket is not None else base_url.rstrip("/")
    connector = aiohttp.UnixConnector(path=unix_socket) if unix_socket is not None else None
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for i, entry in enumerate(entries):
            try:
                async with session.post(
                    root + entry.route,
                    data=entry.body,
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    status, answer = resp.status, await resp.read()
            except aiohttp.ClientConnectorError as exc:
                # Nothing is listening: the rest would fail the same way.
                not_sent = len(entries) - i
                failed += not_sent
                log.warning("deadletter.replay_unreachable", error=str(exc), not_sent=not_sent)
                break
            except (TimeoutError, aiohttp.ClientError) as exc:
                failed += 1
                log.warning(
                    "deadletter.replay_failed",
                    file=str(entry.file),
                    line=entry.line,
                    error=repr(exc),
                )
                continue
            if 200 <= status < 300:  # 202 for events, 200 for summaries
                accepted.append(entry.raw)
            else:
                rejected.append((entry, status, answer))
    if accepted:
        await asyncio.to_thread(_remove_lines, Path(state_dir), accepted)
    return ReplayResult(len(accepted), rejected, failed)


def _snapshot(state_dir: Path) -> list[tuple[Path, bytes]]:
    """Every dead-letter file's content, oldest first, as of one moment. Only opening and
    measuring the files holds the lock; the reading happens after it is released."""
    opened: list[tuple[Path, IO[bytes], int]] = []
    try:
        with _locked(state_dir / DEAD_LETTER_NAME, fcntl.LOCK_SH):
            for path in _files_oldest_first(state_dir):
                try:
                    f = open(path, "rb")  # closed in the finally, after the reading
                except FileNotFoundError:
                    continue
                opened.append((path, f, os.fstat(f.fileno()).st_size))
        return [(path, f.read(size)) for path, f, size in opened]
    finally:
        for _, f, _ in opened:
            f.close()


def _remove_lines(state_dir: Path, raw_lines: list[bytes]) -> None:
    """Delete one occurrence of each line, wherever it is now (the daemon may have
    appended or rotated since it was read), keeping everything else."""
    pending = Counter(raw_lines)
    for attempt in range(1, _REPLAY_ATTEMPTS + 1):
        hold_lock = attempt == _REPLAY_ATTEMPTS
        for path in _files_oldest_first(state_dir):
            if not pending:
                break
            if not _remove_from(path, pending, hold_lock=hold_lock):
                break  # rotated or replaced since it was read: list the files again
        else:
            break
    log.info("deadletter.replayed", removed=len(raw_lines) - sum(pending.values()))


def _remove_from(path: Path, pending: Counter[bytes], *, hold_lock: bool) -> bool:
    """Remove pending lines from one file, taking them off pending. False, with nothing
    changed, when the file was replaced between the read and the swap. Unless hold_lock,
    the lock is held only for the swap (see the module docstring)."""
    current = path.with_name(DEAD_LETTER_NAME)  # whose sidecar lock guards the file set
    with contextlib.ExitStack() as stack:
        if hold_lock:
            stack.enter_context(_locked(current, fcntl.LOCK_EX))
        try:
            # Open until the swap, so that its inode cannot be reused by another file.
            f = stack.enter_context(open(path, "rb"))
        except FileNotFoundError:
            return True
        data = f.read()
        # Up to the last newline: an append running now may have written part of a line.
        read = data[: data.rfind(b"\n") + 1]
        kept, removed = _without(read, pending)
        if not removed:
            return True
        fd, tmp = _temp_copy(path, kept)
        stack.callback(Path(tmp).unlink, missing_ok=True)  # a no-op once renamed
        stack.callback(os.close, fd)
        with contextlib.nullcontext() if hold_lock else _locked(current, fcntl.LOCK_EX):
            if not _still_names(path, f.fileno(), len(read)):
                return False
            f.seek(len(read))
            appended = f.read()  # whole lines: the daemon appends under this lock
            if appended:
                _write_all(fd, appended)
                os.fsync(fd)
            os.replace(tmp, path)
    # After the lock: appends made from now on land in the new file either way.
    fsync_dir(path.parent)
    pending -= removed  # in place (Counter.__isub__), dropping the counts that reach 0
    return True


def _without(data: bytes, pending: Counter[bytes]) -> tuple[bytes, Counter[bytes]]:
    """data without up to pending[line] copies of each line, and what was taken out."""
    kept: list[bytes] = []
    removed: Counter[bytes] = Counter()
    for line in data.splitlines(keepends=True):
        raw = line.rstrip(b"\n")
        if removed[raw] < pending[raw]:
            removed[raw] += 1
        else:
            kept.append(line)
    return b"".join(kept), removed


def _temp_copy(path: Path, data: bytes) -> tuple[int, str]:
    """A new file beside path, with its owner and mode, holding data (fsynced); still open."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _keep_owner(fd, path)
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


def _still_names(path: Path, fd: int, size: int) -> bool:
    """path is still the file open at fd, and it has not shrunk below size."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino) and held.st_size >= size


def _keep_owner(fd: int, reference: Path) -> None:
    """Give a file we create the owner and mode of the one it stands for. An operator may
    run the CLI as root beside a daemon running as its own user; a root-owned 0600 file
    would lock the daemon out of its own dead-letter file."""
    try:
        st = os.stat(reference)
    except FileNotFoundError:
        return
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
        os.fchown(fd, st.st_uid, st.st_gid)
    if reference.is_file():
        os.fchmod(fd, stat.S_IMODE(st.st_mode))


def _parse_record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("event"), dict)
        or not isinstance(record.get("reason"), str)
    ):
        return None
    return record


def _files_oldest_first(state_dir: Path) -> list[Path]:
    """dead-letter.jsonl.N (highest N is the oldest) ... .1, then dead-letter.jsonl."""
    current = state_dir / DEAD_LETTER_NAME
    return [p for _, p in sorted(_rotated_files(current), reverse=True)] + [current]


def _rotated_files(path: Path) -> list[tuple[int, Path]]:
    prefix = path.name + "."
    return [
        (int(p.name[len(prefix) :]), p)
        for p in path.parent.glob(glob_escape(prefix) + "*")
        if p.name[len(prefix) :].isdigit()
    ]


def _rotated(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def _open_lock(path: Path) -> int:
    """The sidecar lock file of a dead-letter file set (dead-letter.jsonl.lock)."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
    try:
        _keep_owner(fd, path.parent)  # the state dir belongs to the daemon's user
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _locked(path: Path, operation: int) -> Iterator[None]:
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # closing the last fd on the open file releases the lock


def _write_all(fd: int, data: bytes) -> None:
    # Usually one write. The kernel may take only part (a short write as the disk fills);
    # for an append, O_APPEND and the lock keep the parts contiguous. (A name of this
    # module's own, so tests can inject a failing disk here.)
    write_all(fd, data)


async def _outcome(written: asyncio.Future[None]) -> None:
    """Await a write that cannot be withdrawn, so that even a cancelled caller learns
    whether its line is in the file (see DeadLetterFile.append)."""
    cancelled = False
    while True:
        try:
            await asyncio.shield(written)
            break
        except asyncio.CancelledError:
            if written.cancelled():
                raise
            cancelled = True  # the line is being written or is next: wait for it
        except OSError:
            if cancelled:
                # The caller must keep its event, so it gets the OSError; the cancellation
                # held back is asked for again and ends the task at its next await.
                task = asyncio.current_task()
                if task is not None:
                    task.cancel()
            raise
    if cancelled:
        raise asyncio.CancelledError


def _iso_utc(epoch_s: float) -> str:
    return (
        datetime.fromtimestamp(epoch_s, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )
