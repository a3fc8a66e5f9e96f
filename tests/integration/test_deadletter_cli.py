"""`intercom-forwarder dead-letters list|replay` as an operator runs it: `python -m forwarder
dead-letters ...` in a subprocess, configured only by FORWARDER_* variables that point at
a daemon started in the test (its state dir, its intake port or Unix socket).

The daemon's Intercom does not know contact "ghost", so events for it are dead-lettered
as contact_not_found; one other event is refused with a 400 (reason rejected) so the
--reason filter has something to leave alone. The CLI runs asynchronously because the
daemon it replays through shares the test's event loop. The last test stands another
process beside the daemon that holds the dead-letter lock, as a stuck CLI run would.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from forwarder.fake_intercom import FakeIntercom
from forwarder.service import Service
from tests.conftest import TOKEN, wait_until

# A process that holds the dead-letter lock (argv[1]) until its stdin closes, or argv[2]
# seconds at most: a daemon that blocks its event loop on the lock must fail, not hang.
HOLD_LOCK = """
import fcntl, select, sys
with open(sys.argv[1], "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    print("held", flush=True)
    select.select([sys.stdin], [], [], float(sys.argv[2]))
"""

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_700_000_000
CLOCK_AT = "2023-11-14T22:13:20.000Z"  # the FakeClock's wall time, as the file writes it

REFUSED = {"event_name": "placed-order", "created_at": NOW, "user_id": "u-bad"}
GHOSTS = [
    {"event_name": "invited-friend", "created_at": NOW + 1, "user_id": "ghost"},
    {"event_name": "invited-friend", "created_at": NOW + 2, "user_id": "ghost",
     "metadata": {"invitee_email": "pi@example.org", "price": {"amount": 2999,
                                                               "currency": "usd"}}},
]


@pytest.fixture
async def intercom() -> AsyncIterator[FakeIntercom]:
    fake = FakeIntercom(token=TOKEN, unknown_contacts=["ghost"])
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def dead_letter_path(svc: Service) -> Path:
    return Path(svc.config.storage.state_dir) / "dead-letter.jsonl"


def dead_letter_lines(svc: Service) -> list[dict]:
    path = dead_letter_path(svc)
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


async def post(svc: Service, obj: dict) -> None:
    async with aiohttp.ClientSession() as s, s.post(svc.url + "/events",
                                                    data=orjson.dumps(obj)) as r:
        assert r.status == 202


async def daemon_with_dead_letters(make_service, intercom: FakeIntercom, clock) -> Service:
    """A running daemon whose dead-letter file holds REFUSED (rejected), then GHOSTS
    (contact_not_found), in that order."""
    svc = await make_service(clock=clock, upstream_url=intercom.url)
    intercom.script(400)  # the next POST, which must be REFUSED's: post it alone
    await post(svc, REFUSED)
    await wait_until(lambda: len(dead_letter_lines(svc)) == 1)
    for ghost in GHOSTS:
        await post(svc, ghost)
    await wait_until(lambda: len(dead_letter_lines(svc)) == 3)
    return svc


def cli_env(svc: Service, transport: str = "tcp") -> dict[str, str]:
    """The environment that points the CLI at svc (read while svc runs: its port).
    transport "unix" gives the daemon's socket and a TCP port nobody listens on (1), so
    a replay can only arrive through the socket."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FORWARDER_")
           and k not in ("INTERCOM_ACCESS_TOKEN", "CREDENTIALS_DIRECTORY")}
    env["FORWARDER_STORAGE__STATE_DIR"] = svc.config.storage.state_dir
    if transport == "unix":
        env["FORWARDER_INTAKE__PORT"] = "1"
        env["FORWARDER_INTAKE__UNIX_SOCKET"] = svc.config.intake.unix_socket
    else:
        env["FORWARDER_INTAKE__PORT"] = str(svc.listener.port)
        env["FORWARDER_INTAKE__UNIX_SOCKET"] = ""
    return env


