"""A fake of Intercom's Data Events API (an aiohttp app on 127.0.0.1) for tests, the
benchmarks, `intercom-forwarder demo`, and trying the daemon by hand with
`intercom-forwarder fake-intercom`; it records every request it receives.

It answers as Intercom's pages describe ("Submit a data event", "List all data events",
the rate-limiting page): POST /events -> 202 with an empty body, duplicates (same contact,
normalised event name and created_at) answered 202 but stored once, 401 error.list for a
bad token, 404 for an unknown contact, X-RateLimit-Limit/-Remaining/-Reset (integer epoch
end of the fixed window) on every authenticated answer, 429 rate_limit_exceeded over budget.

Deviations from the style guide, on purpose: the window clock defaults to SystemClock (so
a fake shared with a real service needs no wiring), and Fault.slow waits in real time with
asyncio.sleep semantics, because it exists to trip the client's real socket timeout.
Without a budget nothing is enforced and the headers advertise UNLIMITED.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import http
import itertools
import math
import signal
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Self

import orjson
from aiohttp import web

from forwarder.clock import Clock, SystemClock

UNLIMITED = 1_000_000  # X-RateLimit-Limit advertised when no budget is set


@dataclass(frozen=True, slots=True)
class Slow:
    seconds: float


class Fault(enum.Enum):
    """Scripted answers other than a plain status code."""

    drop = "drop"  # close the connection without answering
    rate_limited = "rate_limited"  # 429 with the rate headers, Remaining 0

    @staticmethod
    def slow(seconds: float) -> Slow:
        """Wait `seconds` (real time), then answer normally."""
        return Slow(seconds)


Answer = int | Slow | Fault


@dataclass(slots=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    json: Any
    status: int | None = None  # None until answered, and for a dropped connection


_ERRORS = {  # Intercom's codes and messages for the statuses it documents
    400: ("parameter_invalid", "Bad Request"),
    401: ("unauthorized", "Access Token Invalid"),
    404: ("not_found", "User Not Found"),
    429: ("rate_limit_exceeded", "Rate Limit Exceeded"),
    500: ("server_error", "Server Error"),
}
_IDENTITY_FIELDS = ("user_id", "email", "id")


def _normalise_name(name: str) -> str:
    # Event model page: names are case-insensitive; '.' and '$' become '-'.
    return name.lower().replace(".", "-").replace("$", "-")


class FakeIntercom:
    """Fake Intercom Data Events API; see the module docstring for what it answers.

    `token` may be changed while running (a revoked, then fixed, token).
    """

    def __init__(
        self,
        *,
        token: str = "test-token",
        budget: int | None = None,
        window_seconds: float = 10.0,
        clock: Clock | None = None,
        unknown_contacts: Iterable[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.token = token
        self.budget = budget
        self.window_seconds = window_seconds
        self.unknown_contacts = set(unknown_contacts)  # tests may discard one
        self.host = host
        self.port = port
        self.requests: list[RecordedRequest] = []
        self.delivered: list[dict[str, Any]] = []
        self.duplicates = 0
        self.rate_limited = 0
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._script: list[Answer] = []
        self._seen_keys: set[tuple[Any, ...]] = set()
        self._window_index = -1  # fixed windows: floor(wall / window_seconds)
        self._window_used = 0
        self._request_ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._url = ""
        self._changed: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"FakeIntercom(url={self._url!r}, budget={self.budget})"

    # lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/events", self._post_events)
        app.router.add_post("/events/summaries", self._post_summaries)
        app.router.add_get("/events", self._get_events)
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self._url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()  # cut Fault.slow waits short
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        if not self._url:
            raise RuntimeError("FakeIntercom.url read before start()")
        return self._url

    # test controls ---------------------------------------------------------------------

    def script(self, *answers: Answer) -> None:
        """Queue answers for the next POSTs (/events and /events/summaries), consumed
        first in, first out."""
        self._script.extend(answers)

    async def wait_for_requests(self, n: int, timeout: float = 5.0) -> None:
        await self._wait_until(lambda: len(self.requests) >= n, timeout, f"{n} requests")

    async def wait_for_delivered(self, n: int, timeout: float = 5.0) -> None:
        await self._wait_until(lambda: len(self.delivered) >= n, timeout, f"{n} delivered")

    async def _wait_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        async def _wait() -> None:
            while not done():
                assert self._changed is not None, "FakeIntercom not started"
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(_wait(), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"waited {timeout}s for {what}; have {len(self.requests)} requests, "
                f"{len(self.delivered)} delivered"
            ) from None

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    # answers ---------------------------------------------------------------------------

    def _rate_headers(self, exhausted: bool = False) -> dict[str, str]:
        limit = self.budget if self.budget is not None else UNLIMITED
        remaining = 0 if exhausted else max(0, limit - self._window_used)
        reset = math.ceil((self._window_index + 1) * self.window_seconds)
        return {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(reset),
        }

    def _count(self) -> bool:
        """Count one call in the current fixed window; False when it is over budget."""
        index = math.floor(self._clock.wall() / self.window_seconds)
        if index != self._window_index:
            self._window_index, self._window_used = index, 0
        self._window_used += 1
        return self.budget is None or self._window_used <= self.budget

    def _error(self, status: int, message: str | None = None, code: str | None = None) -> bytes:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        default_code, default_message = _ERRORS.get(
            status, (phrase.lower().replace(" ", "_"), phrase)
        )
        return orjson.dumps(
            {
                "type": "error.list",
                "request_id": f"fake-{next(self._request_ids):08d}",
                "errors": [{"code": code or default_code, "message": message or default_message}],
            }
        )

    def _answer(
        self, rec: RecordedRequest, status: int, body: bytes = b"", *, rated: bool = True
    ) -> web.Response:
        rec.status = status
        if status == 429:
            self.rate_limited += 1
        headers = self._rate_headers(exhausted=status == 429) if rated else {}
        if body:
            headers["Content-Type"] = "application/json; charset=utf-8"
        self._notify()
        return web.Response(status=status, body=body, headers=headers)

    async def _record(self, request: web.Request) -> RecordedRequest:
        body = await request.read()
        try:
            parsed = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = None
        rec = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=dict(request.headers),
            body=body,
            json=parsed,
        )
        self.requests.append(rec)
        self._notify()
        return rec

    def _authorised(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    async def _scripted(self, request: web.Request, rec: RecordedRequest) -> web.Response | None:
        """Apply the next scripted answer; None means answer normally."""
        if not self._script:
            return None
        answer = self._script.pop(0)
        if answer is Fault.drop:
            self._notify()
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError  # aiohttp ends the handler without writing
        if answer is Fault.rate_limited:
            return self._answer(rec, 429, self._error(429))
        if isinstance(answer, Slow):
            assert self._stopping is not None
            try:
                await asyncio.wait_for(self._stopping.wait(), answer.seconds)
            except TimeoutError:
                pass
            return None
        if 200 <= answer < 300:
            return self._answer(rec, answer)
        return self._answer(rec, answer, self._error(answer))

    async def _admit(
        self, request: web.Request, *, scriptable: bool = False
    ) -> tuple[RecordedRequest, web.Response | None]:
        """Record, authenticate and count the call; a response here ends it early."""
        rec = await self._record(request)
        if not self._authorised(request):
            return rec, self._answer(rec, 401, self._error(401), rated=False)
        within_budget = self._count()
        if scriptable and (scripted := await self._scripted(request, rec)) is not None:
            return rec, scripted
        if not within_budget:
            return rec, self._answer(rec, 429, self._error(429))
        return rec, None

    async def _post_events(self, request: web.Request) -> web.StreamResponse:
        rec, early = await self._admit(request, scriptable=True)
        if early is not None:
            return early
        obj = rec.json
        if not isinstance(obj, dict):
            return self._answer(rec, 400, self._error(400, "Invalid JSON body"))
        if not isinstance(obj.get("event_name"), str) or not obj["event_name"]:
            missing = "event_name is required"
            return self._answer(rec, 400, self._error(400, missing, "parameter_not_found"))
        identity = [obj[f] for f in _IDENTITY_FIELDS if obj.get(f) not in (None, "")]
        if not identity:
            missing = "user_id, email or id is required"
            return self._answer(rec, 400, self._error(400, missing, "parameter_not_found"))
        if any(str(v) in self.unknown_contacts for v in identity):
            return self._answer(rec, 404, self._error(404))
        # Submit a data event: a duplicate (same contact, event name, created_at) is 202'd.
        key = (identity[0], _normalise_name(obj["event_name"]), obj.get("created_at"))
        if key in self._seen_keys:
            self.duplicates += 1
        else:
            self._seen_keys.add(key)
            self.delivered.append(obj)
        return self._answer(rec, 202)

    async def _post_summaries(self, request: web.Request) -> web.StreamResponse:
        # Scriptable like POST /events, so summaries can be driven through every outcome.
        rec, early = await self._admit(request, scriptable=True)
        if early is not None:
            return early
        obj = rec.json
        if isinstance(obj, dict) and str(obj.get("user_id")) in self.unknown_contacts:
            return self._answer(rec, 404, self._error(404))
        return self._answer(rec, 200)

    async def _get_events(self, request: web.Request) -> web.StreamResponse:
        rec, early = await self._admit(request)
        if early is not None:
            return early
        q = request.query
        if q.get("type") != "user":
            return self._answer(rec, 400, self._error(400, "type must be user"))
        # "The identifier parameter can be one of user_id, email or intercom_user_id."
        for param, body_field in (
            ("user_id", "user_id"),
            ("email", "email"),
            ("intercom_user_id", "id"),
        ):
            if param in q:
                value = q[param]
                break
        else:
            return self._answer(
                rec, 400, self._error(400, "user_id, email or intercom_user_id is required")
            )
        events = [{"type": "event", **e} for e in self.delivered if e.get(body_field) == value]
        listing = {"type": "event.list", "events": events, "pages": {}}
        return self._answer(rec, 200, orjson.dumps(listing))


DEFAULT_PORT = 8378  # beside the daemon's 8377


def main(argv: list[str] | None = None, prog: str = "python -m forwarder.fake_intercom") -> int:
    """`intercom-forwarder fake-intercom` (cli.py hands over its arguments), or python -m
    forwarder.fake_intercom: serve the fake by hand until SIGINT or SIGTERM, then stop
    cleanly and exit 0. The first line printed is the URL alone, for scripts."""
    parser = argparse.ArgumentParser(
        prog=prog, description="A fake Intercom Data Events API to try the daemon by hand: "
                               "it answers like Intercom and keeps what it is sent (read it "
                               "back with GET /events?type=user&user_id=...).")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port to listen on; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--token", default="test-token",
                        help="the only access token it accepts (default: %(default)s)")
    parser.add_argument("--unknown-contact", action="extend", nargs="+", default=[],
                        metavar="ID", help="a user_id, email or id it answers 404 (contact "
                                           "not found), so the daemon dead-letters its events")
    parser.add_argument("--budget", type=int, default=None,
                        help="calls allowed per window; more are answered 429 (default: no "
                             "limit)")
    parser.add_argument("--window-seconds", type=float, default=10.0,
                        help="the rate-limit window (default: %(default)s)")
    args = parser.parse_args(argv)

    async def run() -> int:
        fake = FakeIntercom(token=args.token, budget=args.budget,
                            window_seconds=args.window_seconds,
                            unknown_contacts=args.unknown_contact, host=args.host,
                            port=args.port)
        try:
            await fake.start()
        except OSError as exc:  # the port is taken, or the address is not ours
            print(f"{prog}: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        unknown = ", ".join(args.unknown_contact) or "none"
        print(f"{fake.url}\n"
              f"fake Intercom: token {args.token}, unknown contacts: {unknown}; "
              f"Ctrl-C stops it.\nPoint the daemon at it:\n"
              f"  INTERCOM_ACCESS_TOKEN={args.token} FORWARDER_INTERCOM__BASE_URL={fake.url} "
              f"intercom-forwarder serve", flush=True)
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await fake.stop()
        print(f"fake Intercom stopped: {len(fake.requests)} requests, {len(fake.delivered)} "
              f"events kept, {fake.duplicates} duplicates", file=sys.stderr)
        return 0

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:  # before the handlers were in place
        return 130


if __name__ == "__main__":
    sys.exit(main())
