from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from forwarder import deadletter
from forwarder.clock import FakeClock
from forwarder.deadletter import (
    DEAD_LETTER_NAME,
    DeadLetterFile,
    ReplayResult,
    read_entries,
    replay,
)
from forwarder.event import Event, Route


# Longest a LockHolder holds the lock: the bound that turns a blocked event loop into a
# failed assertion instead of a hung run.
HOLD_AT_MOST_S = 3.0


def ev(name: str, *, attempts: int = 1, padding: int = 0) -> Event:
    fields = {"event_name": name, "created_at": 1700000000, "user_id": "u-" + name}
    if padding:
        fields["metadata"] = {"note": "x" * padding}
    body = orjson.dumps(fields)
    return Event(
        body=body,
        key=name.encode().ljust(16, b"\0"),
        attempts=attempts,
        first_received_at=1_700_000_000.5,
    )


def lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def names_in(path: Path) -> list[str]:
    return [record["event"]["event_name"] for record in lines(path)]


def names_listed(state_dir: Path) -> list[str]:
    """What `dead-letters list` shows, oldest first."""
    return [e.record["event"]["event_name"] for e in read_entries(state_dir)]


def record_line(name: str, reason: str = "contact_not_found") -> bytes:
    """A dead-letter line in the daemon's format, for files a test writes by hand."""
    return orjson.dumps({"event": orjson.loads(ev(name).body), "route": "/events",
                         "reason": reason, "status": 404, "response": "", "attempts": 1,
                         "first_received_at": "2023-11-14T22:13:20.500Z",
                         "dead_lettered_at": "2023-11-14T22:15:00.000Z"}) + b"\n"


def temp_files(state_dir: Path) -> set[Path]:
    """The new versions of dead-letter files a replay is writing."""
    return set(state_dir.glob(f".{DEAD_LETTER_NAME}*.tmp"))


def within(timeout_s: float, condition: Callable[[], bool]) -> bool:
    """Bounded polling for a thread, which cannot await: True once condition holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


class LockHolder:
    """Another process holding the dead-letter lock, played by a thread with its own open
    file: flock belongs to the open file, so it shuts out the daemon's fd exactly as
    another process would. It lets go when while_held (run on its thread, under the lock)
    returns, or else at let_go() (the end of a with block) or after HOLD_AT_MOST_S."""

    def __init__(self, state_dir: Path, while_held: Callable[[], None] | None = None):
        self._path = state_dir / (DEAD_LETTER_NAME + ".lock")
        self._while_held = while_held
        self._held = threading.Event()
        self._let_go = threading.Event()
        self._thread = threading.Thread(target=self._hold, name="test-lock-holder")

    def take(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        assert self._held.wait(HOLD_AT_MOST_S), "the holder never got the lock"

    def let_go(self) -> None:
        self._let_go.set()
        self._thread.join(HOLD_AT_MOST_S)

    def __enter__(self) -> LockHolder:
        self.take()
        return self

    def __exit__(self, *exc: object) -> None:
        self.let_go()

    def _hold(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._held.set()
            if self._while_held is not None:
                self._while_held()
            else:
                self._let_go.wait(HOLD_AT_MOST_S)
        finally:
            os.close(fd)  # releases the lock


async def loop_turns(n: int) -> None:
    """Give the event loop n turns, as any other coroutine of the daemon would take them."""
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start_wall=1_700_000_100.0)


@pytest.fixture
def state_dir(tmp_path) -> Path:
    return tmp_path / "state"


@pytest.fixture
async def dead_letters(state_dir, clock) -> AsyncIterator[DeadLetterFile]:
    dl = DeadLetterFile(state_dir / DEAD_LETTER_NAME, max_bytes=1 << 20, keep_files=3, clock=clock)
    yield dl
    await dl.close()


async def add(dl: DeadLetterFile, name: str, reason: str = "contact_not_found",
              status=404) -> None:
    await dl.append(ev(name), reason=reason, status=status,
                    response_body=b'{"type":"error.list"}')


class IntakeStub:
    """A tiny intake: 202 for event names starting with "ok", 400 for the rest; records
    every body. on_request is awaited inside the handler, before the answer."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.on_request: Callable[[dict], Awaitable[None]] | None = None
        self.base_url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.bodies.append(body)
        event = orjson.loads(body)
        if self.on_request is not None:
            await self.on_request(event)
        if event["event_name"].startswith("ok"):
            return web.Response(status=202)
        return web.json_response({"type": "error.list", "errors": [{"code": "bad"}]}, status=400)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/events", self.handle)
        return app


