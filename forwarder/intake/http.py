"""The intake's routes: turn a request into validate -> dedup -> queue, and the verdict
into 202 / 400 / 413 / 503.

POST /events takes exactly the body Intercom's POST /events takes and answers like it
(202, empty body), so an app using an official SDK only changes its base URL. The hot
path has no await per event, no task, no log call and one serialisation (in validate);
the dedup is one call per request (with a fleet's Redis: one round trip, bounded).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Sequence
from typing import Protocol

import orjson
import structlog
from aiohttp import web

from ..clock import Clock
from ..diskqueue import STOPPED, QueueUnavailable
from ..event import Event
from ..logs import LogThrottle
from ..metrics import Metrics
from ..validate import (
    Normalised,
    Problem,
    error_body,
    parse_json,
    parse_ndjson,
    validate_event,
    validate_summaries,
)
from .routes import Routes, error_response

log = structlog.get_logger("forwarder.intake")

Validator = Callable[[object, float], Normalised | list[Problem]]

JSON = "application/json"
NDJSON = "application/x-ndjson"
RETRY_AFTER_S = "1"
SHUTTING_DOWN = "the forwarder is shutting down"
_MAX_UNKNOWN_NAMES_REMEMBERED = 1024


class Admission(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    QUEUE_FULL = "queue_full"
    # The queue is closed: the stop has taken (or is about to take) its events for the
    # spool, so this one could not go with them. Answered 503 like a full queue, but
    # counted apart, as the 503 before the body is read is: a deploy is not a full queue
    # (no full-queue alert), yet the operator sees what apps were refused during it.
    SHUTTING_DOWN = "shutting_down"


class Offerable(Protocol):
    # True for a queue whose commit() makes offers survive a kill -9 (DiskQueue): the
    # answer waits for it. False (EventQueue): commit() has nothing to do and is skipped,
    # so memory mode's handlers keep their speed.
    durable: bool

    def offer(self, event: Event) -> bool: ...

    async def commit(self) -> None: ...

    @property
    def closed(self) -> bool: ...


class KeyWindow(Protocol):
    # This daemon's DedupWindow (dedup.py), or the fleet's window through Redis
    # (fleet_dedup.py): one call per request, whatever the number of keys, bounded in time.
    async def add_if_absent_many(self, keys: Sequence[bytes]) -> list[bool]: ...

    def forget(self, key: bytes) -> None: ...


class Readiness(Protocol):
    @property
    def accepting(self) -> bool: ...

    def not_ready_reason(self) -> str | None: ...


def _problems(problems: list[Problem]) -> web.Response:
    return web.Response(status=400, body=error_body(problems), content_type=JSON)


def _not_stored(reason: str) -> str:
    return f"the forwarder could not store the event on disk ({reason}); retry later"


def _unavailable(message: str) -> web.Response:
    return error_response(503, "service_unavailable", message,
                          headers={"Retry-After": RETRY_AFTER_S})


def _not_committed(exc: QueueUnavailable) -> Admission:
    """The outcome of events whose commit failed: a commit that came after the queue
    stopped is the stop's refusal, not a full or failing disk."""
    return Admission.SHUTTING_DOWN if exc.reason == STOPPED else Admission.QUEUE_FULL


def _batch_items(body: bytes, *, ndjson: bool) -> list[object] | Problem:
    """A batch's items (each NDJSON line that is not JSON as the Problem that says why),
    or the Problem that refuses the whole body."""
    if ndjson:
        return list(parse_ndjson(body))
    parsed = parse_json(body)
    if isinstance(parsed, Problem):
        return parsed
    if not isinstance(parsed, list):
        return Problem("body", "POST /events/batch takes a JSON array of events, or NDJSON "
                               f"with Content-Type {NDJSON}")
    return parsed


