"""Disk mode (issue 13) with a real daemon process, real SIGKILLs and a real SQLite file:
an event answered 202 survives kill -9 wherever it was (intake, waiting for a retry, the
401 pause), a delivered or dead-lettered one is not sent again (beyond one per worker),
the dedup window survives a restart, a full disk budget is answered 503, and a damaged
log at start (torn tail, bad page, newer version) never keeps the daemon down.

Events are told apart by user_id, and the fake Intercom counts what it received, so
"lost" is an acknowledged user_id never delivered and "resent" is the fake's duplicate
count (a resend of a delivered event, which Intercom would drop by its key but still
bill against the app's budget).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import sqlite3
from collections import Counter
from pathlib import Path

import aiohttp
import orjson
import pytest

from forwarder.deadletter import read_entries
from forwarder.disksql import SCHEMA_VERSION
from forwarder.fake_intercom import FakeIntercom
from tests.conftest import TOKEN
from tests.integration.daemon import Daemon, free_port, spawn, spawn_serving

NOW = 1_700_000_000
WORKERS = 4  # small, so "on the wire at the kill" is a small known bound


def event(name: str, n: int = 0) -> dict:
    return {"event_name": "signed-up", "created_at": NOW + n, "user_id": name}


def disk_env(**extra: str) -> dict[str, str]:
    return {"INTERCOM_ACCESS_TOKEN": TOKEN, "FORWARDER_QUEUE__TYPE": "disk",
            "FORWARDER_WORKERS__CONCURRENCY": str(WORKERS), **extra}


async def start(tmp_path: Path, fake_url: str, name: str, **env: str) -> Daemon:
    return await spawn_serving(tmp_path, upstream=fake_url, state_dir=tmp_path / "state",
                               name=name, **env)


def delivered_ids(fake: FakeIntercom) -> set[str]:
    return {e["user_id"] for e in fake.delivered}


async def _single_client(url: str, tag: str, acked: set[str]) -> None:
    """Post single events until the daemon goes away; remember each one answered 202."""
    async with aiohttp.ClientSession() as s:
        for n in itertools.count():
            name = f"{tag}-{n}"
            try:
                async with s.post(url + "/events", data=orjson.dumps(event(name))) as r:
                    if r.status == 202:
                        acked.add(name)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return


async def _batch_client(url: str, tag: str, acked: set[str], size: int = 25) -> None:
    """Post batches until the daemon goes away; remember the events a 202 accepted."""
    async with aiohttp.ClientSession() as s:
        for n in itertools.count():
            names = [f"{tag}-{n}-{i}" for i in range(size)]
            body = orjson.dumps([event(x) for x in names])
            try:
                async with s.post(url + "/events/batch", data=body) as r:
                    if r.status == 202:
                        answer = await r.json()
                        assert answer["accepted"] == size, answer
                        acked.update(names)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return



async def post_until_refused(session: aiohttp.ClientSession, url: str, prefix: str, *,
                             pad: int, batches: int
                             ) -> tuple[set[str], tuple[str | None, dict] | None]:
    """Post batches of 100 padded events until one is answered 503. Returns the names
    answered 202 and the refusal (Retry-After, answer), None if none came."""
    acked: set[str] = set()
    for n in range(batches):
        names = [f"{prefix}{n}-{i}-" + "x" * pad for i in range(100)]
        async with session.post(url + "/events/batch",
                                data=orjson.dumps([event(x) for x in names])) as r:
            answer = await r.json()
            if r.status == 503:
                return acked, (r.headers.get("Retry-After"), answer)
            assert r.status == 202
            acked.update(names)
    return acked, None

async def test_kill_9_under_concurrent_singles_and_batches_loses_no_acknowledged_event(
        tmp_path):
    """Steps: a disk-mode daemon forwarding at 200 events/s takes singles from two clients
    and batches from two more, faster than it forwards; SIGKILL while they post; restart
    on the same state dir.
    Expect: every event answered 202 is delivered after the restart; nothing delivered
    before the kill is sent again, except at most one per worker (on the wire, or
    delivered with its delete not yet committed: workers wait for that commit).
    Checked that it can fail: with FORWARDER_QUEUE__TYPE=memory the same test loses
    thousands of acknowledged events (the assertion on `lost` fails)."""
    fake = FakeIntercom(token=TOKEN)
    await fake.start()
    daemon = None
    try:
        slow = disk_env(FORWARDER_RATE_LIMIT__REQUESTS="200", FORWARDER_RATE_LIMIT__PER_SECONDS="1")
        daemon = await start(tmp_path, fake.url, "first", **slow)
        acked: set[str] = set()
        clients = [asyncio.create_task(_single_client(daemon.url, f"s{i}", acked))
                   for i in range(2)]
        clients += [asyncio.create_task(_batch_client(daemon.url, f"b{i}", acked))
                    for i in range(2)]
        await daemon.wait_for(lambda: len(acked) >= 2000 and len(fake.delivered) >= 50,
                              "a backlog with deliveries under way", timeout=20)
        await daemon.kill()  # SIGKILL while all four clients are posting
        await asyncio.wait_for(asyncio.gather(*clients), 10)
        before_kill = len(fake.delivered)
        assert before_kill < len(acked)  # a real backlog was queued at the kill

        daemon = await start(tmp_path, fake.url, "second", **disk_env())
        await daemon.wait_for(lambda: acked <= delivered_ids(fake),
                              "every acknowledged event delivered", timeout=20)
        lost = acked - delivered_ids(fake)
        assert not lost
        assert fake.duplicates <= WORKERS, (fake.duplicates, before_kill)
    finally:
        if daemon is not None:
            await daemon.kill()
        await fake.stop()


async def test_kill_9_with_events_waiting_for_retries_sends_them_after_the_restart(tmp_path):
    """Steps: Intercom answers 500 to the first 40 sends; 40 events are posted; once all
    40 wait for their retry (3 s), SIGKILL; restart against an Intercom that answers 202.
    Expect: all 40 delivered; one delivered before the kill is sent again only if its
    delete had not committed at the kill (the worker was still waiting for it), so at
    most one per worker."""
    fake = FakeIntercom(token=TOKEN)
    await fake.start()
    daemon = None
    try:
        fake.script(*[500] * 40)
        retry = {"FORWARDER_RETRY__BASE_DELAY_SECONDS": "3",
                 "FORWARDER_RETRY__MAX_DELAY_SECONDS": "3"}
        daemon = await start(tmp_path, fake.url, "first", **disk_env(**retry))
        batch = [event(f"r{i}") for i in range(40)]
        async with aiohttp.ClientSession() as s, s.post(daemon.url + "/events/batch",
                                                        data=orjson.dumps(batch)) as r:
            assert r.status == 202
        await daemon.wait_for(lambda: sum(q.status == 500 for q in fake.requests) == 40,
                              "40 answers 500")
        await daemon.kill()
        # Retry delays are uniform draws in [0, 3 s]: a few may have been sent already.
        assert len(fake.delivered) < 40

        daemon = await start(tmp_path, fake.url, "second", **disk_env(**retry))
        await daemon.wait_for(lambda: len(fake.delivered) == 40, "40 delivered")
        assert delivered_ids(fake) == {f"r{i}" for i in range(40)}
        # A retry delivered in the moment before the kill, its delete not yet committed,
        # is resent (Intercom drops the copy by its key): at most one per worker.
        assert fake.duplicates <= WORKERS
    finally:
        if daemon is not None:
            await daemon.kill()
        await fake.stop()


async def test_kill_9_during_a_401_pause_with_disk_sync_full_keeps_every_event(tmp_path):
    """Steps: disk_sync = "full"; Intercom refuses the daemon's token (401), so it pauses
    with 30 events accepted; SIGKILL during the pause; fix the token; restart.
    Expect: all 30 delivered, once each."""
    fake = FakeIntercom(token="another-token")
    await fake.start()
    daemon = None
    try:
        env = disk_env(FORWARDER_QUEUE__DISK_SYNC="full")
        daemon = await start(tmp_path, fake.url, "first", **env)
        for i in range(30):
            assert await daemon.post(event(f"p{i}")) == 202
        await daemon.wait_for_log("upstream.auth_paused")
        await daemon.kill()
        assert fake.delivered == []

        fake.token = TOKEN
        daemon = await start(tmp_path, fake.url, "second", **env)
        await daemon.wait_for(lambda: len(fake.delivered) == 30, "30 delivered")
        assert delivered_ids(fake) == {f"p{i}" for i in range(30)}
        assert fake.duplicates == 0
    finally:
        if daemon is not None:
            await daemon.kill()
        await fake.stop()


async def test_max_disk_bytes_reached_answers_503_and_keeps_what_it_took(tmp_path):
    """Steps: max_disk_bytes = 1 MiB, Intercom unreachable (nothing drains); post batches
    of 100 until one is refused.
    Expect: 503 with Retry-After whose not_taken lists the events to resend; the log stays
    near its bound; every event answered 202 before is delivered by a restart."""
    dead = f"http://127.0.0.1:{free_port()}"
    env = disk_env(FORWARDER_QUEUE__MAX_DISK_BYTES=str(1 << 20))
    daemon = await start(tmp_path, dead, "first", **env)
    try:
        async with aiohttp.ClientSession() as s:
            # 6,000 events of ~450 bytes on disk: ~2.6 MB, past 1 MiB
            acked, refused = await post_until_refused(s, daemon.url, "m", pad=200, batches=60)
        assert refused is not None, "max_disk_bytes never refused an event"
        retry_after, answer = refused
        assert retry_after == "1"
        assert answer["not_taken"] and answer["accepted"] + len(answer["not_taken"]) == 100
        assert "queue is full" in answer["errors"][0]["message"]
        db = tmp_path / "state" / "queue.db"
        assert db.stat().st_size < 3 << 20
    finally:
        await daemon.kill()

    fake = FakeIntercom(token=TOKEN)
    await fake.start()
    try:
        daemon = await start(tmp_path, fake.url, "second", **disk_env())
        await daemon.wait_for(lambda: acked <= delivered_ids(fake), "every 202 delivered")
    finally:
        await daemon.kill()
        await fake.stop()


@pytest.mark.parametrize("queue_type", ["memory", "disk"])
async def test_a_retry_after_a_clean_restart_is_a_duplicate_and_not_forwarded(tmp_path,
                                                                              queue_type):
    """Steps: 30 events delivered; SIGTERM; restart; the client sends the same 30 again
    (it never saw the answers, say).
    Expect: answered as 30 duplicates, and Intercom receives no request for them.
    Checked that it can fail: without the reload (memory: no dedup.keys; disk: no
    load_keys) the batch answers accepted 30 and the fake counts 30 duplicates."""
    fake = FakeIntercom(token=TOKEN)
    await fake.start()
    env = {"INTERCOM_ACCESS_TOKEN": TOKEN, "FORWARDER_QUEUE__TYPE": queue_type}
    batch = orjson.dumps([event(f"d{i}", i) for i in range(30)])
    daemon = None
    try:
        daemon = await start(tmp_path, fake.url, "first", **env)
        async with aiohttp.ClientSession() as s, s.post(daemon.url + "/events/batch",
                                                        data=batch) as r:
            assert (await r.json())["accepted"] == 30
        await daemon.wait_for(lambda: len(fake.delivered) == 30, "30 delivered")
        assert await daemon.terminate() == 0
        requests = len(fake.requests)

        daemon = await start(tmp_path, fake.url, "second", **env)
        async with aiohttp.ClientSession() as s, s.post(daemon.url + "/events/batch",
                                                        data=batch) as r:
            answer = await r.json()
        assert (r.status, answer["accepted"], answer["duplicates"]) == (202, 0, 30)
        assert await daemon.terminate() == 0
        assert len(fake.requests) == requests
        assert fake.duplicates == 0
    finally:
        if daemon is not None:
            await daemon.kill()
        await fake.stop()


async def test_disk_mode_metrics_show_the_log_and_its_commits(make_service, fake_intercom):
    """Steps: a disk-mode service takes a batch of 50 while Intercom is paused (401), then
    GET /metrics.
    Expect: 50 events on disk, a positive byte count, one commit observed with 50 events
    (events per commit) and its latency; /readyz names paused_auth, not the disk."""
    fake_intercom.token = "another-token"
    svc = await make_service(queue={"type": "disk"})
    batch = orjson.dumps([event(f"x{i}") for i in range(50)])
    async with aiohttp.ClientSession() as s:
        async with s.post(svc.url + "/events/batch", data=batch) as r:
            assert r.status == 202
        async with s.get(svc.url + "/metrics") as r:
            text = await r.text()
        async with s.get(svc.url + "/readyz") as r:
            ready = await r.json()
    sample = svc.metrics.registry.get_sample_value
    assert sample("intercom_forwarder_queue_disk_events") == 50
    assert sample("intercom_forwarder_queue_disk_bytes") > 50 * 100
    assert sample("intercom_forwarder_queue_events_per_commit_count") >= 1
    assert sample("intercom_forwarder_queue_events_per_commit_sum") == 50
    assert sample("intercom_forwarder_queue_commit_latency_seconds_count") >= 1
    assert "intercom_forwarder_queue_disk_events 50.0" in text
    assert ready.get("reason") != "disk_unavailable"


async def test_kill_9_during_the_drain_loses_nothing(tmp_path):
    """Steps: a disk-mode daemon forwarding at 50 events/s holds a backlog of 200; SIGTERM
    (drain_seconds 5); SIGKILL once the drain has begun, as an orchestrator's grace period
    ending does; restart.
    Expect: all 200 delivered; at most one per worker sent twice (on the wire at the
    kill, or delivered with its delete not yet committed). Checked that it can fail:
    before workers waited for the delete's commit, 2 runs in 5 resent 26-40 events."""
    fake = FakeIntercom(token=TOKEN)
    await fake.start()
    daemon = None
    try:
        env = disk_env(FORWARDER_RATE_LIMIT__REQUESTS="50", FORWARDER_RATE_LIMIT__PER_SECONDS="1",
                       FORWARDER_SHUTDOWN__DRAIN_SECONDS="5")
        daemon = await start(tmp_path, fake.url, "first", **env)
        batch = [event(f"t{i}") for i in range(200)]
        async with aiohttp.ClientSession() as s, s.post(daemon.url + "/events/batch",
                                                        data=orjson.dumps(batch)) as r:
            assert (await r.json())["accepted"] == 200
        daemon.proc.terminate()
        await daemon.wait_for_log("service.drain_started")
        await daemon.kill()
        assert len(fake.delivered) < 200

        daemon = await start(tmp_path, fake.url, "second", **disk_env())
        await daemon.wait_for(lambda: len(fake.delivered) == 200, "200 delivered")
        assert delivered_ids(fake) == {f"t{i}" for i in range(200)}
        assert fake.duplicates <= WORKERS
    finally:
        if daemon is not None:
            await daemon.kill()
        await fake.stop()