@pytest.fixture
async def intake() -> AsyncIterator[IntakeStub]:
    stub = IntakeStub()
    runner = web.AppRunner(stub.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    stub.base_url = f"http://{host}:{port}"
    yield stub
    await runner.cleanup()


# -- append ------------------------------------------------------------------------------


async def test_an_appended_line_holds_the_event_and_why_it_was_refused(dead_letters, state_dir):
    event = ev("order-placed", attempts=2)
    await dead_letters.append(
        event, reason="contact_not_found", status=404, response_body=b'{"type":"error.list"}'
    )
    raw = (state_dir / DEAD_LETTER_NAME).read_bytes()
    assert raw.startswith(b'{"event":' + event.body + b',"route":"/events",')
    assert raw.endswith(b"}\n") and raw.count(b"\n") == 1
    assert orjson.loads(raw) == {
        "event": orjson.loads(event.body),
        "route": "/events",
        "reason": "contact_not_found",
        "status": 404,
        "response": '{"type":"error.list"}',
        "attempts": 2,
        "first_received_at": "2023-11-14T22:13:20.500Z",
        "dead_lettered_at": "2023-11-14T22:15:00.000Z",
    }


async def test_a_long_or_invalid_response_is_decoded_and_cut_to_2048_chars(dead_letters,
                                                                          state_dir):
    await dead_letters.append(
        ev("a"), reason="rejected", status=None, response_body=b"\xff" + b"x" * 5000
    )
    [record] = lines(state_dir / DEAD_LETTER_NAME)
    assert record["response"] == "\ufffd" + "x" * 2047
    assert record["status"] is None


async def test_the_directory_is_created_and_appends_accumulate(dead_letters, state_dir):
    assert not state_dir.exists()
    for name in ("a", "b", "c"):
        await add(dead_letters, name)
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["a", "b", "c"]
    assert (state_dir / DEAD_LETTER_NAME).stat().st_mode & 0o777 == 0o600


async def test_files_rotate_at_max_bytes_and_only_keep_files_are_kept(state_dir, clock):
    probe = DeadLetterFile(state_dir / "probe.jsonl", max_bytes=1 << 20, keep_files=0, clock=clock)
    await add(probe, "e0")
    await probe.close()
    line_bytes = (state_dir / "probe.jsonl").stat().st_size
    dl = DeadLetterFile(
        state_dir / DEAD_LETTER_NAME, max_bytes=2 * line_bytes, keep_files=2, clock=clock
    )
    for n in range(7):  # two lines per file: e0 e1 | e2 e3 | e4 e5 | e6
        await add(dl, f"e{n}")
    await dl.close()
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["e6"]
    assert names_in(state_dir / f"{DEAD_LETTER_NAME}.1") == ["e4", "e5"]
    assert names_in(state_dir / f"{DEAD_LETTER_NAME}.2") == ["e2", "e3"]
    assert not (state_dir / f"{DEAD_LETTER_NAME}.3").exists()
    assert [e.record["event"]["event_name"] for e in read_entries(state_dir)] == [
        "e2",
        "e3",
        "e4",
        "e5",
        "e6",
    ]


async def test_with_keep_files_0_a_full_file_is_discarded(state_dir, clock):
    dl = DeadLetterFile(state_dir / DEAD_LETTER_NAME, max_bytes=10, keep_files=0, clock=clock)
    await add(dl, "a")
    await add(dl, "b")
    await dl.close()
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["b"]
    assert sorted(os.listdir(state_dir)) == [DEAD_LETTER_NAME, DEAD_LETTER_NAME + ".lock"]


async def test_a_line_the_disk_refuses_half_way_is_cut_off_so_the_next_stays_readable(
        dead_letters, state_dir, monkeypatch):
    """Steps: a is written; the disk takes half of b's line, then says ENOSPC; c is
    written. Expect: b's append raises ENOSPC (the worker keeps b as a retry), and `list`
    reads a and c, with no corrupt line."""
    await add(dead_letters, "a")

    def half_then_enospc(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(deadletter, "_write_all", half_then_enospc)
        with pytest.raises(OSError) as refused:
            await add(dead_letters, "b")
    assert refused.value.errno == errno.ENOSPC
    await add(dead_letters, "c")
    with capture_logs() as logs:
        assert names_listed(state_dir) == ["a", "c"]
    assert logs == []


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A real 64 KiB filesystem (tmpfs), so that the disk really fills up; unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


async def test_on_a_full_disk_the_refused_line_leaves_nothing_behind(small_disk, clock):
    """Steps: another file takes half of a 64 KiB disk; dead letters of ~5 KB (more than a
    page, so the one that does not fit is written in part) are appended until the disk
    says ENOSPC; the other file is deleted; one more is appended. Expect: `list` reads
    every line that was accepted and the last one, and nothing corrupt."""
    (small_disk / "other").write_bytes(b"x" * 32 * 1024)
    dl = DeadLetterFile(small_disk / DEAD_LETTER_NAME, max_bytes=1 << 20, keep_files=0,
                        clock=clock)

    async def append(name: str) -> None:
        await dl.append(ev(name, padding=5000), reason="contact_not_found", status=404,
                        response_body=b"")

    accepted: list[str] = []
    try:
        for n in range(64):  # 64 lines of 5 KB are far more than the 32 KiB left
            try:
                await append(f"e{n}")
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
            accepted.append(f"e{n}")
        else:
            pytest.fail("the disk never filled up")
        (small_disk / "other").unlink()
        await append("after")
    finally:
        await dl.close()
    with capture_logs() as logs:
        assert names_listed(small_disk) == [*accepted, "after"]
    assert logs == []


async def test_an_append_waiting_for_another_process_lock_leaves_the_event_loop_running(
        dead_letters, state_dir):
    """Steps: another process holds the dead-letter lock; the daemon dead-letters an
    event; the loop's other coroutines take their turns; the holder lets go. Expect: the
    loop kept turning while the append waited for the lock, and then the line is written."""
    with LockHolder(state_dir):
        appending = asyncio.create_task(add(dead_letters, "a"))
        await loop_turns(100)
        assert not appending.done()
    await asyncio.wait_for(appending, HOLD_AT_MOST_S)
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["a"]


async def test_a_cancelled_append_still_lands_and_its_task_ends_only_after(dead_letters,
                                                                          state_dir):
    """Steps: another process holds the lock; the daemon dead-letters a, then b; b's task
    is cancelled (a stop), while its line waits behind a's; the holder lets go. Expect:
    b's task ends, cancelled, only after its line is written: both lines are in the file,
    in order, so the event has a known place."""
    with LockHolder(state_dir):
        first = asyncio.create_task(add(dead_letters, "a"))
        second = asyncio.create_task(add(dead_letters, "b"))
        await loop_turns(10)
        second.cancel()
        await loop_turns(100)
        assert not second.done()
    await asyncio.wait_for(first, HOLD_AT_MOST_S)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(second, HOLD_AT_MOST_S)
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["a", "b"]


async def test_a_cancelled_append_the_disk_refuses_still_says_so(dead_letters, state_dir,
                                                                   monkeypatch):
    """Steps: another process holds the lock; a worker dead-letters a and is cancelled (a
    stop) while it waits; the holder lets go and the disk refuses the line. Expect: the
    worker still gets the OSError, so it keeps the event, and its task ends cancelled."""

    def enospc(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(deadletter, "_write_all", enospc)
    kept: list[str] = []

    async def worker() -> None:
        try:
            await add(dead_letters, "a")
        except OSError:
            kept.append("a")  # what Workers does: the event waits as a retry

    with LockHolder(state_dir):
        working = asyncio.create_task(worker())
        await loop_turns(10)
        working.cancel()
        await loop_turns(100)
        assert not working.done()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(working, HOLD_AT_MOST_S)
    assert kept == ["a"]
    assert names_listed(state_dir) == []


async def test_close_lets_the_appends_already_made_finish(dead_letters, state_dir):
    """Steps: another process holds the lock; the daemon dead-letters a and b, then stops
    (close); the holder lets go. Expect: close returns only after both lines are written."""
    with LockHolder(state_dir):
        appends = [asyncio.create_task(add(dead_letters, name)) for name in ("a", "b")]
        await loop_turns(10)
        closing = asyncio.create_task(dead_letters.close())
        await loop_turns(100)
        assert not closing.done()
    await asyncio.wait_for(closing, HOLD_AT_MOST_S)
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["a", "b"]
    await asyncio.gather(*appends)


# -- read_entries ------------------------------------------------------------------------


async def test_entries_know_their_file_and_line_and_filter_by_reason(dead_letters, state_dir):
    await add(dead_letters, "a")
    await add(dead_letters, "b", reason="rejected", status=422)
    await add(dead_letters, "c")
    current = state_dir / DEAD_LETTER_NAME
    found = read_entries(state_dir, reason="contact_not_found")
    assert [(e.file, e.line, e.reason, e.status) for e in found] == [
        (current, 1, "contact_not_found", 404),
        (current, 3, "contact_not_found", 404),
    ]
    [rejected] = read_entries(state_dir, reason="rejected")
    assert rejected.body == ev("b").body
    assert rejected.route == Route.EVENTS.value


async def test_a_corrupt_line_is_reported_and_the_rest_still_read(dead_letters, state_dir):
    await add(dead_letters, "a")
    with open(state_dir / DEAD_LETTER_NAME, "ab") as f:
        f.write(b'{"event":{"event_name":"torn\n[1,2]\n')
    await add(dead_letters, "b")
    with capture_logs() as logs:
        found = read_entries(state_dir)
    assert [e.record["event"]["event_name"] for e in found] == ["a", "b"]
    assert [(e["event"], e["line"]) for e in logs] == [
        ("deadletter.corrupt_line", 2),
        ("deadletter.corrupt_line", 3),
    ]


def test_a_missing_state_dir_has_no_entries(tmp_path):
    assert read_entries(tmp_path / "nowhere") == []


# -- replay ------------------------------------------------------------------------------


async def test_replay_removes_only_what_the_intake_accepted(dead_letters, state_dir, intake):
    for name in ("ok-1", "bad-1", "ok-2", "bad-2"):
        await add(dead_letters, name)
    result = await replay(state_dir, base_url=intake.base_url)
    assert result.accepted == 2
    assert result.failed == 0
    assert [(e.record["event"]["event_name"], status) for e, status, _ in result.rejected] == [
        ("bad-1", 400),
        ("bad-2", 400),
    ]
    assert orjson.loads(result.rejected[0][2])["errors"] == [{"code": "bad"}]
    assert intake.bodies == [ev(n).body for n in ("ok-1", "bad-1", "ok-2", "bad-2")]
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["bad-1", "bad-2"]


async def test_replay_with_a_reason_sends_only_those_entries(dead_letters, state_dir, intake):
    await add(dead_letters, "ok-a", reason="rejected", status=422)
    await add(dead_letters, "ok-b")
    result = await replay(state_dir, base_url=intake.base_url, reason="contact_not_found")
    assert (result.accepted, result.rejected, result.failed) == (1, [], 0)
    assert intake.bodies == [ev("ok-b").body]
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["ok-a"]


async def test_replay_reaches_entries_in_rotated_files(state_dir, clock, intake):
    dl = DeadLetterFile(state_dir / DEAD_LETTER_NAME, max_bytes=10, keep_files=5, clock=clock)
    for name in ("ok-1", "bad-1", "ok-2"):
        await add(dl, name)
    await dl.close()
    result = await replay(state_dir, base_url=intake.base_url)
    assert result.accepted == 2
    assert [e.record["event"]["event_name"] for e in read_entries(state_dir)] == ["bad-1"]


async def test_a_line_appended_during_replay_is_kept(dead_letters, state_dir, clock, intake):
    """1. two entries; 2. while the intake answers, the daemon dead-letters another event
    (and rotates, so every line has moved file); 3. after the replay the accepted entries
    are gone and the new line is there."""
    await add(dead_letters, "ok-1")
    await add(dead_letters, "bad-1")
    # The daemon, with a limit so small that its next append rotates first.
    daemon = DeadLetterFile(state_dir / DEAD_LETTER_NAME, max_bytes=1, keep_files=3, clock=clock)

    async def dead_letter_meanwhile(event: dict) -> None:
        if event["event_name"] == "ok-1":
            await add(daemon, "new")

    intake.on_request = dead_letter_meanwhile
    result = await replay(state_dir, base_url=intake.base_url)
    await daemon.close()
    assert result.accepted == 1
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["new"]
    assert [e.record["event"]["event_name"] for e in read_entries(state_dir)] == ["bad-1", "new"]


async def replay_while_the_daemon_holds_the_lock(
        state_dir: Path, intake: IntakeStub, daemon_does: Callable[[], None]
) -> tuple[ReplayResult, bool]:
    """Replay, with the daemon holding the lock from the intake's first request until
    daemon_does returns; daemon_does runs under the lock once the replay has started
    writing a new file (or after HOLD_AT_MOST_S if it never does). Returns the replay's
    result and whether it wrote its new file while the daemon held the lock."""
    rewritten_meanwhile = threading.Event()

    def hold() -> None:
        if within(HOLD_AT_MOST_S, lambda: bool(temp_files(state_dir))):
            rewritten_meanwhile.set()
        daemon_does()

    holder = LockHolder(state_dir, while_held=hold)

    async def take_the_lock(event: dict) -> None:
        intake.on_request = None
        holder.take()

    intake.on_request = take_the_lock
    try:
        result = await replay(state_dir, base_url=intake.base_url)
    finally:
        holder.let_go()
    return result, rewritten_meanwhile.is_set()


async def test_a_replay_rewrites_while_the_daemon_holds_the_lock_and_keeps_its_new_line(
        dead_letters, state_dir, intake):
    """Steps: ok-1 and bad-1 are in the file; once the intake has ok-1, the daemon starts
    an append (holds the lock); the replay reads the file and writes its new version
    meanwhile; the daemon then adds its line (new) and lets go. Expect: the replay did its
    rewrite without waiting for the daemon, and only waited to swap the file in: ok-1 is
    gone, and bad-1 and new are there, in order."""
    await add(dead_letters, "ok-1")
    await add(dead_letters, "bad-1")

    def finish_the_append() -> None:
        with open(state_dir / DEAD_LETTER_NAME, "ab") as f:
            f.write(record_line("new"))

    result, rewritten_meanwhile = await replay_while_the_daemon_holds_the_lock(
        state_dir, intake, finish_the_append)
    assert rewritten_meanwhile
    assert result.accepted == 1
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["bad-1", "new"]


async def test_a_rotation_between_a_replays_read_and_its_swap_is_followed(
        dead_letters, state_dir, intake):
    """Steps: ok-1 and bad-1 are in the file; while the replay writes its new version, the
    daemon (holding the lock) rotates the file to .1 and starts a new one with its line
    new. Expect: the replay does not swap its stale copy over the new file; it finds ok-1
    in .1 and removes it there: .1 holds bad-1 and the current file holds new."""
    await add(dead_letters, "ok-1")
    await add(dead_letters, "bad-1")
    current = state_dir / DEAD_LETTER_NAME

    def rotate() -> None:
        os.replace(current, state_dir / f"{DEAD_LETTER_NAME}.1")
        current.write_bytes(record_line("new"))

    result, rewritten_meanwhile = await replay_while_the_daemon_holds_the_lock(
        state_dir, intake, rotate)
    assert rewritten_meanwhile
    assert result.accepted == 1
    assert names_in(state_dir / f"{DEAD_LETTER_NAME}.1") == ["bad-1"]
    assert names_in(current) == ["new"]
    assert not temp_files(state_dir)


async def test_a_long_replay_removes_exactly_what_was_accepted_while_appends_go_on(
        state_dir, clock, intake):
    """Steps: four files of 5,000 entries kept for another reason, with 50 ok-* entries
    spread through each; replay --reason contact_not_found; meanwhile the daemon keeps
    dead-lettering new-* events until the replay returns. Expect: the 200 ok-* entries are
    gone, every other line and every new-* line is there once, in order; and some appends
    were made and done while the replay was writing a new file (it did not hold them)."""
    state_dir.mkdir()
    kept: list[str] = []
    for suffix in (".3", ".2", ".1", ""):
        data = []
        for n in range(5050):
            if n % 101 == 50:
                data.append(record_line(f"ok{suffix}-{n}"))
            else:
                kept.append(f"kept{suffix}-{n}")
                data.append(record_line(kept[-1], reason="rejected"))
        (state_dir / (DEAD_LETTER_NAME + suffix)).write_bytes(b"".join(data))
    daemon = DeadLetterFile(state_dir / DEAD_LETTER_NAME, max_bytes=1 << 30, keep_files=5,
                            clock=clock)
    replaying = asyncio.create_task(
        replay(state_dir, base_url=intake.base_url, reason="contact_not_found"))
    appended: list[str] = []
    done_during_a_rewrite = 0
    try:
        while not replaying.done():
            before = temp_files(state_dir)
            appended.append(f"new-{len(appended)}")
            await add(daemon, appended[-1], reason="rejected", status=422)
            if before & temp_files(state_dir):  # the same new file, still being written
                done_during_a_rewrite += 1
            await asyncio.sleep(0)  # the replay's turn, even if an append never yielded
    finally:
        await daemon.close()
    result = await replaying
    assert (result.accepted, result.rejected, result.failed) == (200, [], 0)
    assert names_listed(state_dir) == kept + appended
    assert done_during_a_rewrite > 0


async def test_an_append_after_a_replay_lands_in_the_rewritten_file(
    dead_letters, state_dir, intake
):
    await add(dead_letters, "ok-1")
    await add(dead_letters, "bad-1")
    await replay(state_dir, base_url=intake.base_url)
    await add(dead_letters, "after")
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["bad-1", "after"]


async def test_replay_through_the_unix_socket(dead_letters, state_dir, tmp_path):
    stub = IntakeStub()
    runner = web.AppRunner(stub.app())
    await runner.setup()
    sock = str(tmp_path / "intake.sock")
    await web.UnixSite(runner, sock).start()
    try:
        await add(dead_letters, "ok-1")
        await add(dead_letters, "bad-1")
        result = await replay(state_dir, unix_socket=sock)
    finally:
        await runner.cleanup()
    assert (result.accepted, len(result.rejected), result.failed) == (1, 1, 0)
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["bad-1"]


async def test_with_the_daemon_down_nothing_is_removed_and_all_count_as_failed(
    dead_letters, state_dir, tmp_path
):
    await add(dead_letters, "ok-1")
    await add(dead_letters, "ok-2")
    before = (state_dir / DEAD_LETTER_NAME).read_bytes()
    with capture_logs() as logs:
        result = await replay(state_dir, unix_socket=str(tmp_path / "no-daemon.sock"))
    assert (result.accepted, result.rejected, result.failed) == (0, [], 2)
    assert (state_dir / DEAD_LETTER_NAME).read_bytes() == before
    assert [e["event"] for e in logs] == ["deadletter.replay_unreachable"]


async def test_replay_needs_exactly_one_way_to_reach_the_daemon(state_dir):
    with pytest.raises(ValueError):
        await replay(state_dir)
    with pytest.raises(ValueError):
        await replay(state_dir, base_url="http://127.0.0.1:1", unix_socket="/tmp/x.sock")


async def test_replay_removes_one_copy_per_accepted_entry(dead_letters, state_dir, intake):
    """The daemon dead-letters the very same event again (same line, byte for byte) while
    the replay is running: only the copy that was replayed is removed."""
    await add(dead_letters, "ok-1")
    intake.on_request = lambda event: add(dead_letters, "ok-1")
    result = await replay(state_dir, base_url=intake.base_url)
    assert result.accepted == 1
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["ok-1"]


async def test_rotation_drops_files_beyond_a_lowered_keep_files(state_dir, clock):
    state_dir.mkdir()
    for n in range(1, 5):
        (state_dir / f"{DEAD_LETTER_NAME}.{n}").write_bytes(b"")
    dl = DeadLetterFile(state_dir / DEAD_LETTER_NAME, max_bytes=10, keep_files=2, clock=clock)
    await add(dl, "a")
    await add(dl, "b")
    await dl.close()
    assert sorted(p for p in os.listdir(state_dir) if not p.endswith(".lock")) == [
        DEAD_LETTER_NAME,
        f"{DEAD_LETTER_NAME}.1",
        f"{DEAD_LETTER_NAME}.2",
    ]
    assert names_in(state_dir / f"{DEAD_LETTER_NAME}.1") == ["a"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can create files for another user")
async def test_a_replay_run_as_root_leaves_the_files_to_the_daemons_user(state_dir, clock,
                                                                          intake):
    """Steps: the daemon's user (nobody) owns the state dir and the dead-letter file; root
    replays. Expect: the rewritten file and the lock file still belong to nobody, so the
    daemon can go on appending."""
    import pwd
    nobody = pwd.getpwnam("nobody")
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chown(state_dir, nobody.pw_uid, nobody.pw_gid)
    daemon_side = DeadLetterFile(state_dir / DEAD_LETTER_NAME, max_bytes=1 << 20,
                                 keep_files=2, clock=clock)
    for name in ("ok-1", "bad-1"):
        await add(daemon_side, name)
    await daemon_side.close()
    for p in state_dir.iterdir():
        os.chown(p, nobody.pw_uid, nobody.pw_gid)
    await replay(state_dir, base_url=intake.base_url)
    owners = {p.name: (p.stat().st_uid, oct(p.stat().st_mode & 0o777))
              for p in state_dir.iterdir()}
    assert owners[DEAD_LETTER_NAME] == (nobody.pw_uid, "0o600")
    assert owners[DEAD_LETTER_NAME + ".lock"][0] == nobody.pw_uid
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["bad-1"]
