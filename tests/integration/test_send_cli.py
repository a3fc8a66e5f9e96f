"""`intercom-forwarder send` as a shell script runs it: `python -m forwarder send ...` in a
subprocess, against a daemon started in the test; exit codes and what reaches Intercom."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from forwarder.client import AsyncEventClient
from forwarder.fake_intercom import Fault

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_700_000_000


async def send(*args: str) -> tuple[int, str, str]:
    """Run the CLI (asynchronously: the daemon shares this loop) and return code, out, err."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FORWARDER_", "INTERCOM_FORWARDER_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "forwarder", "send", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port bound but not listening: connecting to it is refused at once, for sure."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


async def test_send_over_tcp_exits_0_and_metadata_values_keep_their_json_types(make_service,
                                                                              fake_intercom):
    svc = await make_service()
    code, out, err = await send(
        "Placed.Order", "--user-id", "314159", "--created-at", str(NOW), "--url", svc.url,
        "--metadata", "amount=2999", "--metadata", "paid=true",
        "--metadata", 'price={"amount":100,"currency":"usd"}',
        "--metadata", "note=hello world", "--metadata", "order_id=007",
        "--metadata", "ratio=NaN")
    assert (code, err) == (0, "")
    assert out.strip() == "202 accepted"
    await fake_intercom.wait_for_delivered(1)
    assert fake_intercom.delivered[0] == {
        "event_name": "placed-order", "created_at": NOW, "user_id": "314159",
        "metadata": {"amount": 2999, "paid": True,
                     "price": {"amount": 100, "currency": "usd"},
                     "note": "hello world", "order_id": "007", "ratio": "NaN"}}


async def test_send_without_a_target_uses_the_configs_unix_socket(make_service, fake_intercom,
                                                                  tmp_path):
    svc = await make_service()
    config = tmp_path / "forwarder.toml"
    # port 1 would be refused: the event can only arrive through the socket
    config.write_text(f'[intake]\nport = 1\nunix_socket = "{svc.config.intake.unix_socket}"\n')
    code, out, _ = await send("signed-up", "--email", "ada@example.com", "--config", str(config))
    assert (code, out.strip()) == (0, "202 accepted")
    await fake_intercom.wait_for_delivered(1)
    sent = fake_intercom.delivered[0]
    assert (sent["event_name"], sent["email"]) == ("signed-up", "ada@example.com")
    assert isinstance(sent["created_at"], int)


async def test_sending_the_same_event_again_exits_0_and_says_it_was_a_duplicate(
        make_service, fake_intercom):
    """Steps: send an event; send it again (same contact, name and created_at); send
    another. Expect: the second says duplicate and exits 0; Intercom receives the first
    and the third only."""
    svc = await make_service()
    same = ("placed-order", "--user-id", "314159", "--created-at", str(NOW), "--url", svc.url)
    assert await send(*same) == (0, "202 accepted\n", "")
    code, out, err = await send(*same)
    assert (code, err) == (0, "")
    assert out == ("202 duplicate (already sent within the dedup window; "
                   "not forwarded again)\n")
    assert (await send("refunded", "--user-id", "314159", "--created-at", str(NOW),
                       "--url", svc.url))[0] == 0
    await fake_intercom.wait_for_delivered(2)
    assert sorted(e["event_name"] for e in fake_intercom.delivered) == ["placed-order",
                                                                        "refunded"]
    assert len(fake_intercom.requests) == 2


async def test_metadata_keys_past_the_tenth_are_named_as_dropped_and_exit_0(
        make_service, fake_intercom):
    svc = await make_service()
    pairs = [arg for i in range(1, 13) for arg in ("--metadata", f"k{i:02d}={i}")]
    code, out, err = await send("placed-order", "--user-id", "314159", "--created-at",
                                str(NOW), "--url", svc.url, *pairs)
    assert (code, out) == (0, "202 accepted\n")
    assert err == ("intercom-forwarder send: metadata keys dropped (Intercom keeps the "
                   "first 10): k11, k12\n")
    await fake_intercom.wait_for_delivered(1)
    assert list(fake_intercom.delivered[0]["metadata"]) == [f"k{i:02d}" for i in range(1, 11)]


async def test_send_over_the_socket_flag_reaches_intercom(make_service, fake_intercom):
    svc = await make_service()
    code, _, _ = await send("logged-in", "--id", "6551e9a0c0f", "--created-at", str(NOW),
                            "--socket", svc.config.intake.unix_socket)
    assert code == 0
    await fake_intercom.wait_for_delivered(1)
    assert fake_intercom.delivered == [{"event_name": "logged-in", "created_at": NOW,
                                        "id": "6551e9a0c0f"}]


async def test_an_event_the_daemon_rejects_exits_1_and_prints_the_field(make_service):
    svc = await make_service()
    code, out, err = await send("x", "--user-id", "1", "--url", svc.url,
                                "--metadata", 'tags=["a","b"]')
    assert (code, out) == (1, "")
    assert err.startswith("intercom-forwarder send: rejected: ")
    answer = orjson.loads(err.split(": ", 2)[2])
    assert "metadata.tags" in [e["field"] for e in answer["errors"]]


async def test_a_daemon_with_a_full_queue_exits_3_with_its_answer(make_service, fake_intercom):
    """1. one worker, a queue of one, Intercom hanging; 2. the worker takes the first event
    and waits on Intercom, the second fills the queue; 3. `send` gets 503 and exits 3."""
    svc = await make_service(queue={"max_events": 1}, workers={"concurrency": 1},
                             intercom={"timeout_seconds": 60.0})
    fake_intercom.script(Fault.slow(60))
    async with AsyncEventClient(svc.url, timeout_s=5.0) as client:
        assert await client.track("first", user_id="1", created_at=NOW)
        await fake_intercom.wait_for_requests(1)
        assert await client.track("second", user_id="1", created_at=NOW)
    code, out, err = await send("third", "--user-id", "1", "--url", svc.url)
    assert (code, out) == (3, "")
    assert "not taken (503)" in err and "service_unavailable" in err
    assert '"not_taken":[0]' in err  # the batch answer: the one event it sent


async def test_an_unreachable_daemon_exits_3(refused_port):
    code, out, err = await send("x", "--user-id", "1", "--url",
                                f"http://127.0.0.1:{refused_port}")
    assert (code, out) == (3, "")
    assert f"cannot reach the daemon at http://127.0.0.1:{refused_port}" in err
    assert "ConnectionRefusedError" in err


@pytest.mark.parametrize("args", [
    pytest.param(["x"], id="no_identity"),
    pytest.param(["x", "--user-id", "1", "--email", "a@b.c"], id="two_identities"),
    pytest.param(["x", "--user-id", "1", "--metadata", "no-equals-sign"], id="metadata_not_k_v"),
    pytest.param(["x", "--user-id", "1", "--created-at", "yesterday"], id="created_at_not_int"),
    pytest.param(["x", "--user-id", "1", "--url", "u", "--socket", "s"], id="url_and_socket"),
    pytest.param(["x", "--user-id", "1", "--url", "ftp://127.0.0.1"], id="url_not_http"),
])
async def test_usage_errors_exit_2(args):
    code, out, err = await send(*args)
    assert (code, out) == (2, "")
    assert err
