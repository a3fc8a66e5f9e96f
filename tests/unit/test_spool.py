from __future__ import annotations

import os

import orjson
import pytest
from structlog.testing import capture_logs

from forwarder.clock import FakeClock
from forwarder.event import Event, Route
from forwarder.queue import EventQueue
from forwarder.spool import Spool

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
