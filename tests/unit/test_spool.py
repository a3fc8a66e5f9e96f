from __future__ import annotations

import contextlib
import errno
import os
import subprocess

import orjson
import pytest
from structlog.testing import capture_logs

from forwarder.clock import FakeClock
from forwarder.event import Event, Route
from forwarder.queue import EventQueue
from forwarder import files
from forwarder.spool import Spool, SpoolWriteError

# Bodies as validate would produce them (orjson output), plus awkward ones: a float that
# must keep its exact digits, non-ASCII text, a nested ',"body":' inside a string and a
# key order that a re-parse through a dict would not guarantee.
BODIES = [
    b'{"event_name":"order-placed","created_at":1700000000,"user_id":"u1"}',
    b'{"event_name":"paid","created_at":1700000001,"id":"x","metadata":{"price":1.10}}',
    b'{"event_name":"caf\xc3\xa9","created_at":1,"email":"a@b.c","metadata":{"q":"\\",\\"body\\":"}}',
    b'{"z":1,"a":2}',
]


def make_events() -> list[Event]:
    return [
        Event(
            body=body,
            key=bytes([n]) * 16,
            route=Route.EVENTS,
            attempts=n,
            first_received_at=1_700_000_000.25 + n,
            due=5000.0,
        )
        for n, body in enumerate(BODIES)
    ]


@pytest.fixture
def spool(tmp_path) -> Spool:
    return Spool(tmp_path / "state" / "spool.jsonl")


def test_written_events_load_back_with_identical_bodies_and_fields(spool):
    events = make_events()
    assert spool.write(events) == len(events)
    loaded = spool.load()
    assert [e.body for e in loaded] == BODIES
    assert [(e.key, e.route, e.attempts, e.first_received_at) for e in loaded] == [
        (e.key, e.route, e.attempts, e.first_received_at) for e in events
    ]
    assert all(e.due == 0.0 for e in loaded)


def test_each_line_holds_the_documented_fields_with_the_raw_body_last(spool):
    spool.write(make_events()[:1])
    line = spool.path.read_bytes()
    assert line.endswith(b"}\n") and line.count(b"\n") == 1
    assert line == (
        b'{"route":"/events","attempts":0,"first_received_at":1700000000.25,'
        b'"key":"' + (b"00" * 16) + b'","body":' + BODIES[0] + b"}\n"
    )


def test_writing_no_events_removes_an_old_spool(spool):
    spool.write(make_events())
    assert spool.write([]) == 0
    assert not spool.path.exists()
    assert spool.load() == []


def test_a_write_replaces_the_previous_spool_and_leaves_no_temp_file(spool):
    spool.write(make_events())
    spool.write(make_events()[:1])
    assert [e.body for e in spool.load()] == BODIES[:1]
    assert os.listdir(spool.path.parent) == ["spool.jsonl"]


def test_a_missing_spool_loads_as_nothing(spool):
    assert spool.load() == []


def test_remove_deletes_the_spool_and_tolerates_its_absence(spool):
    spool.write(make_events())
    spool.remove()
    spool.remove()
    assert not spool.path.exists()


def test_a_corrupt_line_is_skipped_counted_and_logged(spool):
    spool.write(make_events()[:2])
    good = spool.path.read_bytes().splitlines(keepends=True)
    spool.path.write_bytes(
        good[0]
        + b'{"route":"/events","attempts":0,"first_rec\n'  # torn
        + b'{"route":"/nowhere","attempts":0,"first_received_at":1,"key":"00","body":{}}\n'
        + b'{"route":"/events","attempts":"2","first_received_at":1,"key":"00","body":{}}\n'
        + b'{"route":"/events","attempts":0,"first_received_at":1,"key":"zz","body":{}}\n'
        + b"[1,2]\n"
        # beyond what the queue's packed header holds (the daemon never writes these)
        + b'{"route":"/events","attempts":4294967296,"first_received_at":1,"key":"00","body":{}}\n'
        + b'{"route":"/events","attempts":0,"first_received_at":1,"key":"' + b"ab" * 65536
        + b'","body":{}}\n'
        + good[1]
    )
    with capture_logs() as logs:
        loaded = spool.load()
    assert [e.body for e in loaded] == BODIES[:2]
    [entry] = [e for e in logs if e["event"] == "spool.corrupt_lines"]
    assert entry["skipped"] == 7
    assert entry["lines"] == [2, 3, 4, 5, 6, 7, 8]
    assert entry["loaded"] == 2
    # The damaged file is kept for inspection, never deleted; the readable lines are loaded.
    assert not spool.path.exists()
    [aside] = spool.path.parent.glob("spool.jsonl.corrupt-*")
    assert entry["moved_to"] == str(aside)
    assert aside.read_bytes().count(b"\n") == 9
    queue = EventQueue(10, FakeClock())
    queue.restore(loaded)  # what the service does with them at start
    assert len(queue) == 2


