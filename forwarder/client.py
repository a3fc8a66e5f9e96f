"""`forwarder.client`: hand events to a running daemon from a Python app, fire-and-forget.
Never raises into the app; one call costs at most `timeout_s` (default 0.05 s).

    client = EventClient.from_env()          # INTERCOM_FORWARDER_SOCKET, else _URL, else :8377
    client.track("placed-order", user_id="314159", metadata={"price": 2999})   # -> bool

`EventClient` is for threads and `AsyncEventClient` for asyncio. Both return True only when
the daemon answered 202, and count every other call in one of two counters:
`rejected` (400, 413, other 4xx: the event itself is wrong, and sending it again will not
help; `last_error` keeps the daemon's error body) or `dropped` (no answer: refused, timed
out, connection lost; or 503/5xx: the daemon could not take it now). Apps watch these
counters, and a warning goes to the stdlib logger "forwarder.client" once per outage
(`client.dropping_events`), never once per event.

This is code that runs in the app, not a stage of the daemon, so:
- it uses the standard library only (http.client, asyncio streams, json): apps need none
  of the daemon's dependencies;
- it reads the wall clock itself for created_at, and the monotonic clock for its deadline,
  as healthcheck.py does (the style guide's Clock injection is for the daemon's stages).

Decisions:
- created_at is stamped here, at the call, when the caller leaves it out. The daemon's
  dedup key includes it, so a resend (below) or an app's own retry cannot become a second
  event, and a delay before the daemon sees the event cannot shift its time.
- Keep-alive connections are kept in a small idle pool (MAX_IDLE_CONNECTIONS) rather than
  one connection behind a lock: the lock is held only to take or give back a connection,
  so a thread never waits for another thread's request. A burst opens extra connections
  (a loopback connect costs tens of microseconds) and the surplus is closed afterwards.
- A reused connection that the daemon has closed meanwhile (idle timeout, restart) fails
  on first use; that request is sent once more on a new connection, within the same
  deadline. Safe because of the stamped created_at.
- A hung daemon costs each call `timeout_s`; there is no circuit breaker. The daemon
  answers from memory without waiting on anything, so a hang is a bug to see, not a
  condition to route around.
- A constructor given a malformed url raises ValueError: that is configuration, found at
  start-up. Calls never raise (except asyncio.CancelledError, which belongs to the app).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Self
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:8377"
DEFAULT_TIMEOUT_S = 0.05
URL_ENV = "INTERCOM_FORWARDER_URL"
SOCKET_ENV = "INTERCOM_FORWARDER_SOCKET"
MAX_IDLE_CONNECTIONS = 4
_MAX_ANSWER_BYTES = 1 << 20  # the intake's answers are tiny; anything bigger is not ours

log = logging.getLogger("forwarder.client")
log.addHandler(logging.NullHandler())  # a library: silent until the app configures logging

Outcome = Literal["accepted", "rejected", "dropped"]


@dataclass(frozen=True, slots=True)
class Reply:
    """What became of one event: the daemon's status and body, or why there was none."""

    outcome: Outcome
    status: int = 0  # 0: nothing answered
    body: bytes = b""
    error: str = ""  # why nothing answered, or why the event was not sent

    @property
    def accepted(self) -> bool:
        return self.outcome == "accepted"


def _outcome(status: int) -> Outcome:
    if status == 202:
        return "accepted"
    if 400 <= status < 500 and status not in (408, 429):
        return "rejected"
    return "dropped"