async def test_a_memory_mode_spool_is_committed_into_the_disk_queue_then_removed(tmp_path):
    """Steps: a memory-mode daemon with Intercom unreachable takes 20 events and stops
    (SIGTERM: they go to the spool); a disk-mode daemon starts on the same state dir while
    Intercom refuses its token; SIGKILL; a disk-mode restart with a good token.
    Expect: the disk-mode start removes the spool, and the 20 are delivered after the
    kill: the spool's events were in queue.db before the spool was removed."""
    state = tmp_path / "state"
    dead = f"http://127.0.0.1:{free_port()}"
    daemon = await start(tmp_path, dead, "memory", INTERCOM_ACCESS_TOKEN=TOKEN)
    batch = [event(f"sp{i}") for i in range(20)]
    async with aiohttp.ClientSession() as s, s.post(daemon.url + "/events/batch",
                                                    data=orjson.dumps(batch)) as r:
        assert (await r.json())["accepted"] == 20
    assert await daemon.terminate() == 0
    assert len((state / "spool.jsonl").read_bytes().splitlines()) == 20

    fake = FakeIntercom(token="another-token")
    await fake.start()
    daemon = None
    try:
        daemon = await start(tmp_path, fake.url, "disk", **disk_env())
        await daemon.wait_for_log("spool.loaded")
        assert not (state / "spool.jsonl").exists()
        await daemon.kill()
        fake.token = TOKEN
        daemon = await start(tmp_path, fake.url, "again", **disk_env())
        await daemon.wait_for(lambda: len(fake.delivered) == 20, "20 delivered")
        assert delivered_ids(fake) == {f"sp{i}" for i in range(20)}
    finally:
        if daemon is not None:
            await daemon.kill()
        await fake.stop()


