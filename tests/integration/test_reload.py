"""SIGHUP reloads, never kills; a rotated token reaches a running daemon (issue 12 C10).

In-process (FakeClock): while paused on 401, the probe reads the token file again, so a
rewritten file heals the daemon with no signal; reload() resumes at once; a reload that
cannot read the file keeps the old token. Real subprocesses with real SIGHUPs: the daemon
stays up with its queue, uses the new token at once, and applies a new log.level.
"""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import orjson
import pytest

from forwarder.config import CREDENTIAL_NAME, load_config
from forwarder.fake_intercom import FakeIntercom
from tests.conftest import TOKEN, wait_until
from tests.integration.daemon import free_port, spawn
from tests.integration.test_metrics import event, post

OLD = "old-token-4f1c9a"  # what the daemon starts with; Intercom no longer takes it
NEW = TOKEN  # what the fake Intercom takes


def token_from(env: dict[str, str]) -> dict:
    """The intercom fields load_config resolves from `env`, as `serve` would start."""
    ic = load_config(env=env).intercom
    return {"access_token": ic.access_token, "access_token_file": ic.access_token_file,
            "access_token_source": ic.access_token_source}


def bearer(request) -> str:
    return request.headers["Authorization"].removeprefix("Bearer ")


def assert_no_token_in(logs: list[dict]) -> None:
    text = repr(logs)
    assert OLD not in text and NEW not in text


async def paused_with_one_event(svc, fake) -> None:
    assert await post(svc, event(0)) == 202
    await wait_until(lambda: svc.workers.paused)


async def test_a_rewritten_token_file_heals_a_paused_daemon_at_the_next_probe_with_no_signal(
        tmp_path, make_service, fake_intercom, clock, captured_logs):
    """Steps: the token file holds a token Intercom refuses; an event pauses forwarding;
    the file is rewritten with a working token; no signal; 30 s pass (the probe interval).
    Expect: nothing more is sent before the probe; the probe sends the new token and the
    event is delivered; service.reloaded says the token changed, without showing it."""
    token_file = tmp_path / "access-token"
    token_file.write_text(OLD + "\n")
    svc = await make_service(clock=clock, intercom=token_from(
        {"FORWARDER_INTERCOM__ACCESS_TOKEN_FILE": str(token_file)}))
    await paused_with_one_event(svc, fake_intercom)
    assert bearer(fake_intercom.requests[0]) == OLD

    token_file.write_text(NEW + "\n")
    await clock.wait_for_sleepers(2)  # the stats line and the auth probe
    await clock.advance_and_settle(29)
    assert len(fake_intercom.requests) == 1
    clock.advance(1)
    await fake_intercom.wait_for_delivered(1)
    assert [bearer(r) for r in fake_intercom.requests] == [OLD, NEW]
    reloaded = [e for e in captured_logs if e["event"] == "service.reloaded"]
    assert [(e["trigger"], e["changed"]) for e in reloaded] == [("auth_probe", ["token"])]
    assert_no_token_in(captured_logs)


@pytest.mark.parametrize("source", ["access_token_file", "systemd_credential"])
async def test_reload_resumes_a_paused_daemon_at_once_with_the_rotated_token(
        source, tmp_path, make_service, fake_intercom, clock, captured_logs, monkeypatch):
    """Steps: started with a token Intercom refuses (from the token file, or systemd's
    credential); an event pauses forwarding; the file is rewritten; reload() (what SIGHUP
    calls), with the clock standing still. Expect: the paused event and a later one are
    delivered with the new token at once; service.reloaded names the change, not the token."""
    if source == "access_token_file":
        token_file = tmp_path / "access-token"
        env = {"FORWARDER_INTERCOM__ACCESS_TOKEN_FILE": str(token_file)}
    else:
        creds = tmp_path / "credentials"
        creds.mkdir()
        token_file = creds / CREDENTIAL_NAME
        env = {"CREDENTIALS_DIRECTORY": str(creds)}
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    token_file.write_text(OLD)
    svc = await make_service(clock=clock, intercom=token_from(env))
    await paused_with_one_event(svc, fake_intercom)

    token_file.write_text(NEW)
    svc.reload()
    await fake_intercom.wait_for_delivered(1)
    assert await post(svc, event(1)) == 202
    await fake_intercom.wait_for_delivered(2)
    assert [bearer(r) for r in fake_intercom.requests] == [OLD, NEW, NEW]
    (reloaded,) = [e for e in captured_logs if e["event"] == "service.reloaded"]
    assert (reloaded["trigger"], reloaded["changed"]) == ("sighup", ["token"])
    assert_no_token_in(captured_logs)