async def dead_letters(svc: Service, *args: str, transport: str = "tcp",
                       env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `python -m forwarder dead-letters ARGS` against svc; returns code, stdout, stderr."""
    env = env if env is not None else cli_env(svc, transport)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "forwarder", "dead-letters", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(), err.decode()


def json_lines(text: str) -> list[dict]:
    return [orjson.loads(line) for line in text.splitlines()]


def replay_summary(out: str) -> dict:
    """replay's summary: stdout is exactly one JSON line (its logs go to stderr)."""
    [line] = out.splitlines()
    return orjson.loads(line)


async def test_list_with_a_reason_prints_each_such_dead_letter_as_one_json_line(
        make_service, intercom, clock):
    svc = await daemon_with_dead_letters(make_service, intercom, clock)
    code, out, err = await dead_letters(svc, "list", "--reason", "contact_not_found")
    assert (code, err) == (0, "")
    lines = json_lines(out)
    assert [line["event"] for line in lines] == GHOSTS
    for line in lines:
        assert line["reason"] == "contact_not_found"
        assert line["status"] == 404
        assert line["attempts"] == 1
        assert line["route"] == "/events"
        assert "not_found" in line["response"]
        assert line["first_received_at"] == line["dead_lettered_at"] == CLOCK_AT


async def test_list_without_a_reason_prints_every_dead_letter_oldest_first(
        make_service, intercom, clock):
    svc = await daemon_with_dead_letters(make_service, intercom, clock)
    code, out, err = await dead_letters(svc, "list")
    assert (code, err) == (0, "")
    lines = json_lines(out)
    assert [line["event"] for line in lines] == [REFUSED, *GHOSTS]
    assert [line["reason"] for line in lines] == ["rejected", "contact_not_found",
                                                  "contact_not_found"]
    assert lines[0]["status"] == 400 and "error.list" in lines[0]["response"]


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_replay_after_the_contact_exists_delivers_them_and_removes_only_those(
        make_service, intercom, clock, transport):
    """Steps: ghost is unknown, two events for it are dead-lettered beside one rejected;
    the contact is created; replay --reason contact_not_found. Expect: exit 0, both
    accepted and delivered to Intercom, and only the rejected entry left in the file."""
    svc = await daemon_with_dead_letters(make_service, intercom, clock)
    intercom.unknown_contacts = set()
    code, out, _err = await dead_letters(svc, "replay", "--reason", "contact_not_found",
                                        transport=transport)
    assert code == 0
    assert replay_summary(out) == {"accepted": 2, "rejected": 0, "failed": 0}
    await intercom.wait_for_delivered(2)
    assert sorted(intercom.delivered, key=repr) == sorted(GHOSTS, key=repr)
    assert [line["event"] for line in dead_letter_lines(svc)] == [REFUSED]
    code, out, _ = await dead_letters(svc, "list", "--reason", "contact_not_found")
    assert (code, out) == (0, "")


async def test_replay_keeps_an_entry_the_intake_rejects_and_exits_1(
        make_service, intercom, clock):
    """Steps: a dead letter whose event the intake refuses (empty event_name) is appended
    by hand; the contact is created; replay. Expect: exit 1, the two good ones accepted
    and removed, the bad one still in the file byte for byte, next to the rejected one."""
    svc = await daemon_with_dead_letters(make_service, intercom, clock)
    bad = orjson.dumps({"event": {"event_name": "", "created_at": NOW, "user_id": "ghost"},
                        "route": "/events", "reason": "contact_not_found", "status": 404,
                        "response": "", "attempts": 1, "first_received_at": CLOCK_AT,
                        "dead_lettered_at": CLOCK_AT})
    with dead_letter_path(svc).open("ab") as f:
        f.write(bad + b"\n")
    intercom.unknown_contacts = set()
    code, out, _ = await dead_letters(svc, "replay", "--reason", "contact_not_found")
    assert code == 1
    assert replay_summary(out) == {"accepted": 2, "rejected": 1, "failed": 0}
    await intercom.wait_for_delivered(2)
    assert sorted(intercom.delivered, key=repr) == sorted(GHOSTS, key=repr)
    raw = dead_letter_path(svc).read_bytes().splitlines()
    assert len(raw) == 2
    assert orjson.loads(raw[0])["event"] == REFUSED
    assert raw[1] == bad


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_replay_with_the_daemon_down_removes_nothing_and_exits_1(
        make_service, intercom, clock, transport):
    svc = await daemon_with_dead_letters(make_service, intercom, clock)
    env = cli_env(svc, transport)
    await svc.stop()
    before = dead_letter_path(svc).read_bytes()
    intercom.unknown_contacts = set()
    code, out, _ = await dead_letters(svc, "replay", env=env)
    assert code == 1
    assert replay_summary(out) == {"accepted": 0, "rejected": 0, "failed": 3}
    assert dead_letter_path(svc).read_bytes() == before
    assert len(intercom.requests) == 3  # only the original attempts ever reached Intercom


async def test_the_cli_writes_only_json_to_stdout_and_its_log_lines_to_stderr(
        make_service, intercom, clock):
    """Steps: a line that is not a dead-letter record is in the file; list, then replay.
    Expect: stdout is only the JSON lines `| jq` reads; deadletter.corrupt_line and
    deadletter.replayed go to stderr."""
    svc = await daemon_with_dead_letters(make_service, intercom, clock)
    with dead_letter_path(svc).open("ab") as f:
        f.write(b"not a dead letter\n")
    code, out, err = await dead_letters(svc, "list", "--reason", "contact_not_found")
    assert code == 0
    assert [line["event"] for line in json_lines(out)] == GHOSTS
    assert "deadletter.corrupt_line" in err
    intercom.unknown_contacts = set()
    code, out, err = await dead_letters(svc, "replay", "--reason", "contact_not_found")
    assert code == 0
    assert json_lines(out) == [{"accepted": 2, "rejected": 0, "failed": 0}]
    assert "deadletter.replayed" in err


async def test_the_daemon_keeps_answering_while_another_process_holds_the_dead_letter_lock(
        make_service, intercom, clock):
    """Steps: another process holds dead-letter.jsonl.lock; Intercom refuses an event for
    ghost with 404, so the daemon has a dead letter to append; an app posts another event;
    the other process exits. Expect: that post is answered 202 while the dead letter still
    waits for the lock (the event loop is not stuck on it), and once the lock is free the
    dead letter is in the file."""
    svc = await make_service(clock=clock, upstream_url=intercom.url)
    lock_path = dead_letter_path(svc).with_name("dead-letter.jsonl.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLD_LOCK, str(lock_path), "3", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    try:
        assert await asyncio.wait_for(holder.stdout.readline(), 10) == b"held\n"
        await post(svc, GHOSTS[0])
        await wait_until(lambda: svc.metrics.registry.get_sample_value(
            "intercom_forwarder_upstream_requests_total", {"status": "404"}) == 1)
        await post(svc, {"event_name": "placed-order", "created_at": NOW, "user_id": "u-ok"})
        assert dead_letter_lines(svc) == []
    finally:
        holder.stdin.close()
        await holder.wait()
    await wait_until(lambda: len(dead_letter_lines(svc)) == 1)
    assert dead_letter_lines(svc)[0]["event"] == GHOSTS[0]