def tear_the_tail(db: Path) -> None:
    """A torn copy or a disk fault: the file loses its second half."""
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size // 2)


def garble_a_middle_page(db: Path) -> None:
    """A bad sector: the page holding the 500th event overwritten with garbage."""
    page = db.read_bytes().index(b'"tt500-') // 4096 * 4096
    with open(db, "r+b") as f:
        f.seek(page)
        f.write(random.Random(13).randbytes(4096))


def mark_newer_version(db: Path) -> None:
    """A file a newer release wrote (then a rollback to this one): disklog.py knows its
    own schema by PRAGMA user_version."""
    with sqlite3.connect(db, isolation_level=None) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()


@pytest.mark.parametrize("damage, reasons, least_sent", [
    (tear_the_tail, {"SQLITE_CORRUPT", "quick_check_failed"}, 250),
    (garble_a_middle_page, {"SQLITE_CORRUPT", "quick_check_failed"}, 950),
    (mark_newer_version, {"newer_version"}, 1000),
], ids=["torn_tail", "bad_page", "newer_version"])
async def test_a_damaged_log_at_start_does_not_stop_the_daemon_and_what_reads_is_sent(
        tmp_path, damage, reasons, least_sent):
    """Steps: 1,000 events wait in queue.db (Intercom refuses the token); clean stop; the
    file is damaged; restart with a good token.
    Expect: the daemon comes up (/readyz 200, no crash loop), logs disklog.damaged with
    the reason, the counts and the path it moved the file to, keeps that file there,
    counts it in intercom_forwarder_queue_damaged_logs_total, and delivers exactly the
    events it salvaged (all of them for a newer version; none that was not posted)."""
    fake = FakeIntercom(token="another-token")
    await fake.start()
    daemon = None
    state = tmp_path / "state"
    try:
        daemon = await start(tmp_path, fake.url, "first", **disk_env())
        names = [f"tt{i}-" + "y" * 300 for i in range(1000)]
        async with aiohttp.ClientSession() as s, s.post(
                daemon.url + "/events/batch",
                data=orjson.dumps([event(x) for x in names])) as r:
            assert (await r.json())["accepted"] == 1000
        assert await daemon.terminate() == 0
        damage(state / "queue.db")

        fake.token = TOKEN
        daemon = await start(tmp_path, fake.url, "second", **disk_env())
        [damaged] = await daemon.wait_for_log("disklog.damaged")
        assert damaged["reason"] in reasons and damaged["level"] == "error"
        salvaged = damaged["salvaged_events"]
        assert least_sent <= salvaged <= 1000
        if damage is garble_a_middle_page:  # the rows on that page, and no others, lost
            assert salvaged + damaged["unreadable"] == 1000 and salvaged < 1000
        await daemon.wait_for(lambda: len(fake.delivered) >= salvaged, "the salvaged sent")
        async with aiohttp.ClientSession() as s:
            async with s.get(daemon.url + "/readyz") as r:
                assert r.status == 200, await r.text()
            async with s.get(daemon.url + "/metrics") as r:
                assert "intercom_forwarder_queue_damaged_logs_total 1.0" in await r.text()
        assert len(fake.delivered) == salvaged and fake.duplicates == 0
        assert delivered_ids(fake) <= set(names)
        moved_to = Path(damaged["moved_to"])
        assert moved_to.parent == state and moved_to.name.startswith("queue.db.corrupt-")
        assert moved_to.stat().st_size > 0  # kept aside, never deleted
    finally:
        if daemon is not None:
            await daemon.kill()
        await fake.stop()


