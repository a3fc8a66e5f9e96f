"""GET /events for apps: list a contact's data events through the daemon, so the Intercom
token stays in the daemon.

The query is Intercom's ("List all data events", data-events-endpoints.md; OpenAPI
operation lisDataEvents): `type=user` plus exactly one of `user_id`, `email` or
`intercom_user_id`, optionally `per_page` and `summary`. A query that breaks those rules
gets a 400 error.list naming the parameter, before any budget is spent. Other parameters
(a paging cursor copied from `pages.next`, say) go through as they are: Intercom judges them.

A valid query spends one request of the same rate budget the workers use, ahead of queued
writes (RateGate.acquire(priority=True)): someone is waiting for the answer, while the
writes were answered 202 long ago. Intercom's status, body and rate-limit headers come back
unchanged, 401 included: a refused token pauses forwarding (workers), but a read reports
Intercom's answer as is and never pauses or resumes anything. Reads are not retried; the
caller sees a 5xx and decides.

Deviation from the style guide on purpose: this module catches the network errors that
UpstreamClient.get raises, because there is no event to keep and the caller is waiting.
classify() still names them (timeout -> 504, anything else -> 502).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import structlog
from aiohttp import web
from multidict import MultiDictProxy

from ..metrics import Metrics
from ..upstream import NETWORK_ERRORS, RateHeaders, classify
from ..validate import NOT_FOUND, Problem, error_body
from .routes import Routes, error_response

log = structlog.get_logger("forwarder.intake")

JSON = "application/json"
PATH = "/events"
IDENTITY_PARAMS = ("user_id", "email", "intercom_user_id")
# What of Intercom's answer is passed back besides status and body. Content-Encoding and
# Content-Length are not: aiohttp has already decoded the body and sets its own length.
PASSED_HEADERS = (
    "Content-Type",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Retry-After",
)
_NETWORK_STATUS = {"timeout": 504, "connection_error": 502}


class ReadGate(Protocol):
    async def acquire(self, *, priority: bool = False) -> float: ...

    def release(self, status: int | None, rate: RateHeaders | None,
                retry_after_s: float | None = None) -> None: ...


class Reader(Protocol):
    async def get(self, path: str, query: list[tuple[str, str]]
                  ) -> tuple[int, Mapping[str, str], bytes]: ...


class Accepting(Protocol):
    @property
    def accepting(self) -> bool: ...


def check_query(query: MultiDictProxy[str]) -> list[Problem]:
    """Intercom's rules for GET /events, one Problem per broken parameter; [] when valid."""
    problems: list[Problem] = []
    for name in ("type", *IDENTITY_PARAMS, "per_page", "summary"):
        if len(query.getall(name, ())) > 1:
            problems.append(Problem(name, f"{name} is given more than once"))
    if problems:
        return problems

    kind = query.get("type")
    if kind is None:
        problems.append(Problem("type", "type is required and must be user", NOT_FOUND))
    elif kind != "user":
        problems.append(Problem("type", f"type must be user, got {kind!r}"))

    given = [name for name in IDENTITY_PARAMS if name in query]
    if not given:
        problems.append(Problem("user_id", "one of user_id, email or intercom_user_id is "
                                           "required", NOT_FOUND))
    elif len(given) > 1:
        problems.append(Problem(given[1], "give exactly one of user_id, email or "
                                          f"intercom_user_id, not {' and '.join(given)}"))
    elif not query[given[0]]:
        problems.append(Problem(given[0], f"{given[0]} must not be empty"))

    per_page = query.get("per_page")
    if per_page is not None and not (per_page.isascii() and per_page.isdigit()
                                     and int(per_page) >= 1):
        problems.append(Problem("per_page", f"per_page must be a positive integer, "
                                            f"got {per_page!r}"))
    summary = query.get("summary")
    if summary is not None and summary not in ("true", "false"):
        problems.append(Problem("summary", f"summary must be true or false, got {summary!r}"))
    return problems


class EventsProxy:
    """Serves GET /events from Intercom; never spends budget on a query it can refuse itself,
    and pairs every gate.acquire() with exactly one release()."""

    def __init__(self, *, gate: ReadGate, upstream: Reader, readiness: Accepting,
                 metrics: Metrics):
        self._gate = gate
        self._upstream = upstream
        self._readiness = readiness
        self._reads = metrics.proxy_reads

    def add_routes(self, routes: Routes) -> None:
        routes.add("GET", PATH, self.get_events)

    async def get_events(self, request: web.BaseRequest) -> web.StreamResponse:
        response = await self._answer(request)
        # Every answer counts, refused queries included: a read spends Intercom budget
        # that the workers then do not have, so an operator must be able to see them.
        self._reads.labels(str(response.status)).inc()
        return response

    async def _answer(self, request: web.BaseRequest) -> web.StreamResponse:
        problems = check_query(request.query)
        if problems:
            return web.Response(status=400, body=error_body(problems), content_type=JSON)
        if not self._readiness.accepting:
            return error_response(503, "service_unavailable", "the forwarder is shutting down",
                          headers={"Retry-After": "1"})
        query = list(request.query.items())  # order and repeats kept, values as sent
        await self._gate.acquire(priority=True)
        status: int | None = None
        rate: RateHeaders | None = None
        retry_after_s: float | None = None
        try:
            status, headers, body = await self._upstream.get(PATH, query)
            verdict = classify(status, headers, b"")
            rate, retry_after_s = verdict.rate, verdict.retry_after_s
        except NETWORK_ERRORS as exc:
            reason = classify(None, None, b"", exc).reason
            log.warning("proxy.upstream_failed", reason=reason, error=type(exc).__name__)
            return error_response(_NETWORK_STATUS[reason], reason,
                          f"Intercom did not answer GET /events ({reason})")
        finally:
            # A cancelled or failed read may still have reached Intercom: release(None)
            # counts it against the budget.
            self._gate.release(status, rate, retry_after_s)
        passed = {name: headers[name] for name in PASSED_HEADERS if name in headers}
        return web.Response(status=status, body=body, headers=passed)