class Intake:
    """The intake's routes and their handlers. Holds no events itself: admitted ones are in the
    queue before the 202 is written, so nothing answered 202 exists only in a socket."""

    def __init__(
        self,
        *,
        queue: Offerable,
        dedup: KeyWindow,
        metrics: Metrics,
        clock: Clock,
        readiness: Readiness,
        workspace_id: str,
        max_body_bytes: int,
    ):
        self._queue = queue
        self._dedup = dedup
        self._metrics = metrics
        self._clock = clock
        self._readiness = readiness
        self._max_body_bytes = max_body_bytes
        received = metrics.events_received
        self._count = {a: received.labels(a.value) for a in Admission}
        self._count_rejected = received.labels("rejected")
        self._unknown_seen: set[str] = set()
        self._truncation_log = LogThrottle(clock, interval_s=10.0)
        # (obj, received_at) -> verdict, for this workspace.
        self._validate_event: Validator = functools.partial(validate_event, workspace_id)

    def add_routes(self, routes: Routes) -> None:
        routes.add("POST", "/events", self.post_event)
        routes.add("POST", "/events/batch", self.post_batch)
        routes.add("POST", "/events/summaries", self.post_summaries)
        routes.add("GET", "/healthz", self.healthz)
        routes.add("GET", "/readyz", self.readyz)
        routes.add("GET", "/metrics", self.metrics)

    # -- routes -------------------------------------------------------------------------

    async def post_event(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._post_one(request, self._validate_event, 202)

    async def post_summaries(self, request: web.BaseRequest) -> web.StreamResponse:
        # Intercom answers POST /events/summaries 200, and so do we.
        return await self._post_one(request, validate_summaries, 200)

    async def _post_one(self, request: web.BaseRequest, validate: Validator,
                        ok_status: int) -> web.StreamResponse:
        body = await self._read(request)
        if isinstance(body, web.Response):
            return body
        try:
            result = self._validate(parse_json(body), validate, self._clock.wall())
            if isinstance(result, list):
                self._count_rejected.inc()
                return _problems(result)
            key = result.event.key
            new = (await self._dedup.add_if_absent_many((key,)))[0] if key else True
            admission = self._admit(result, new)
            if admission is Admission.SHUTTING_DOWN:
                self._count[admission].inc()
                return _unavailable(SHUTTING_DOWN)
            if self._queue.durable and admission is not Admission.QUEUE_FULL:
                # No 202 before the event is in the log. A duplicate waits too: its first
                # copy may be in the same commit, and if that fails, so does this answer.
                try:
                    await self._queue.commit()
                except QueueUnavailable as exc:
                    if admission is Admission.ACCEPTED and result.event.key:
                        self._dedup.forget(result.event.key)  # not taken: a retry must pass
                    self._count[_not_committed(exc)].inc()
                    return _unavailable(_not_stored(exc.reason))
            self._count[admission].inc()
            if admission is Admission.QUEUE_FULL:
                return _unavailable("the forwarder's queue is full; retry later")
            return web.Response(status=ok_status)
        except Exception:  # a bug, never the user's input: answer 500, keep serving
            log.exception("intake.unexpected_error", route=request.path)
            return error_response(500, "server_error", "unexpected error in the forwarder")

    async def post_batch(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await self._read(request, batch=True)
        if isinstance(body, web.Response):
            return body
        try:
            return await self._batch(body, ndjson=request.content_type == NDJSON)
        except Exception:
            log.exception("intake.unexpected_error", route="/events/batch")
            return error_response(500, "server_error", "unexpected error in the forwarder")

    async def healthz(self, request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=b'{"status":"ok"}', content_type=JSON)

    async def readyz(self, request: web.BaseRequest) -> web.StreamResponse:
        reason = self._readiness.not_ready_reason()
        if reason is None:
            return web.Response(body=b'{"ready":true}', content_type=JSON)
        return web.Response(status=503, body=orjson.dumps({"ready": False, "reason": reason}),
                            content_type=JSON)

    async def metrics(self, request: web.BaseRequest) -> web.StreamResponse:
        payload, content_type = self._metrics.render()
        resp = web.Response(body=payload)
        resp.headers["Content-Type"] = content_type
        return resp

    # -- verdicts -----------------------------------------------------------------------

    async def _read(self, request: web.BaseRequest, *,
                    batch: bool = False) -> bytes | web.Response:
        """The body, or the answer that refuses the request: 503 while the forwarder stops,
        413 over max_body_bytes (read() enforces it, with or without a Content-Length).

        `accepting` is checked again once the body is in: reading it can outlast the start
        of a stop, and an event admitted after the stop took the queue for the spool would
        be answered 202 and then lost."""
        if not self._readiness.accepting:
            return self._stopping(request, None, batch=batch)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()
        if not self._readiness.accepting:
            return self._stopping(request, body, batch=batch)
        return body

    def _stopping(self, request: web.BaseRequest, body: bytes | None, *,
                  batch: bool) -> web.Response:
        """503 for a request that came while the forwarder stops, counted as shutting_down:
        a batch whose body was read counts its items; any other request counts once,
        including a batch refused before its body is read (reading it would hold up the
        stop to count what is refused anyway; a body refused whole counts once in
        rejected too)."""
        events = 1
        if batch and body is not None:
            items = _batch_items(body, ndjson=request.content_type == NDJSON)
            if not isinstance(items, Problem):
                events = len(items)
        self._count[Admission.SHUTTING_DOWN].inc(events)
        return _unavailable(SHUTTING_DOWN)

    def _too_large(self) -> web.Response:
        self._count_rejected.inc()
        return error_response(413, "request_too_large",
                              f"body is larger than intake.max_body_bytes "
                              f"({self._max_body_bytes})", field="body")

    @staticmethod
    def _validate(item: object, validate: Validator,
                  received_at: float) -> Normalised | list[Problem]:
        """One submitted event checked: a body or NDJSON line that is not JSON arrives
        here as the Problem that says why."""
        if isinstance(item, Problem):
            return [item]
        return validate(item, received_at)

    def _admit(self, normalised: Normalised, new: bool) -> Admission:
        """Report what validation left out, then the dedup's verdict (new: the key was not
        in the window, or the event has none), then queue. Counting the outcome is the
        caller's, so a batch counts once. The report counts for every valid submission (a
        duplicate or a 503'd event had its keys cut off too), so it comes first."""
        if normalised.dropped_metadata_keys or normalised.unknown_fields:
            self._report_dropped(normalised)
        if not new:
            return Admission.DUPLICATE
        event = normalised.event
        if not self._queue.offer(event):
            # Not taken, so not seen: the client's retry of this event must go through.
            if event.key:
                self._dedup.forget(event.key)
            return Admission.SHUTTING_DOWN if self._queue.closed else Admission.QUEUE_FULL
        return Admission.ACCEPTED

    def _report_dropped(self, normalised: Normalised) -> None:
        dropped = normalised.dropped_metadata_keys
        if dropped:
            self._metrics.metadata_keys_dropped.inc(len(dropped))
            self._truncation_log.warning(log, "intake.metadata_truncated",
                                         dropped_keys=list(dropped), limit=10)
        for name in normalised.unknown_fields:
            self._metrics.unknown_fields_dropped.inc()
            if name not in self._unknown_seen and len(self._unknown_seen) < \
                    _MAX_UNKNOWN_NAMES_REMEMBERED:
                self._unknown_seen.add(name)
                log.warning("intake.unknown_field_dropped", field=name)

    async def _batch(self, body: bytes, *, ndjson: bool) -> web.Response:
        items = _batch_items(body, ndjson=ndjson)
        if isinstance(items, Problem):
            self._count_rejected.inc()
            return _problems([items])
        accepted = duplicates = 0
        rejected: list[dict[str, object]] = []
        not_taken: list[int] = []
        truncated: list[dict[str, object]] = []
        valid: list[Normalised] = []
        indexes: list[int] = []  # of each valid event in the request
        received_at = self._clock.wall()
        for index, item in enumerate(items):
            result = self._validate(item, self._validate_event, received_at)
            if isinstance(result, list):
                rejected.append({"index": index, "errors": [p.as_error() for p in result]})
            else:
                valid.append(result)
                indexes.append(index)
        # The dedup: one call for the whole request (with a fleet: one Redis round trip).
        keys = [n.event.key for n in valid if n.event.key]
        fresh = iter(await self._dedup.add_if_absent_many(keys) if keys else ())
        # A durable queue: (index, key) of every event offered, to undo if the commit fails
        # (memory mode keeps no such list). No await from here to the commit: the queue
        # cannot close half-way through.
        offered: list[tuple[int, bytes]] | None = [] if self._queue.durable else None
        for index, result in zip(indexes, valid):
            admission = self._admit(result, next(fresh) if result.event.key else True)
            if admission is Admission.ACCEPTED:
                accepted += 1
                if offered is not None:
                    offered.append((index, result.event.key))
            elif admission is Admission.DUPLICATE:
                duplicates += 1
            else:
                not_taken.append(index)
                continue
            if result.dropped_metadata_keys:
                truncated.append({"index": index,
                                  "dropped_metadata_keys": list(result.dropped_metadata_keys)})
        # Which outcome the not-taken events count as: no await since the offers, so
        # either the queue was closed for all of them or for none.
        stopping = bool(not_taken) and self._queue.closed
        why_not_taken = SHUTTING_DOWN if stopping else "the forwarder's queue is full"
        # The parsed events (a dict or two each, their Normalised) are not needed below.
        # Let them go before the commit is awaited: held by this frame, they were walked
        # by the cycle collector at every collection while the request waited (letting
        # them go took disk mode's loop from 19.6 to 17.1 us an event, bench/disk_threads.py).
        del items, valid
        if offered is not None and (accepted or duplicates):
            # One commit for the whole batch, shared with concurrent requests.
            try:
                await self._queue.commit()
            except QueueUnavailable as exc:
                # None of this batch's offers is in the log: the client resends exactly
                # those (not_taken). Duplicates stay answered as such: their first copy is
                # either settled in an earlier request or one of those not_taken here,
                # which the client resends.
                for _, key in offered:
                    if key:
                        self._dedup.forget(key)
                not_taken = sorted(not_taken + [i for i, _ in offered])
                accepted = 0
                stopping = _not_committed(exc) is Admission.SHUTTING_DOWN
                why_not_taken = _not_stored(exc.reason).removesuffix("; retry later")
        if accepted:
            self._count[Admission.ACCEPTED].inc(accepted)
        if duplicates:
            self._count[Admission.DUPLICATE].inc(duplicates)
        if not_taken:
            self._count[Admission.SHUTTING_DOWN if stopping
                        else Admission.QUEUE_FULL].inc(len(not_taken))
        if rejected:
            self._count_rejected.inc(len(rejected))
        answer: dict[str, object] = {"accepted": accepted, "duplicates": duplicates,
                                     "rejected": rejected}
        if truncated:
            answer["truncated"] = truncated
        if not_taken:
            # The client must resend exactly these; everything else is settled.
            answer["not_taken"] = not_taken
            answer["type"] = "error.list"
            answer["errors"] = [{"code": "service_unavailable",
                                 "message": f"{why_not_taken}; {len(not_taken)} events not taken "
                                            "(see not_taken); retry them later"}]
            return web.Response(status=503, body=orjson.dumps(answer), content_type=JSON,
                                headers={"Retry-After": RETRY_AFTER_S})
        return web.Response(status=202, body=orjson.dumps(answer), content_type=JSON)
