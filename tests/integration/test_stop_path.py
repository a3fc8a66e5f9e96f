"""The stop path keeps every event answered 202: a cancelled stop, a full disk, a failing
stage, a summary cut off on the wire, and a drain that cannot send anything more."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from pathlib import Path

import aiohttp
import orjson
import pytest

from forwarder.fake_intercom import Fault
from forwarder.service import Service
from tests.conftest import base_config, wait_until

NOW = 1_700_000_000


def event(i: int) -> dict:
    return {"event_name": "signed-up", "created_at": NOW + i, "user_id": f"u{i}"}


async def post(svc, obj: object, path: str = "/events") -> int:
    async with aiohttp.ClientSession() as s, s.post(svc.url + path,
                                                    data=orjson.dumps(obj)) as r:
        return r.status


async def post_batch(svc, events: list[dict]) -> dict:
    async with aiohttp.ClientSession() as s, s.post(svc.url + "/events/batch",
                                                    data=orjson.dumps(events)) as r:
        assert r.status == 202
        return await r.json()


def spooled(svc) -> list[dict]:
    path = Path(svc.config.storage.state_dir) / "spool.jsonl"
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def dead_letters(svc) -> list[dict]:
    path = Path(svc.config.storage.state_dir) / "dead-letter.jsonl"
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def events_named(logs: list[dict], name: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("forwarder-worker-")]


async def test_a_cancelled_stop_still_spools_everything_and_a_second_stop_waits_for_it(
        make_service, fake_intercom, clock, captured_logs):
    """Steps: Intercom answers 500, so three events wait for retries; stop() is called
    with a drain that waits on the (fake) clock, and that call is cancelled; stop() is
    called again. Expect: the second call returns only once all three are in the spool
    and no worker task is left running."""
    fake_intercom.script(*[500] * 200)
    svc = await make_service(clock=clock, shutdown={"drain_seconds": 30},
                             retry={"base_delay_seconds": 1, "max_delay_seconds": 1,
                                    "max_attempts": 1000})
    for i in range(3):
        assert await post(svc, event(i)) == 202
    await wait_until(lambda: svc.queue.waiting == 3)
    first = asyncio.create_task(svc.stop())
    await wait_until(lambda: events_named(captured_logs, "service.drain_started") != [])
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first

    second = asyncio.create_task(svc.stop())
    for _ in range(40):  # the drain's 29.5 s pass on the fake clock, 1 s at a time
        await asyncio.sleep(0.02)
        if second.done():
            break
        clock.advance(1)
    await asyncio.wait_for(second, 5)
    assert sorted(line["body"]["created_at"] for line in spooled(svc)) == [NOW, NOW + 1,
                                                                            NOW + 2]
    assert all(t.done() for t in worker_tasks())


async def test_a_full_disk_at_stop_keeps_what_fits_logs_the_loss_and_closes_everything(
        tmp_path, make_service, fake_intercom, clock, captured_logs):
    """Steps: the state dir is a 64 KB tmpfs; Intercom is unreachable, so 2,000
    accepted events wait for retries; stop. Expect: the spool keeps as many whole events
    as fit, spool.write_failed at error counts the rest, the exit code is non-zero, and
    the intake and the upstream client are closed."""
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "state"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        svc = await make_service(clock=clock, shutdown={"drain_seconds": 0},
                                 upstream_url=f"http://127.0.0.1:{free_port()}")
        for start in range(0, 2000, 500):
            assert (await post_batch(svc, [event(i) for i in range(start, start + 500)])
                    )["accepted"] == 500
        url = svc.url
        await svc.stop()
        [failed] = events_named(captured_logs, "spool.write_failed")
        assert failed["log_level"] == "error"
        kept = len(spooled(svc))
        assert 0 < kept == failed["written"] and failed["lost"] == 2000 - kept
        assert failed["reason"] == "No space left on device"
        assert svc.exit_code == 1
        assert events_named(captured_logs, "service.stopped")  # the rest of the stop ran
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as s:
                await s.post(url + "/events", data=orjson.dumps(event(0)))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_failing_rate_gate_release_keeps_the_event_and_is_logged(
        make_service, fake_intercom, clock, captured_logs, monkeypatch):
    """Steps: Intercom answers 500; the rate gate's release() raises (a bug). Expect: the
    event is kept (it waits as a retry and is spooled at stop), the failure is logged as
    service.worker_crashed, and the service stops with exit code 1."""
    fake_intercom.script(500)
    svc = await make_service(clock=clock, shutdown={"drain_seconds": 0})

    def broken_release(*args: object, **kwargs: object) -> None:
        raise RuntimeError("gate bug")

    monkeypatch.setattr(svc.gate, "release", broken_release)
    assert await post(svc, event(0)) == 202
    await wait_until(lambda: events_named(captured_logs, "service.worker_crashed") != [])
    await svc.stop()
    assert [line["body"]["created_at"] for line in spooled(svc)] == [NOW]
    assert svc.exit_code == 1
    assert "gate bug" in events_named(captured_logs, "service.worker_crashed")[0]["error"]


async def test_a_failure_while_stopping_is_logged_not_discarded(
        make_service, fake_intercom, captured_logs, monkeypatch):
    """Steps: a send is on the wire when the stop begins; its answer arrives within the
    grace and the gate's release() raises then. Expect: service.worker_crashed is logged
    (it used to vanish once stopping), the event is delivered, not lost, and exit is 1."""
    fake_intercom.script(Fault.slow(0.2))
    svc = await make_service(shutdown={"drain_seconds": 0.5})
    assert await post(svc, event(0)) == 202
    await fake_intercom.wait_for_requests(1)

    def broken_release(*args: object, **kwargs: object) -> None:
        raise RuntimeError("gate bug while stopping")

    monkeypatch.setattr(svc.gate, "release", broken_release)
    await svc.stop()
    [crash] = events_named(captured_logs, "service.worker_crashed")
    assert "gate bug while stopping" in crash["error"]
    assert len(fake_intercom.delivered) == 1 and spooled(svc) == []
    assert svc.exit_code == 1


async def test_a_summary_cut_off_on_the_wire_at_stop_is_dead_lettered_not_resent(
        make_service, fake_intercom):
    """Summaries have no dedup key: Intercom would count a resend twice.
    Steps: a summary and an event are both on the wire (Intercom takes 5 s to answer)
    when the stop's 0.5 s grace runs out. Expect: the summary is in the dead-letter file
    as unknown_outcome (and not in the spool), the event is in the spool to be resent
    (Intercom drops it as a duplicate if it had arrived)."""
    fake_intercom.script(Fault.slow(5), Fault.slow(5))
    svc = await make_service(shutdown={"drain_seconds": 0.5})
    summary = {"user_id": "u1", "event_summaries": {"event_name": "placed-order",
                                                    "count": 3, "first": NOW - 60,
                                                    "last": NOW}}
    async with aiohttp.ClientSession() as s, s.post(svc.url + "/events/summaries",
                                                    data=orjson.dumps(summary)) as r:
        assert r.status == 200
    assert await post(svc, event(0)) == 202
    await fake_intercom.wait_for_requests(2)
    await svc.stop()
    [entry] = dead_letters(svc)
    assert entry["reason"] == "unknown_outcome" and entry["route"] == "/events/summaries"
    assert entry["event"]["event_summaries"]["count"] == 3
    assert [line["route"] for line in spooled(svc)] == ["/events"]
    assert svc.metrics.registry.get_sample_value(
        "intercom_forwarder_events_forwarded_total",
        {"result": "dead_lettered", "reason": "unknown_outcome"}) == 1


async def test_the_drain_ends_at_once_when_the_rate_gate_holds_past_its_deadline(
        make_service, fake_intercom, clock, captured_logs):
    """Steps: Intercom's window is spent (a 429 whose reset is 10 s ahead); 3 events wait;
    stop with drain_seconds=5. Expect: the stop does not wait for the clock at all (it
    used to sit out the whole drain): all 3 are spooled at once."""
    fake_intercom.script(Fault.rate_limited)
    # The 429's reset is a whole window (10 s) ahead of the fake clock's wall time.
    svc = await make_service(clock=clock, shutdown={"drain_seconds": 5},
                             rate_limit={"per_seconds": 10})
    for i in range(3):
        assert await post(svc, event(i)) == 202
    await wait_until(lambda: svc.gate.held_until is not None)
    await asyncio.wait_for(svc.stop(), 3)  # the FakeClock never moves: no waiting on it
    assert len(spooled(svc)) == 3
    assert events_named(captured_logs, "service.drain_cut_short")


async def test_the_drain_ends_at_once_when_every_retry_is_due_after_its_deadline(
        make_service, fake_intercom, clock):
    fake_intercom.script(500)
    svc = await make_service(clock=clock, shutdown={"drain_seconds": 10},
                             retry={"base_delay_seconds": 3600, "max_delay_seconds": 3600})
    assert await post(svc, event(0)) == 202
    await wait_until(lambda: svc.queue.waiting == 1)
    if svc.queue.next_due - clock.monotonic() < 10:
        pytest.skip("the seeded jitter drew a retry inside the drain")
    await asyncio.wait_for(svc.stop(), 3)
    assert len(spooled(svc)) == 1


async def test_a_start_that_fails_logs_no_drain_and_no_stop(
        tmp_path, fake_intercom, captured_logs):
    """A start-up error must read as one, not as a daemon that ran and drained."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the socket's directory should be")
    cfg = base_config(tmp_path, fake_intercom.url,
                      intake={"unix_socket": str(blocker / "intake.sock")})
    with pytest.raises(OSError):
        async with Service(cfg):
            pass
    names = {entry["event"] for entry in captured_logs}
    assert not names & {"service.drain_started", "service.drained", "service.stopped"}
