"""The Intercom HTTP client, and classify(): the one place that turns an HTTP status or a
network error into an Outcome. Workers switch on `Verdict.outcome` and read nothing else.

Status rules follow Intercom's "Submit a data event" page (HTTP API Responses): 202 with
an empty body on success, 401/403 for a refused token, 404 for a contact that cannot be
found, 500 for server errors; and the rate-limiting page: 429 `rate_limit_exceeded` with
X-RateLimit-Limit / -Remaining / -Reset (a Unix time) on every authenticated answer.
"""

from __future__ import annotations

import enum
import math
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

import forwarder
from forwarder.clock import Clock
from forwarder.config import IntercomConfig, Secret
from forwarder.event import Event, Route

MAX_BODY_BYTES = 2048  # how much of Intercom's answer a Verdict keeps (dead-letter reason)

# What send() hands to classify() instead of raising: timeouts (asyncio.TimeoutError is the
# builtin TimeoutError, itself an OSError), aiohttp client errors and socket errors.
NETWORK_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError)


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    RETRY_LATER = "retry_later"
    RATE_LIMITED = "rate_limited"
    DEAD_LETTER = "dead_letter"
    PAUSE_AUTH = "pause_auth"


@dataclass(frozen=True, slots=True)
class RateHeaders:
    """Intercom's X-RateLimit-* headers; reset_at is epoch seconds (wall clock)."""

    limit: int | None
    remaining: int | None
    reset_at: float | None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one send came to. body is Intercom's answer, cut to MAX_BODY_BYTES."""

    outcome: Outcome
    reason: str
    status: int | None = None
    body: bytes = b""
    retry_after_s: float | None = None
    rate: RateHeaders | None = None
    latency_s: float = 0.0


def _header_lookup(headers: Mapping[str, str]) -> Callable[[str], str | None]:
    """A get(lower-case name) over `headers`; a repeated header gives its last value.

    aiohttp's headers are case-insensitive already, so they are not copied: lower-casing
    every header of every answer was a visible part of the CPU per send.
    """
    if isinstance(headers, (CIMultiDictProxy, CIMultiDict)):
        getall = headers.getall

        def get(name: str) -> str | None:
            values = getall(name, None)
            return values[-1] if values else None

        return get
    return {k.lower(): v for k, v in headers.items()}.get