async def test_a_disk_that_refuses_writes_gives_503_and_not_ready_until_it_takes_them_again(
        tmp_path):
    """Steps: the daemon runs under a real file-size limit (soft RLIMIT_FSIZE 3 MB, via
    prlimit; writes past it fail with EFBIG as on a full disk), far below max_disk_bytes,
    with Intercom unreachable; post batches until one is refused; then lift the limit of
    the running process and post again.
    Expect: the refused batch is 503 with Retry-After, not_taken listing its events and a
    message naming the disk; /readyz is 503 "disk_unavailable" meanwhile; once the disk
    takes writes again a batch is 202 and /readyz no longer names the disk. Every event
    answered 202 is delivered by a restart."""
    dead = f"http://127.0.0.1:{free_port()}"
    daemon = await spawn(tmp_path, upstream=dead, state_dir=tmp_path / "state", name="limited",
                         wrapper=["prlimit", f"--fsize={3 << 20}:unlimited"], **disk_env())
    acked: set[str] = set()
    try:
        await daemon.wait_serving()
        async with aiohttp.ClientSession() as s:
            # ~5 MB of log: past the 3 MB limit
            acked, refused = await post_until_refused(s, daemon.url, "f", pad=300, batches=100)
            assert refused is not None, "the file-size limit never refused a commit"
            retry_after, answer = refused
            assert retry_after == "1" and answer["not_taken"] == list(range(100))
            assert "could not store the event on disk" in answer["errors"][0]["message"]
            async with s.get(daemon.url + "/readyz") as r:
                assert (r.status, (await r.json())["reason"]) == (503, "disk_unavailable")

            proc = await asyncio.create_subprocess_exec(
                "prlimit", "--pid", str(daemon.pid), "--fsize=unlimited:unlimited")
            assert await proc.wait() == 0
            names = [f"after-{i}" for i in range(10)]
            async with s.post(daemon.url + "/events/batch",
                              data=orjson.dumps([event(x) for x in names])) as r:
                assert r.status == 202, await r.text()
                acked.update(names)
            async with s.get(daemon.url + "/readyz") as r:
                assert (await r.json()).get("reason") != "disk_unavailable"
    finally:
        await daemon.kill()

    fake = FakeIntercom(token=TOKEN)
    await fake.start()
    try:
        daemon = await start(tmp_path, fake.url, "second", **disk_env())
        await daemon.wait_for(lambda: acked <= delivered_ids(fake), "every 202 delivered",
                              timeout=25)
    finally:
        await daemon.kill()
        await fake.stop()



