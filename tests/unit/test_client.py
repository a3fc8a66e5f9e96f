"""forwarder.client against the real daemon (events reach the fake Intercom over TCP and the
Unix socket, from threads and from coroutines) and against a scripted stand-in for the
failures the daemon rarely shows: a hang, 503, a keep-alive connection closed while idle.

The daemon runs in the test's loop, so the sync client is called through asyncio.to_thread.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest

from forwarder.client import AsyncEventClient, EventClient
from tests.conftest import wait_until

NOW = 1_700_000_000


class ScriptedDaemon:
    """A stand-in intake on 127.0.0.1 port 0: answers each POST from `answers` (then 202),
    or never answers when `hang`; with `close_after_answer` it closes every connection
    after answering, without saying so, as a daemon closing an idle keep-alive would."""

    def __init__(self, answers: list[tuple[int, bytes]] | None = None, *, hang: bool = False,
                 close_after_answer: bool = False):
        self.answers = list(answers or [])
        self.hang = hang
        self.close_after_answer = close_after_answer
        self.connections = 0
        self.closed = 0
        self.bodies: list[bytes] = []
        self._release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while request_line := await reader.readline():
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                self.bodies.append(await reader.readexactly(length))
                assert request_line.startswith(b"POST /events ")
                if self.hang:
                    await self._release.wait()
                    return
                status, body = self.answers.pop(0) if self.answers else (202, b"")
                writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s"
                             % (status, len(body), body))
                await writer.drain()
                if self.close_after_answer:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client gave up on this connection, which is what some tests do
        finally:
            writer.close()
            self.closed += 1


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., ScriptedDaemon]]:
    servers: list[ScriptedDaemon] = []

    async def _make(*args, **kwargs) -> ScriptedDaemon:
        server = ScriptedDaemon(*args, **kwargs)
        await server.start()
        servers.append(server)
        return server

    try:
        yield _make
    finally:
        for server in servers:
            await server.stop()


@pytest.fixture
def refused_port() -> int:
    """A port bound but not listening: connecting to it is refused at once, for sure."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def _client_for(kind: str, svc, transport: str, **kwargs):
    cls = EventClient if kind == "sync" else AsyncEventClient
    if transport == "unix":
        return cls(unix_socket=svc.config.intake.unix_socket, **kwargs)
    return cls(svc.url, **kwargs)


async def _call(client, method: str, *args, **kwargs):
    """Run a client method the way an app would: in a thread (sync) or awaited (async)."""
    if isinstance(client, AsyncEventClient):
        return await getattr(client, method)(*args, **kwargs)
    return await asyncio.to_thread(getattr(client, method), *args, **kwargs)


async def _close(client) -> None:
    if isinstance(client, AsyncEventClient):
        await client.close()
    else:
        client.close()


KINDS = pytest.mark.parametrize("kind", ["sync", "async"])


# -- against the real daemon --------------------------------------------------------------

@KINDS
@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_tracked_event_reaches_intercom_stamped_with_the_call_time(make_service,
                                                                        fake_intercom, kind,
                                                                        transport):
    svc = await make_service()
    client = _client_for(kind, svc, transport, timeout_s=1.0)
    before = int(time.time())
    ok = await _call(client, "track", "Placed.Order", user_id=314159,
                     metadata={"price": {"amount": 2999, "currency": "usd"}, "paid": True})
    after = int(time.time())
    await _close(client)
    assert ok is True
    assert client.stats() == {"accepted": 1, "dropped": 0, "rejected": 0}
    await fake_intercom.wait_for_delivered(1)
    sent = fake_intercom.delivered[0]
    assert before <= sent.pop("created_at") <= after
    assert sent == {"event_name": "placed-order", "user_id": "314159",
                    "metadata": {"price": {"amount": 2999, "currency": "usd"}, "paid": True}}


@KINDS
@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_send_event_sends_an_intercom_shaped_dict_as_is(make_service, fake_intercom, kind,
                                                              transport):
    svc = await make_service()
    client = _client_for(kind, svc, transport, timeout_s=1.0)
    event = {"event_name": "signed-up", "created_at": NOW, "email": "ada@example.com"}
    assert await _call(client, "send_event", event) is True
    await _close(client)
    await fake_intercom.wait_for_delivered(1)
    assert fake_intercom.delivered == [event]