def test_a_line_written_with_other_field_order_still_loads(spool):
    spool.path.parent.mkdir(parents=True)
    spool.path.write_bytes(
        b'{"body": {"a": 1, "b": [1, 2]}, "key": "0f0f", "attempts": 3,'
        b' "first_received_at": 12, "route": "/events/summaries"}\n'
    )
    [event] = spool.load()
    assert event.body == orjson.dumps({"a": 1, "b": [1, 2]})
    assert (event.key, event.route, event.attempts, event.first_received_at) == (
        b"\x0f\x0f",
        Route.SUMMARIES,
        3,
        12.0,
    )


def test_an_event_without_a_dedup_key_round_trips(spool):
    spool.write([Event(body=b'{"event_summaries":{}}', key=b"", route=Route.SUMMARIES)])
    [event] = spool.load()
    assert (event.key, event.route, event.body) == (b"", Route.SUMMARIES, b'{"event_summaries":{}}')


def test_a_temporary_file_left_by_a_killed_write_is_removed_at_load(spool):
    spool.write(make_events()[:1])
    torn = spool.path.parent / ".spool.jsonl.abc123.tmp"
    torn.write_bytes(b'{"route":"/events","attem')
    with capture_logs() as logs:
        assert [e.body for e in spool.load()] == BODIES[:1]
    assert not torn.exists()
    assert [e["path"] for e in logs if e["event"] == "spool.temporary_file_removed"] == [
        str(torn)]


def _many_events(n: int) -> list[Event]:
    return [Event(body=b'{"event_name":"e","created_at":%d,"user_id":"u"}' % i,
                  key=i.to_bytes(16, "big"), first_received_at=1_700_000_000.0)
            for i in range(n)]


def test_a_writer_error_keeps_every_whole_line_that_fits_and_counts_the_rest(
        spool, monkeypatch):
    """Steps: the disk takes 10 KB and then refuses (ENOSPC), part-way through a line.
    Expect: the spool holds only whole lines, exactly as many as fit; SpoolWriteError
    counts the kept and the lost events; nothing half-written is left behind."""
    events = _many_events(1000)
    real_write = os.write

    def full_disk_write(fd, data):  # a 10 KB disk: what a truncate frees can be reused
        room = 10_000 - os.fstat(fd).st_size
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, bytes(data[:room]))

    monkeypatch.setattr(os, "write", full_disk_write)
    with pytest.raises(SpoolWriteError) as caught:
        spool.write(events)
    monkeypatch.undo()
    kept = spool.load()
    assert caught.value.written == len(kept) > 0
    assert caught.value.written + caught.value.lost == 1000
    assert caught.value.reason == os.strerror(errno.ENOSPC)
    assert [e.body for e in kept] == [e.body for e in events[: len(kept)]]
    line_size = len(spool.path.read_bytes()) // len(kept)
    assert 10_000 - line_size < len(spool.path.read_bytes()) <= 10_000  # as many as fit
    assert sorted(os.listdir(spool.path.parent)) == ["spool.jsonl"]


@contextlib.contextmanager
def _small_tmpfs(path, size: str):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_real_full_filesystem_keeps_what_fits_and_reports_the_rest(tmp_path):
    with _small_tmpfs(tmp_path / "small", "64k") as mount:
        spool = Spool(mount / "spool.jsonl")
        events = _many_events(3000)  # ~170 KB of lines for a 64 KB disk
        with pytest.raises(SpoolWriteError) as caught:
            spool.write(events)
        assert caught.value.cause.errno == errno.ENOSPC
        kept = spool.load()
        assert 0 < len(kept) == caught.value.written < 3000
        assert caught.value.lost == 3000 - len(kept)
        assert [e.body for e in kept] == [e.body for e in events[: len(kept)]]
        assert os.listdir(mount) == ["spool.jsonl"]
