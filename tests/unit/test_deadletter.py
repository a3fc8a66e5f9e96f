from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from forwarder.clock import FakeClock
from forwarder.deadletter import (
    DEAD_LETTER_NAME,
    DeadLetterFile,
    read_entries,
    replay,
)
from forwarder.event import Event, Route


def ev(name: str, *, attempts: int = 1) -> Event:
    body = orjson.dumps({"event_name": name, "created_at": 1700000000, "user_id": "u-" + name})
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


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start_wall=1_700_000_100.0)


@pytest.fixture
def state_dir(tmp_path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def dead_letters(state_dir, clock) -> DeadLetterFile:
    dl = DeadLetterFile(state_dir / DEAD_LETTER_NAME, max_bytes=1 << 20, keep_files=3, clock=clock)
    yield dl
    dl.close()


def add(dl: DeadLetterFile, name: str, reason: str = "contact_not_found", status=404) -> None:
    dl.append(ev(name), reason=reason, status=status, response_body=b'{"type":"error.list"}')


class IntakeStub:
    """A tiny intake: 202 for event names starting with "ok", 400 for the rest; records
    every body. on_request runs inside the handler, before the answer."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.on_request: Callable[[dict], None] | None = None
        self.base_url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.bodies.append(body)
        event = orjson.loads(body)
        if self.on_request is not None:
            self.on_request(event)
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


def test_an_appended_line_holds_the_event_and_why_it_was_refused(dead_letters, state_dir):
    event = ev("order-placed", attempts=2)
    dead_letters.append(
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


def test_a_long_or_invalid_response_is_decoded_and_cut_to_2048_chars(dead_letters, state_dir):
    dead_letters.append(
        ev("a"), reason="rejected", status=None, response_body=b"\xff" + b"x" * 5000
    )
    [record] = lines(state_dir / DEAD_LETTER_NAME)
    assert record["response"] == "\ufffd" + "x" * 2047
    assert record["status"] is None


def test_the_directory_is_created_and_appends_accumulate(dead_letters, state_dir):
    assert not state_dir.exists()
    for name in ("a", "b", "c"):
        add(dead_letters, name)
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["a", "b", "c"]
    assert (state_dir / DEAD_LETTER_NAME).stat().st_mode & 0o777 == 0o600


def test_files_rotate_at_max_bytes_and_only_keep_files_are_kept(state_dir, clock):
    probe = DeadLetterFile(state_dir / "probe.jsonl", max_bytes=1 << 20, keep_files=0, clock=clock)
    add(probe, "e0")
    probe.close()
    line_bytes = (state_dir / "probe.jsonl").stat().st_size
    dl = DeadLetterFile(
        state_dir / DEAD_LETTER_NAME, max_bytes=2 * line_bytes, keep_files=2, clock=clock
    )
    for n in range(7):  # two lines per file: e0 e1 | e2 e3 | e4 e5 | e6
        add(dl, f"e{n}")
    dl.close()
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


def test_with_keep_files_0_a_full_file_is_discarded(state_dir, clock):
    dl = DeadLetterFile(state_dir / DEAD_LETTER_NAME, max_bytes=10, keep_files=0, clock=clock)
    add(dl, "a")
    add(dl, "b")
    dl.close()
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["b"]
    assert sorted(os.listdir(state_dir)) == [DEAD_LETTER_NAME, DEAD_LETTER_NAME + ".lock"]


# -- read_entries ------------------------------------------------------------------------


def test_entries_know_their_file_and_line_and_filter_by_reason(dead_letters, state_dir):
    add(dead_letters, "a")
    add(dead_letters, "b", reason="rejected", status=422)
    add(dead_letters, "c")
    current = state_dir / DEAD_LETTER_NAME
    found = read_entries(state_dir, reason="contact_not_found")
    assert [(e.file, e.line, e.reason, e.status) for e in found] == [
        (current, 1, "contact_not_found", 404),
        (current, 3, "contact_not_found", 404),
    ]
    [rejected] = read_entries(state_dir, reason="rejected")
    assert rejected.body == ev("b").body
    assert rejected.route == Route.EVENTS.value


def test_a_corrupt_line_is_reported_and_the_rest_still_read(dead_letters, state_dir):
    add(dead_letters, "a")
    with open(state_dir / DEAD_LETTER_NAME, "ab") as f:
        f.write(b'{"event":{"event_name":"torn\n[1,2]\n')
    add(dead_letters, "b")
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
        add(dead_letters, name)
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
    add(dead_letters, "ok-a", reason="rejected", status=422)
    add(dead_letters, "ok-b")
    result = await replay(state_dir, base_url=intake.base_url, reason="contact_not_found")
    assert (result.accepted, result.rejected, result.failed) == (1, [], 0)
    assert intake.bodies == [ev("ok-b").body]
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["ok-a"]


async def test_replay_reaches_entries_in_rotated_files(state_dir, clock, intake):
    dl = DeadLetterFile(state_dir / DEAD_LETTER_NAME, max_bytes=10, keep_files=5, clock=clock)
    for name in ("ok-1", "bad-1", "ok-2"):
        add(dl, name)
    dl.close()
    result = await replay(state_dir, base_url=intake.base_url)
    assert result.accepted == 2
    assert [e.record["event"]["event_name"] for e in read_entries(state_dir)] == ["bad-1"]


async def test_a_line_appended_during_replay_is_kept(dead_letters, state_dir, clock, intake):
    """1. two entries; 2. while the intake answers, the daemon dead-letters another event
    (and rotates, so every line has moved file); 3. after the replay the accepted entries
    are gone and the new line is there."""
    add(dead_letters, "ok-1")
    add(dead_letters, "bad-1")
    # The daemon, with a limit so small that its next append rotates first.
    daemon = DeadLetterFile(state_dir / DEAD_LETTER_NAME, max_bytes=1, keep_files=3, clock=clock)

    def dead_letter_meanwhile(event: dict) -> None:
        if event["event_name"] == "ok-1":
            add(daemon, "new")

    intake.on_request = dead_letter_meanwhile
    result = await replay(state_dir, base_url=intake.base_url)
    daemon.close()
    assert result.accepted == 1
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["new"]
    assert [e.record["event"]["event_name"] for e in read_entries(state_dir)] == ["bad-1", "new"]


async def test_an_append_after_a_replay_lands_in_the_rewritten_file(
    dead_letters, state_dir, intake
):
    add(dead_letters, "ok-1")
    add(dead_letters, "bad-1")
    await replay(state_dir, base_url=intake.base_url)
    add(dead_letters, "after")
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["bad-1", "after"]


async def test_replay_through_the_unix_socket(dead_letters, state_dir, tmp_path):
    stub = IntakeStub()
    runner = web.AppRunner(stub.app())
    await runner.setup()
    sock = str(tmp_path / "intake.sock")
    await web.UnixSite(runner, sock).start()
    try:
        add(dead_letters, "ok-1")
        add(dead_letters, "bad-1")
        result = await replay(state_dir, unix_socket=sock)
    finally:
        await runner.cleanup()
    assert (result.accepted, len(result.rejected), result.failed) == (1, 1, 0)
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["bad-1"]


async def test_with_the_daemon_down_nothing_is_removed_and_all_count_as_failed(
    dead_letters, state_dir, tmp_path
):
    add(dead_letters, "ok-1")
    add(dead_letters, "ok-2")
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
    add(dead_letters, "ok-1")
    intake.on_request = lambda event: add(dead_letters, "ok-1")
    result = await replay(state_dir, base_url=intake.base_url)
    assert result.accepted == 1
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["ok-1"]


def test_rotation_drops_files_beyond_a_lowered_keep_files(state_dir, clock):
    state_dir.mkdir()
    for n in range(1, 5):
        (state_dir / f"{DEAD_LETTER_NAME}.{n}").write_bytes(b"")
    dl = DeadLetterFile(state_dir / DEAD_LETTER_NAME, max_bytes=10, keep_files=2, clock=clock)
    add(dl, "a")
    add(dl, "b")
    dl.close()
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
        add(daemon_side, name)
    daemon_side.close()
    for p in state_dir.iterdir():
        os.chown(p, nobody.pw_uid, nobody.pw_gid)
    await replay(state_dir, base_url=intake.base_url)
    owners = {p.name: (p.stat().st_uid, oct(p.stat().st_mode & 0o777))
              for p in state_dir.iterdir()}
    assert owners[DEAD_LETTER_NAME] == (nobody.pw_uid, "0o600")
    assert owners[DEAD_LETTER_NAME + ".lock"][0] == nobody.pw_uid
    assert names_in(state_dir / DEAD_LETTER_NAME) == ["bad-1"]