def _int_header(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(value.strip())
    except ValueError:
        return None
    return n if n >= 0 else None


def _seconds_header(value: str | None) -> float | None:
    """A non-negative finite number of seconds, or None (garbage, HTTP-date, negative)."""
    if value is None:
        return None
    try:
        s = float(value.strip())
    except ValueError:
        return None
    return s if math.isfinite(s) and s >= 0 else None


def parse_rate_headers(headers: Mapping[str, str]) -> RateHeaders | None:
    """X-RateLimit-Limit/-Remaining/-Reset, each None when absent or garbage; None if none."""
    return _rate_headers(_header_lookup(headers))


def _rate_headers(get: Callable[[str], str | None]) -> RateHeaders | None:
    limit = _int_header(get("x-ratelimit-limit"))
    remaining = _int_header(get("x-ratelimit-remaining"))
    reset_at = _seconds_header(get("x-ratelimit-reset"))
    if limit is None and remaining is None and reset_at is None:
        return None
    return RateHeaders(limit=limit, remaining=remaining, reset_at=reset_at)


def classify(
    status: int | None,
    headers: Mapping[str, str] | None,
    body: bytes,
    error: BaseException | None = None,
    latency_s: float = 0.0,
) -> Verdict:
    """Map an HTTP answer (status, headers, body) or a network error to a Verdict.

    An `error` that is neither a timeout, an aiohttp.ClientError nor an OSError is a bug,
    not a network condition: it is re-raised.
    """
    if error is not None:
        if isinstance(error, TimeoutError):  # incl. aiohttp.ServerTimeoutError
            return Verdict(Outcome.RETRY_LATER, "timeout", latency_s=latency_s)
        if isinstance(error, NETWORK_ERRORS):
            return Verdict(Outcome.RETRY_LATER, "connection_error", latency_s=latency_s)
        raise error
    if status is None:
        raise ValueError("classify() needs a status or an error")
    get = _header_lookup(headers or {})
    rate = _rate_headers(get)
    retry_after_s = _seconds_header(get("retry-after"))
    outcome, reason = _status_rule(status)
    return Verdict(
        outcome,
        reason,
        status=status,
        body=body[:MAX_BODY_BYTES],
        retry_after_s=retry_after_s,
        rate=rate,
        latency_s=latency_s,
    )


def _status_rule(status: int) -> tuple[Outcome, str]:
    if 200 <= status < 300:
        return Outcome.DELIVERED, "delivered"
    if status == 401:
        return Outcome.PAUSE_AUTH, "unauthorized"
    if status == 403:
        return Outcome.PAUSE_AUTH, "forbidden"
    if status == 404:  # "Events sent about users that cannot be found will return a 404"
        return Outcome.DEAD_LETTER, "contact_not_found"
    if status == 429:
        return Outcome.RATE_LIMITED, "rate_limited"
    if status == 408 or 500 <= status < 600:
        return Outcome.RETRY_LATER, "server_error"
    # Any other 4xx cannot be fixed by sending again; 1xx/3xx are not answers Intercom gives
    # to POST /events (aiohttp follows no redirect for us to retry), so they are kept aside.
    return Outcome.DEAD_LETTER, "rejected"


def default_user_agent() -> str:
    return (
        f"intercom-forwarder/{forwarder.__version__} "
        f"aiohttp/{aiohttp.__version__} python/{platform.python_version()}"
    )


class UpstreamClient:
    """One aiohttp session to Intercom, headers built once; send() never raises for HTTP or
    network trouble (it returns a Verdict) and never reveals the token."""

    def __init__(
        self,
        cfg: IntercomConfig,
        token: Secret,
        *,
        pool_size: int,
        clock: Clock,
        user_agent: str | None = None,
    ):
        self._base_url = cfg.effective_base_url
        # Parsed once: building a URL from a string on every send was a visible cost.
        self._urls = {route: URL(self._base_url + route.value) for route in Route}
        self._api_version = cfg.api_version
        self._timeout_s = cfg.timeout_seconds
        self._token = token
        self._pool_size = pool_size
        self._clock = clock
        self._user_agent = user_agent or default_user_agent()
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return (
            f"UpstreamClient(base_url={self._base_url!r}, api_version={self._api_version!r}, "
            f"pool_size={self._pool_size}, started={self._session is not None})"
        )

    __str__ = __repr__

    async def start(self) -> None:
        if self._session is not None:
            return
        headers = {
            "Authorization": f"Bearer {self._token.reveal()}",
            "Intercom-Version": self._api_version,
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": self._user_agent,
        }
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._pool_size, keepalive_timeout=30.0),
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            headers=headers,
            # Intercom's API needs no cookies; the jar would parse every Set-Cookie.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    def set_token(self, token: Secret) -> None:
        """Send `token` from the next request on (a reload, or a rewritten token file).
        Requests already on the wire finish with the old one. Only the header is rebuilt:
        the session, its pooled connections and its other headers stay."""
        self._token = token
        if self._session is not None:
            self._session.headers["Authorization"] = f"Bearer {token.reveal()}"

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("UpstreamClient used before start()")
        return self._session

    async def send(self, event: Event) -> Verdict:
        """POST the event's bytes to its route. CancelledError propagates."""
        session = self._require_session()
        url = self._urls[event.route]
        started = self._clock.monotonic()
        try:
            async with session.post(url, data=event.body) as resp:
                body = await resp.read()
                return classify(
                    resp.status, resp.headers, body, latency_s=self._clock.monotonic() - started
                )
        except NETWORK_ERRORS as exc:
            return classify(None, None, b"", exc, latency_s=self._clock.monotonic() - started)

    async def get(
        self, path: str, query: Sequence[tuple[str, str]]
    ) -> tuple[int, Mapping[str, str], bytes]:
        """Raw GET (the GET /events proxy): status, headers, body. Raises aiohttp errors."""
        session = self._require_session()
        async with session.get(self._base_url + path, params=list(query)) as resp:
            return resp.status, resp.headers, await resp.read()