@KINDS
async def test_400_counts_as_rejected_and_keeps_the_error_naming_the_field(make_service, kind):
    svc = await make_service()
    client = _client_for(kind, svc, "tcp", timeout_s=1.0)
    ok = await _call(client, "track", "x", user_id="1", metadata={"tags": ["a", "b"]})
    await _close(client)
    assert ok is False
    assert client.stats() == {"accepted": 0, "dropped": 0, "rejected": 1}
    error = orjson.loads(client.last_error)
    assert error["type"] == "error.list"
    assert "metadata.tags" in [e["field"] for e in error["errors"]]


async def test_one_sync_client_shared_by_many_threads_sends_every_event(make_service,
                                                                        fake_intercom):
    svc = await make_service()
    client = EventClient(svc.url, timeout_s=2.0)

    def burst() -> list[bool]:
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(lambda i: client.track("burst", user_id=str(i),
                                                         created_at=NOW), range(200)))

    results = await asyncio.to_thread(burst)
    client.close()
    assert results == [True] * 200
    assert client.stats() == {"accepted": 200, "dropped": 0, "rejected": 0}
    await fake_intercom.wait_for_delivered(200)
    assert sorted(int(e["user_id"]) for e in fake_intercom.delivered) == list(range(200))


async def test_many_coroutines_share_one_async_client(make_service, fake_intercom):
    svc = await make_service()
    async with AsyncEventClient(unix_socket=svc.config.intake.unix_socket,
                                timeout_s=2.0) as client:
        results = await asyncio.gather(*(client.track("burst", user_id=str(i), created_at=NOW)
                                         for i in range(100)))
    assert results == [True] * 100
    await fake_intercom.wait_for_delivered(100)


@KINDS
@pytest.mark.parametrize("which", ["socket", "url"])
async def test_from_env_finds_the_daemon(make_service, fake_intercom, refused_port, kind,
                                         which):
    """The socket wins when both are set (here the URL points at nothing)."""
    svc = await make_service()
    if which == "socket":
        env = {"INTERCOM_FORWARDER_SOCKET": svc.config.intake.unix_socket,
               "INTERCOM_FORWARDER_URL": f"http://127.0.0.1:{refused_port}"}
    else:
        env = {"INTERCOM_FORWARDER_URL": svc.url}
    cls = EventClient if kind == "sync" else AsyncEventClient
    client = cls.from_env(env, timeout_s=1.0)
    assert await _call(client, "track", "from-env", user_id="1") is True
    await _close(client)
    await fake_intercom.wait_for_delivered(1)


@KINDS
async def test_a_stopped_daemon_costs_a_refused_connect_and_sending_resumes_when_it_is_back(
        make_service, fake_intercom, tmp_path, kind):
    """1. send while the daemon is up; 2. stop it: the next calls are dropped and return at
    once; 3. start a daemon on the same socket: the same client sends again."""
    svc = await make_service()
    client = _client_for(kind, svc, "unix", timeout_s=2.0)
    assert await _call(client, "track", "before", user_id="1") is True
    await fake_intercom.wait_for_delivered(1)
    svc.request_stop(force=True)
    await svc.stop()

    started = time.monotonic()
    assert await _call(client, "track", "during", user_id="1") is False
    assert time.monotonic() - started < 0.5  # refused or no socket file: not the 2 s timeout
    assert client.dropped == 1 and client.last_error

    await make_service()  # same config, same socket path
    assert await _call(client, "track", "after", user_id="1") is True
    await _close(client)
    await fake_intercom.wait_for_delivered(2)
    assert [e["event_name"] for e in fake_intercom.delivered] == ["before", "after"]


# -- against the scripted stand-in ---------------------------------------------------------

@KINDS
async def test_refused_connection_is_dropped_at_once_not_after_the_timeout(refused_port, kind):
    cls = EventClient if kind == "sync" else AsyncEventClient
    client = cls(f"http://127.0.0.1:{refused_port}", timeout_s=2.0)
    started = time.monotonic()
    ok = await _call(client, "track", "x", user_id="1")
    elapsed = time.monotonic() - started
    assert ok is False
    assert elapsed < 0.5
    assert client.stats() == {"accepted": 0, "dropped": 1, "rejected": 0}
    assert "ConnectionRefusedError" in client.last_error


@KINDS
async def test_missing_unix_socket_is_dropped_not_raised(tmp_path: Path, kind):
    cls = EventClient if kind == "sync" else AsyncEventClient
    client = cls(unix_socket=str(tmp_path / "nobody.sock"))
    assert await _call(client, "track", "x", user_id="1") is False
    assert client.dropped == 1