def build_event(event_name: str, *, user_id: str | int | None = None, email: str | None = None,
                id: str | None = None, created_at: int | None = None,
                metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An Intercom data event as a dict; fields left as None are left out, created_at is now."""
    event: dict[str, Any] = {"event_name": event_name,
                             "created_at": int(time.time()) if created_at is None else created_at}
    for name, value in (("user_id", user_id), ("email", email), ("id", id)):
        if value is not None:
            event[name] = value
    if metadata is not None:
        event["metadata"] = metadata
    return event


def _encode(event: Mapping[str, Any]) -> bytes | Reply:
    """The request body, or a rejected Reply when the event cannot be JSON (no request made)."""
    if not isinstance(event, Mapping):
        return Reply("rejected", error=f"an event is a dict, got {type(event).__name__}")
    if "created_at" not in event:
        event = {**event, "created_at": int(time.time())}
    try:
        # allow_nan=False: NaN and Infinity are not JSON; the daemon would answer 400 anyway.
        return json.dumps(event, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        return Reply("rejected", error=f"the event is not JSON-serialisable: {exc}")


@dataclass(frozen=True, slots=True)
class _Target:
    host: str
    port: int
    unix_socket: str
    path: str

    @classmethod
    def parse(cls, url: str, unix_socket: str | None) -> _Target:
        if unix_socket:
            path = urlsplit(url).path if url else ""
            return cls("localhost", 0, unix_socket, path.rstrip("/") + "/events")
        parts = urlsplit(url)
        try:
            port = parts.port or 80
        except ValueError:
            raise ValueError(f"bad port in forwarder url {url!r}") from None
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"forwarder url must look like http://127.0.0.1:8377, got {url!r}")
        return cls(parts.hostname, port, "", parts.path.rstrip("/") + "/events")

    def __str__(self) -> str:
        if self.unix_socket:
            return f"unix:{self.unix_socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def host_header(self) -> str:
        if self.unix_socket:
            return "localhost"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class _Counting:
    """Counters, last_error and the once-per-outage log line, shared by both clients."""

    def __init__(self, url: str, unix_socket: str | None, timeout_s: float):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self._target = _Target.parse(url, unix_socket)
        self.timeout_s = timeout_s
        self.accepted = 0
        self.dropped = 0
        self.rejected = 0
        self.last_error = ""
        self._closed = False
        self._dropping = False
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> Self:
        """INTERCOM_FORWARDER_SOCKET when set, else INTERCOM_FORWARDER_URL, else the default."""
        env = os.environ if env is None else env
        unix_socket = env.get(SOCKET_ENV, "").strip()
        if unix_socket:
            return cls(unix_socket=unix_socket, timeout_s=timeout_s)
        return cls(env.get(URL_ENV, "").strip() or DEFAULT_URL, timeout_s=timeout_s)

    @property
    def target(self) -> str:
        """Where events go: http://host:port or unix:/path."""
        return str(self._target)

    def stats(self) -> dict[str, int]:
        """The counters, for the app's own metrics."""
        return {"accepted": self.accepted, "dropped": self.dropped, "rejected": self.rejected}

    # -- one call, whichever transport: EventClient and AsyncEventClient differ only in how
    # they exchange bytes with the daemon (_answer), so the rest of post_event is here.

    def _begin(self, event: Mapping[str, Any]) -> bytes | Reply:
        """The request body, or the settled Reply when no request is to be made."""
        body = _encode(event)
        if isinstance(body, Reply):
            return self._settle(body)
        if self._closed:
            return self._settle(Reply("dropped", error="the client is closed"))
        return body

    def _end(self, answer: tuple[int, bytes] | BaseException) -> Reply:
        """The settled Reply for _answer()'s result: the daemon's (status, body), or the
        error that came instead (nothing answered: dropped)."""
        if isinstance(answer, BaseException):
            return self._settle(Reply("dropped", error=_describe(answer)))
        status, body = answer
        return self._settle(Reply(_outcome(status), status, body))

    def _unexpected(self) -> Reply:
        """A bug in this module must not become the app's exception: log it, count a drop."""
        log.exception("client.unexpected_error target=%s", self._target)
        return self._settle(Reply("dropped", error="unexpected error in forwarder.client"))

    def _settle(self, reply: Reply) -> Reply:
        with self._lock:
            if reply.outcome == "accepted":
                self.accepted += 1
                if self._dropping:
                    self._dropping = False
                    log.info("client.sending_again target=%s dropped=%d", self._target,
                             self.dropped)
                return reply
            self.last_error = reply.error or reply.body.decode("utf-8", "replace")
            if reply.outcome == "rejected":
                self.rejected += 1
                return reply
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning("client.dropping_events target=%s status=%d error=%s",
                            self._target, reply.status, self.last_error)
        return reply


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over an AF_UNIX stream socket; the Host header says "localhost"."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


class EventClient(_Counting):
    """Sends events to the daemon from any thread. Calls never raise and never take longer
    than about timeout_s; what was not accepted is counted in `dropped` or `rejected`."""

    def __init__(self, url: str = DEFAULT_URL, *, unix_socket: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        super().__init__(url, unix_socket, timeout_s)
        self._idle: list[http.client.HTTPConnection] = []

    def track(self, event_name: str, *, user_id: str | int | None = None,
              email: str | None = None, id: str | None = None, created_at: int | None = None,
              metadata: Mapping[str, Any] | None = None) -> bool:
        """Send one event; True when the daemon took it (202). created_at defaults to now."""
        return self.post_event(build_event(event_name, user_id=user_id, email=email, id=id,
                                           created_at=created_at, metadata=metadata)).accepted

    def send_event(self, event: Mapping[str, Any]) -> bool:
        """Send an event dict in Intercom's shape; True when the daemon took it (202)."""
        return self.post_event(event).accepted

    def post_event(self, event: Mapping[str, Any]) -> Reply:
        """Send an event dict and return the daemon's whole answer (the CLI prints it)."""
        try:
            body = self._begin(event)
            return body if isinstance(body, Reply) else self._end(self._answer(body))
        except Exception:
            return self._unexpected()

    def close(self) -> None:
        """Close idle connections; later calls count as dropped."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ------------------------------------------------------------------------

    def _answer(self, body: bytes) -> tuple[int, bytes] | BaseException:
        """The daemon's (status, body), or the error that came instead of an answer."""
        try:
            return self._exchange(body)
        except (OSError, http.client.HTTPException) as exc:
            return exc

    def _exchange(self, body: bytes) -> tuple[int, bytes]:
        deadline = time.monotonic() + self.timeout_s
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        reused = conn is not None
        while True:
            if conn is None:
                conn = self._connect(_remaining(deadline))
            try:
                assert conn.sock is not None
                conn.sock.settimeout(_remaining(deadline))
                conn.request("POST", self._target.path, body,
                             {"Content-Type": "application/json"})
                conn.sock.settimeout(_remaining(deadline))
                response = conn.getresponse()
                answer = response.read(_MAX_ANSWER_BYTES)
            except ConnectionError:
                conn.close()
                if not reused:
                    raise
                conn, reused = None, False  # the daemon closed it while idle: once more
                continue
            except BaseException:
                conn.close()
                raise
            self._give_back(conn, keep=not response.will_close and response.isclosed())
            return response.status, answer

    def _connect(self, timeout_s: float) -> http.client.HTTPConnection:
        t = self._target
        conn: http.client.HTTPConnection
        if t.unix_socket:
            conn = UnixHTTPConnection(t.unix_socket, timeout_s)
        else:
            conn = http.client.HTTPConnection(t.host, t.port, timeout=timeout_s)
        try:
            conn.connect()
        except BaseException:
            conn.close()
            raise
        return conn

    def _give_back(self, conn: http.client.HTTPConnection, *, keep: bool) -> None:
        if keep:
            with self._lock:
                if not self._closed and len(self._idle) < MAX_IDLE_CONNECTIONS:
                    self._idle.append(conn)
                    return
        conn.close()


_Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class AsyncEventClient(_Counting):
    """Sends events to the daemon from coroutines. Calls never raise (cancellation still
    propagates) and never take longer than about timeout_s; the loop is never blocked."""

    def __init__(self, url: str = DEFAULT_URL, *, unix_socket: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        super().__init__(url, unix_socket, timeout_s)
        self._idle: list[_Stream] = []
        self._idle_loop: asyncio.AbstractEventLoop | None = None
        self._head = (f"POST {self._target.path} HTTP/1.1\r\n"
                      f"Host: {self._target.host_header}\r\n"
                      "Content-Type: application/json\r\n"
                      "Content-Length: ").encode("ascii")

    async def track(self, event_name: str, *, user_id: str | int | None = None,
                    email: str | None = None, id: str | None = None,
                    created_at: int | None = None,
                    metadata: Mapping[str, Any] | None = None) -> bool:
        """Send one event; True when the daemon took it (202). created_at defaults to now."""
        reply = await self.post_event(build_event(event_name, user_id=user_id, email=email,
                                                  id=id, created_at=created_at,
                                                  metadata=metadata))
        return reply.accepted

    async def send_event(self, event: Mapping[str, Any]) -> bool:
        """Send an event dict in Intercom's shape; True when the daemon took it (202)."""
        return (await self.post_event(event)).accepted

    async def post_event(self, event: Mapping[str, Any]) -> Reply:
        """Send an event dict and return the daemon's whole answer."""
        try:
            body = self._begin(event)
            return body if isinstance(body, Reply) else self._end(await self._answer(body))
        except Exception:
            return self._unexpected()

    async def close(self) -> None:
        """Close idle connections; later calls count as dropped."""
        self._closed = True
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        for _, writer in idle:
            try:
                async with asyncio.timeout(self.timeout_s):
                    await writer.wait_closed()
            except (OSError, TimeoutError):
                pass  # closing is best effort: the transport is gone either way

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- transport ------------------------------------------------------------------------

    async def _answer(self, body: bytes) -> tuple[int, bytes] | BaseException:
        """The daemon's (status, body), or the error that came instead of an answer."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._exchange(body)
        except (OSError, EOFError, ValueError) as exc:  # TimeoutError is an OSError
            return exc

    async def _exchange(self, body: bytes) -> tuple[int, bytes]:
        stream = self._take_idle()
        reused = stream is not None
        while True:
            if stream is None:
                stream = await self._open()
            try:
                status, answer, keep = await self._round_trip(stream, body)
            except (ConnectionError, EOFError):
                stream[1].close()
                if not reused:
                    raise
                stream, reused = None, False  # the daemon closed it while idle: once more
                continue
            except BaseException:  # timeout, cancellation: the stream is mid-request
                stream[1].close()
                raise
            if keep and not self._closed and len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(stream)
            else:
                stream[1].close()
            return status, answer

    def _take_idle(self) -> _Stream | None:
        loop = asyncio.get_running_loop()
        if self._idle_loop is not loop:
            # Streams belong to the loop that opened them (e.g. a second asyncio.run()).
            self._idle, self._idle_loop = [], loop
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return None

    async def _open(self) -> _Stream:
        t = self._target
        if t.unix_socket:
            return await asyncio.open_unix_connection(t.unix_socket)
        return await asyncio.open_connection(t.host, t.port)

    async def _round_trip(self, stream: _Stream, body: bytes) -> tuple[int, bytes, bool]:
        """Write one request, read one answer; keep is False when the stream cannot be reused."""
        reader, writer = stream
        writer.write(b"%s%d\r\n\r\n%s" % (self._head, len(body), body))
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionResetError("the daemon closed the connection without answering")
        version, status_text = status_line.split(None, 2)[:2]
        status = int(status_text)
        length: int | None = None
        keep = version == b"HTTP/1.1"
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise EOFError("the answer ended inside its headers")
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":  # the intake always sends Content-Length
                raise ValueError(f"unexpected Transfer-Encoding {value.decode()!r}")
            elif name == b"connection":
                keep = value == b"keep-alive" or (keep and value != b"close")
        if length is not None:
            if length > _MAX_ANSWER_BYTES:
                raise ValueError(f"answer too large ({length} bytes)")
            answer = await reader.readexactly(length)
        else:
            answer, keep = await reader.read(), False  # delimited by the close
        return status, answer, keep


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