async def test_a_reload_that_cannot_read_the_token_file_keeps_the_old_token(
        tmp_path, make_service, fake_intercom, clock, captured_logs):
    """Steps: the daemon runs with a working token from a file; the file is deleted;
    reload(). Expect: service.reload_failed (error) naming the file; the next event is
    still sent, with the token in use; the daemon stays ready."""
    token_file = tmp_path / "access-token"
    token_file.write_text(NEW)
    svc = await make_service(clock=clock, intercom=token_from(
        {"FORWARDER_INTERCOM__ACCESS_TOKEN_FILE": str(token_file)}))
    token_file.unlink()
    svc.reload()
    (failed,) = [e for e in captured_logs if e["event"] == "service.reload_failed"]
    assert failed["log_level"] == "error" and str(token_file) in failed["error"]
    assert await post(svc, event(0)) == 202
    await fake_intercom.wait_for_delivered(1)
    assert bearer(fake_intercom.requests[0]) == NEW
    assert svc.not_ready_reason() is None
    assert_no_token_in(captured_logs)


# -- real processes, real SIGHUP -------------------------------------------------------------

RETRIED = 'intercom_forwarder_events_forwarded_total{reason="connection_error",result="retried"}'


async def wait_for_metric(daemon, sample: str, at_least: float, timeout: float = 15) -> None:
    async def value() -> float:
        async with aiohttp.ClientSession() as s, s.get(daemon.url + "/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith(sample + " "):
                    return float(line.split()[-1])
        return 0.0

    async def _poll() -> None:
        while await value() < at_least:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(_poll(), timeout)


async def test_sighup_with_a_rotated_token_file_resumes_at_once_and_the_daemon_runs_on(
        tmp_path):
    """Steps: `serve` with a token file Intercom refuses; 3 events pause forwarding; the
    file is rewritten with a working token; SIGHUP. Expect: the daemon stays up, logs
    service.reloaded (changed: token) without either token, and delivers all 3 well before
    the 30 s probe; SIGTERM then exits 0 with nothing spooled."""
    fake = FakeIntercom(token=NEW)
    await fake.start()
    token_file = tmp_path / "access-token"
    token_file.write_text(OLD + "\n")
    daemon = await spawn(tmp_path, upstream=fake.url, state_dir=tmp_path / "state",
                         FORWARDER_INTERCOM__ACCESS_TOKEN_FILE=str(token_file))
    try:
        await daemon.wait_serving()
        for i in range(3):
            assert await daemon.post(event(i)) == 202
        await daemon.wait_for_log("upstream.auth_paused")

        token_file.write_text(NEW + "\n")
        daemon.proc.send_signal(signal.SIGHUP)
        (reloaded,) = await daemon.wait_for_log("service.reloaded")
        assert reloaded["changed"] == ["token"]
        await fake.wait_for_delivered(3, timeout=10)  # the probe alone would wait 30 s
        assert daemon.proc.returncode is None
        assert await daemon.terminate() == 0
        assert not (tmp_path / "state" / "spool.jsonl").exists()
        stderr = daemon.stderr()
        assert OLD not in stderr and NEW not in stderr
    finally:
        await daemon.kill()
        await fake.stop()


async def test_sighup_applies_a_new_log_level_and_keeps_every_queued_event(tmp_path):
    """Steps: `serve --config` with log.level info; Intercom unreachable, so 5 events wait
    for retries (debug-level upstream.retry_scheduled lines are not shown); the file is
    changed to level debug and queue.max_events; SIGHUP. Expect: service.reloaded with
    changed [log.level] and not_applied [queue.max_events]; retry_scheduled lines appear;
    SIGTERM exits 0 and all 5 events are in the spool."""
    config = tmp_path / "forwarder.toml"
    config.write_text('[log]\nlevel = "info"\n')
    daemon = await spawn(tmp_path, upstream=f"http://127.0.0.1:{free_port()}",
                         state_dir=tmp_path / "state", config=config,
                         INTERCOM_ACCESS_TOKEN=NEW,
                         FORWARDER_RETRY__MAX_ATTEMPTS="1000",
                         FORWARDER_RETRY__MAX_DELAY_SECONDS="0.5")
    try:
        await daemon.wait_serving()
        for i in range(5):
            assert await daemon.post(event(i)) == 202
        await wait_for_metric(daemon, RETRIED, 5)  # retries happen, at info level unseen
        assert daemon.log_events("upstream.retry_scheduled") == []

        config.write_text('[log]\nlevel = "debug"\n\n[queue]\nmax_events = 5000\n')
        daemon.proc.send_signal(signal.SIGHUP)
        (reloaded,) = await daemon.wait_for_log("service.reloaded")
        assert reloaded["changed"] == ["log.level"]
        assert reloaded["not_applied"] == ["queue.max_events"]
        await daemon.wait_for_log("upstream.retry_scheduled")
        assert await daemon.terminate() == 0
        spool = (tmp_path / "state" / "spool.jsonl").read_bytes().splitlines()
        created = sorted(orjson.loads(line)["body"]["created_at"] for line in spool)
        assert created == [event(i)["created_at"] for i in range(5)]
    finally:
        await daemon.kill()