@KINDS
async def test_daemon_that_never_answers_costs_at_most_the_timeout(scripted, kind):
    server = await scripted(hang=True)
    cls = EventClient if kind == "sync" else AsyncEventClient
    client = cls(server.url, timeout_s=0.05)
    started = time.monotonic()
    ok = await _call(client, "track", "x", user_id="1")
    elapsed = time.monotonic() - started
    assert ok is False
    assert elapsed < 0.5
    assert client.dropped == 1 and "Timeout" in client.last_error
    assert len(server.bodies) == 1  # it did get the request; it just never answered


@KINDS
@pytest.mark.parametrize("status", [503, 500])
async def test_daemon_not_taking_events_counts_as_dropped(scripted, kind, status):
    body = b'{"type":"error.list","errors":[{"code":"service_unavailable","message":"full"}]}'
    server = await scripted([(status, body)])
    cls = EventClient if kind == "sync" else AsyncEventClient
    client = cls(server.url, timeout_s=1.0)
    assert await _call(client, "track", "x", user_id="1") is False
    assert client.stats() == {"accepted": 0, "dropped": 1, "rejected": 0}
    assert client.last_error == body.decode()


@KINDS
@pytest.mark.parametrize("metadata", [{"when": object()}, {"ratio": float("nan")}],
                         ids=["object", "nan"])
async def test_metadata_that_is_not_json_is_rejected_without_a_request(scripted, kind, metadata):
    server = await scripted()
    cls = EventClient if kind == "sync" else AsyncEventClient
    client = cls(server.url, timeout_s=1.0)
    assert await _call(client, "track", "x", user_id="1", metadata=metadata) is False
    assert client.stats() == {"accepted": 0, "dropped": 0, "rejected": 1}
    assert "not JSON-serialisable" in client.last_error
    assert server.connections == 0


@KINDS
async def test_keep_alive_connection_is_reused(scripted, kind):
    server = await scripted()
    cls = EventClient if kind == "sync" else AsyncEventClient
    client = cls(server.url, timeout_s=1.0)
    for i in range(5):
        assert await _call(client, "track", "x", user_id=str(i)) is True
    await _close(client)
    assert server.connections == 1
    assert len(server.bodies) == 5


@KINDS
async def test_connection_the_daemon_closed_while_idle_is_replaced_without_a_drop(scripted,
                                                                                   kind):
    server = await scripted(close_after_answer=True)
    cls = EventClient if kind == "sync" else AsyncEventClient
    client = cls(server.url, timeout_s=1.0)
    assert await _call(client, "track", "first", user_id="1") is True
    await wait_until(lambda: server.closed == 1)
    assert await _call(client, "track", "second", user_id="1") is True
    await _close(client)
    assert client.stats() == {"accepted": 2, "dropped": 0, "rejected": 0}
    assert [orjson.loads(b)["event_name"] for b in server.bodies] == ["first", "second"]


async def test_cancelling_an_async_call_propagates_and_the_client_stays_usable(scripted):
    hung = await scripted(hang=True)
    client = AsyncEventClient(hung.url, timeout_s=5.0)
    task = asyncio.create_task(client.track("x", user_id="1"))
    await wait_until(lambda: len(hung.bodies) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    hung.hang = False
    assert await client.track("y", user_id="1") is True
    await client.close()
    assert client.stats() == {"accepted": 1, "dropped": 0, "rejected": 0}


@KINDS
async def test_a_closed_client_drops_instead_of_raising(scripted, kind):
    server = await scripted()
    cls = EventClient if kind == "sync" else AsyncEventClient
    client = cls(server.url, timeout_s=1.0)
    assert await _call(client, "track", "x", user_id="1") is True
    await _close(client)
    assert await _call(client, "track", "x", user_id="2") is False
    assert client.dropped == 1 and client.last_error == "the client is closed"


async def test_an_outage_is_logged_once_and_the_recovery_once(scripted, refused_port, caplog):
    server = await scripted([(503, b"full"), (503, b"full")])
    client = EventClient(server.url, timeout_s=1.0)
    with caplog.at_level(logging.INFO, logger="forwarder.client"):
        for _ in range(3):
            await asyncio.to_thread(client.track, "x", user_id="1")
    messages = [r.getMessage().split()[0] for r in caplog.records]
    assert messages == ["client.dropping_events", "client.sending_again"]
    assert client.stats() == {"accepted": 1, "dropped": 2, "rejected": 0}


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:8377", "127.0.0.1:8377", "http://h:port"])
def test_a_malformed_url_is_refused_when_the_client_is_built(url):
    with pytest.raises(ValueError):
        EventClient(url)