def dead_letter_lines(state: Path) -> Counter[str]:
    """How many dead-letter lines each user_id has."""
    return Counter(e.record["event"]["user_id"] for e in read_entries(state))


async def test_kill_9_while_dead_letters_wait_for_their_commit_duplicates_one_per_worker(
        tmp_path):
    """Steps: Intercom answers 404 (unknown contact) to each of 1,000 events; once they are
    all queued and some dead-lettered, another process holds queue.db's write lock (as a
    slow disk would hold the commit); 1 s later SIGKILL; release the lock; restart, and
    stop cleanly once every event is dead-lettered.
    Expect: while the commit is held, each worker dead-letters at most one more event
    (its delete must commit before it takes the next); after the restart every event has
    one dead-letter line and was sent once, except at most one per worker (the line
    written, the delete not committed at the kill). Checked that it can fail: without
    the wait for the commit, every event sent during the hold was resent and
    dead-lettered twice after the restart (475 and 780 of 1,000 in two runs)."""
    names = [f"dl{i}" for i in range(1000)]
    fake = FakeIntercom(token=TOKEN, unknown_contacts=names)
    await fake.start()
    state = tmp_path / "state"
    env = disk_env(FORWARDER_RATE_LIMIT__REQUESTS="500", FORWARDER_RATE_LIMIT__PER_SECONDS="1")
    daemon = None
    try:
        daemon = await start(tmp_path, fake.url, "first", **env)
        async with aiohttp.ClientSession() as s:
            for n in range(0, len(names), 100):
                async with s.post(daemon.url + "/events/batch", data=orjson.dumps(
                        [event(x) for x in names[n:n + 100]])) as r:
                    assert (await r.json())["accepted"] == 100
        await daemon.wait_for(lambda: len(read_entries(state)) >= 20, "20 dead letters")
        with contextlib.closing(sqlite3.connect(state / "queue.db", isolation_level=None)
                                ) as lock:
            lock.execute("BEGIN IMMEDIATE")  # the daemon's commits wait for this
            sent_at_hold = len(fake.requests)
            # Waiting for something not to happen: the workers get 1 s to run on.
            await asyncio.sleep(1.0)
            assert len(fake.requests) - sent_at_hold <= 2 * WORKERS
            await daemon.kill()
            lock.execute("ROLLBACK")
        assert len(read_entries(state)) < len(names)  # the kill came mid-way

        daemon = await start(tmp_path, fake.url, "second", **env)
        await daemon.wait_for(lambda: len(dead_letter_lines(state)) == len(names),
                              "every event dead-lettered", timeout=30)
        assert await daemon.terminate() == 0
        lines = dead_letter_lines(state)
        sent = Counter(q.json["user_id"] for q in fake.requests)
        assert set(lines) == set(names) == set(sent)
        for counts in (lines, sent):
            twice = [name for name, count in counts.items() if count > 1]
            assert len(twice) <= WORKERS and max(counts.values()) <= 2, twice
    finally:
        if daemon is not None:
            await daemon.kill()
        await fake.stop()
