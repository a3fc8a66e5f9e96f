"""Intercom's documented rules for data events: JSON in, a normalised Event or problems out.

Pure: no I/O, no clock, no logging (intake logs and counts). docs/validation.md lists
every rule with the Intercom page it comes from:

- submit: "Submit a data event", POST /events (fields, metadata types, "Metadata
  behaviour", "Event de-duplication"):
  https://developers.intercom.com/docs/references/rest-api/api.intercom.io/data-events/createdataevent
- model: "The data event model" (required fields, event-name normalisation):
  https://developers.intercom.com/docs/references/2.5/rest-api/data-events/event-model
- types: "Event Metadata Types" (String, Number, Date, Link, Rich Link, Monetary Amount):
  https://developers.intercom.com/docs/references/1.2/rest-api/data-events/event-metadata-types
- openapi: Intercom's OpenAPI description 2.14 (create_data_event_request,
  create_data_event_summaries_request): https://github.com/intercom/Intercom-OpenAPI;
  POST /events/summaries is also described on
  https://developers.intercom.com/docs/references/rest-api/api.intercom.io/data-events/dataeventsummaries

Hot path: input is what orjson.loads produced, so types are checked with `type(x) is`
(exact, fast, and bool is never taken for an int). One pass per field, the metadata dict
is reused as-is unless a key has to be left out, and the body is serialised once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b
from itertools import islice
from typing import NamedTuple

import orjson

from forwarder.event import Event, Route

INVALID = "parameter_invalid"
NOT_FOUND = "parameter_not_found"  # Intercom's code for a missing required parameter

MAX_METADATA_KEYS = 10  # submit, "Metadata behaviour"
MAX_TIMESTAMP_S = 10**11  # above this a "Unix timestamp" is really milliseconds

_EVENT_FIELDS = frozenset(("event_name", "created_at", "user_id", "email", "id", "metadata"))
_SUMMARIES_FIELDS = frozenset(("user_id", "event_summaries"))
_SUMMARY_FIELDS = frozenset(("event_name", "count", "first", "last"))
_RICH_LINK_KEYS = frozenset(("url", "value"))
_AMOUNT_KEYS = frozenset(("amount", "currency"))
_EVENTS = Route.EVENTS
# Metadata values that need no further check (a float must be finite, an object must be
# a Rich Link or Monetary Amount, null is dropped: those go through _metadata()).
_PLAIN_TYPES = frozenset((str, int, bool))


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a request, in Intercom's error-object shape."""

    field: str
    message: str
    code: str = INVALID

    def as_error(self) -> dict:
        return {"code": self.code, "message": self.message, "field": self.field}


class Normalised(NamedTuple):
    """An accepted write, plus what was left out of it on the way (for metrics/logs).

    A tuple, built with _new_normalised (tuple.__new__, in C): a dataclass's or
    NamedTuple's own constructor is a Python frame, ~100 ns more per event
    (timeit), and nothing keeps a Normalised."""

    event: Event
    dropped_metadata_keys: tuple[str, ...] = ()
    unknown_fields: tuple[str, ...] = ()


_new_normalised = tuple.__new__


# --- parsing -------------------------------------------------------------------------


def parse_json(body: bytes) -> object | Problem:
    """orjson.loads, or a Problem(field="body") saying why the body is not JSON.

    orjson rejects invalid UTF-8 (including lone surrogates), NaN/Infinity and nesting
    deeper than 1024. An integer beyond 64 bits decodes as a float, which the field
    rules then reject where an integer or string is required.
    """
    if not body or body.isspace():
        return Problem("body", "request body is empty; expected JSON")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return Problem("body", f"body is not valid JSON: {exc}")


def parse_ndjson(body: bytes) -> list[object | Problem]:
    """One item per non-blank line: the decoded value, or a Problem naming the line."""
    items: list[object | Problem] = []
    append = items.append
    loads = orjson.loads
    for lineno, line in enumerate(body.split(b"\n"), 1):
        if not line or line.isspace():
            continue
        try:
            append(loads(line))
        except orjson.JSONDecodeError as exc:
            append(Problem("body", f"line {lineno} is not valid JSON: {exc}"))
    return items


def error_body(problems: Sequence[Problem]) -> bytes:
    """Intercom's error list: {"type": "error.list", "errors": [{code, message, field}]}."""
    return orjson.dumps({"type": "error.list", "errors": [p.as_error() for p in problems]})


# --- dedup key -----------------------------------------------------------------------

_key_prefixes: dict[str, blake2b] = {}


def event_key(
    workspace_id: str, identity_kind: str, identity: str, event_name: str, created_at: int
) -> bytes:
    """16-byte digest of Intercom's de-duplication key (submit, "Event
    de-duplication"): workspace, contact external id, event name, created time.

    identity_kind ("user_id", "email", "id") is part of the key so that user_id "a@b.c"
    and email "a@b.c" never collide. The parts are JSON-encoded, which is unambiguous
    whatever characters they contain (a plain separator is not: "a\\0b"+"c" = "a"+"b\\0c").
    """
    h = (_key_prefixes.get(workspace_id) or _key_prefix(workspace_id)).copy()
    h.update(orjson.dumps((identity_kind, identity, event_name, created_at)))
    return h.digest()


def _key_prefix(workspace_id: str) -> blake2b:
    """A hasher already fed with the workspace: copying it is cheaper than blake2b(...,
    digest_size=16), whose keyword parsing costs ~150 ns per call. Workspaces come from
    config, so the cache holds one or two entries; the cap only guards against misuse."""
    if len(_key_prefixes) >= 64:
        _key_prefixes.clear()
    prefix = _key_prefixes[workspace_id] = blake2b(orjson.dumps(workspace_id), digest_size=16)
    return prefix


# --- shared field rules --------------------------------------------------------------


def _kind(value: object) -> str:
    """The JSON type of a decoded value, for messages."""
    t = type(value)
    if t is str:
        return "a string"
    if t is bool:
        return "a boolean"
    if t is int or t is float:
        return "a number"
    if t is dict:
        return "an object"
    if t is list:
        return "an array"
    if value is None:
        return "null"
    return t.__name__


def _event_name(value: object, field: str, problems: list[Problem]) -> str | None:
    """Required non-empty string, normalised as Intercom stores it (model):
    names are case-insensitive, and '.' and '$' are replaced with '-'."""
    if type(value) is str:
        if value and not value.isspace():
            return value.lower().replace(".", "-").replace("$", "-")
        problems.append(Problem(field, f"{field} must not be empty or only whitespace"))
    elif value is None:
        problems.append(Problem(field, f"{field} is required", NOT_FOUND))
    else:
        problems.append(Problem(field, f"{field} must be a string, got {_kind(value)}"))
    return None


def _timestamp(value: object, field: str, problems: list[Problem]) -> int | None:
    """Integer Unix seconds (model: "a UTC Unix timestamp"; submit's de-duplication
    note asks for second granularity). A float is truncated to whole seconds."""
    t = type(value)
    if t is float:
        # Compare before int(): int() of inf/NaN raises (every comparison with NaN is
        # false). 0.5 truncates to 0, so the smallest valid float is 1.0.
        if not 1.0 <= value < math.inf:
            problems.append(
                Problem(
                    field, f"{field} must be a positive Unix timestamp in seconds, got {value!r}"
                )
            )
            return None
        if value >= MAX_TIMESTAMP_S + 1:
            problems.append(_milliseconds(field, value))
            return None
        return int(value)
    if t is int:
        if value <= 0:
            problems.append(
                Problem(field, f"{field} must be a positive Unix timestamp in seconds, got {value}")
            )
            return None
        if value > MAX_TIMESTAMP_S:
            problems.append(_milliseconds(field, value))
            return None
        return value
    problems.append(
        Problem(field, f"{field} must be an integer Unix timestamp in seconds, got {_kind(value)}")
    )
    return None


def _milliseconds(field: str, value: object) -> Problem:
    return Problem(
        field,
        f"{field} {value!r} is above {MAX_TIMESTAMP_S} and looks like milliseconds; "
        "send whole Unix seconds",
    )


def _user_id(value: object, problems: list[Problem]) -> str | None:
    """A string, or an integer sent as its decimal string (bool is not an integer)."""
    t = type(value)
    if t is str:
        if value and not value.isspace():
            return value
        problems.append(Problem("user_id", "user_id must not be empty; omit it or send null"))
        return None
    if t is int:
        return str(value)
    problems.append(
        Problem("user_id", f"user_id must be a string or an integer, got {_kind(value)}")
    )
    return None


def _string_identity(value: object, field: str, problems: list[Problem]) -> str | None:
    if type(value) is str:
        if value and not value.isspace():
            return value
        problems.append(Problem(field, f"{field} must not be empty; omit it or send null"))
        return None
    problems.append(Problem(field, f"{field} must be a string, got {_kind(value)}"))
    return None


def _unknown(obj: dict, known: frozenset[str], prefix: str = "") -> tuple[str, ...]:
    if obj.keys() <= known:  # a set view: no temporary set, unlike issuperset(dict)
        return ()
    return tuple(prefix + k for k in obj if k not in known)


# --- metadata ------------------------------------------------------------------------


def _metadata(md: dict, problems: list[Problem]) -> tuple[dict, tuple[str, ...]]:
    """Keep what Intercom keeps (submit, "Metadata behaviour"): null values
    are dropped, then the first 10 keys in the order sent; later keys are ignored by
    Intercom, so they are returned unchecked. Returns (metadata to send, dropped keys).

    The caller's dict is returned as-is unless a key has to be left out.
    """
    out: dict | None = None  # a copy, made only once a key is left out
    dropped: list[str] | None = None
    kept = 0
    for k, v in md.items():
        if v is None:
            if out is None:
                out = dict(islice(md.items(), kept))  # nothing left out so far
            continue
        if kept == MAX_METADATA_KEYS:
            if out is None:
                out = dict(islice(md.items(), kept))
            if dropped is None:
                dropped = [k]
            else:
                dropped.append(k)
            continue
        kept += 1
        t = type(v)
        if t is str or t is int or t is bool:
            pass
        elif t is float:
            if v - v != 0.0:  # inf or NaN: not JSON, orjson.dumps would write null
                problems.append(Problem(f"metadata.{k}", f"metadata.{k} must be a finite number"))
        elif (
            t is dict
            and len(v) == 2
            and (
                # Rich Link / Monetary Amount, valid; _metadata_object explains the rest
                (type(v.get("url")) is str and type(v.get("value")) is str)
                or (
                    type(a := v.get("amount")) is int
                    and a > 0
                    and type(c := v.get("currency")) is str
                    and c
                    and not c.isspace()
                )
            )
        ):
            pass
        elif t is dict:
            _metadata_object(k, v, problems)
        else:
            problems.append(
                Problem(
                    f"metadata.{k}",
                    f"metadata.{k} must be a string, number, boolean, Rich Link or Monetary "
                    f"Amount, got {_kind(v)} (Intercom does not support nested structures)",
                )
            )
        if out is not None:
            out[k] = v
    return (md if out is None else out), (() if dropped is None else tuple(dropped))


def _metadata_object(key: str, v: dict, problems: list[Problem]) -> None:
    """The two object types the types page allows, with exactly their keys:
    Rich Link {url, value} and Monetary Amount {amount: positive int cents, currency}."""
    field = f"metadata.{key}"
    keys = v.keys()
    if keys == _RICH_LINK_KEYS:
        if type(v["url"]) is not str or type(v["value"]) is not str:
            problems.append(
                Problem(field, f"{field} is a Rich Link: url and value must both be strings")
            )
    elif keys == _AMOUNT_KEYS:
        amount, currency = v["amount"], v["currency"]
        if type(amount) is not int or amount <= 0:
            problems.append(
                Problem(
                    field,
                    f"{field} is a Monetary Amount: amount must be a positive integer "
                    f"(cents), got {amount!r}",
                )
            )
        if type(currency) is not str or not currency or currency.isspace():
            problems.append(
                Problem(
                    field,
                    f"{field} is a Monetary Amount: currency must be a non-empty string "
                    f'such as "usd", got {currency!r}',
                )
            )
    else:
        problems.append(
            Problem(
                field,
                f"{field} is an object, so it must be a Rich Link with exactly the keys "
                f"url and value, or a Monetary Amount with exactly the keys amount and "
                f"currency; got keys {sorted(keys)}",
            )
        )


# --- POST /events --------------------------------------------------------------------


def validate_event(
    workspace_id: str, obj: object, received_at: float
) -> Normalised | list[Problem]:
    """One data event for POST /events, checked and normalised; all problems collected.

    workspace_id comes first so that intake binds it with functools.partial(validate_event,
    workspace_id): a partial with only positional arguments is called through vectorcall,
    one with a keyword builds a kwargs dict per call (~100 ns more per event).

    The body carries only event_name, created_at, user_id, email, id and metadata, in
    that order and only when present. A missing created_at is stamped with received_at.
    """
    if type(obj) is not dict:
        return [Problem("body", f"an event must be a JSON object, got {_kind(obj)}")]
    problems: list[Problem] = []
    get = obj.get

    # Each field has an inline fast path for the valid case; the helper it falls back
    # to re-checks the value and reports what is wrong.
    name = get("event_name")
    if type(name) is str and name and not name.isspace():
        name = name.lower().replace(".", "-").replace("$", "-")
    else:
        name = _event_name(name, "event_name", problems)

    created_at = get("created_at")
    if created_at is None:
        created_at = int(received_at)
    elif type(created_at) is not int or not 0 < created_at <= MAX_TIMESTAMP_S:
        created_at = _timestamp(created_at, "created_at", problems)

    # model: user_id "yes if no email", email "yes if no user_id", id "yes if
    # no email or user_id". null is treated as absent, like every optional field here.
    user_id = get("user_id")
    email = get("email")
    contact_id = get("id")
    sent_identity = not (user_id is None and email is None and contact_id is None)
    if user_id is not None and (type(user_id) is not str or not user_id or user_id.isspace()):
        user_id = _user_id(user_id, problems)
    if email is not None and (type(email) is not str or not email or email.isspace()):
        email = _string_identity(email, "email", problems)
    if contact_id is not None and (
        type(contact_id) is not str or not contact_id or contact_id.isspace()
    ):
        contact_id = _string_identity(contact_id, "id", problems)
    if user_id is not None:
        kind, identity = "user_id", user_id
    elif email is not None:
        kind, identity = "email", email
    elif contact_id is not None:
        kind, identity = "id", contact_id
    elif not sent_identity:
        problems.append(Problem("user_id", "one of user_id, email or id is required", NOT_FOUND))
    # else: each identity field that was sent is invalid and already has its own problem

    md = get("metadata")
    dropped: tuple[str, ...] = ()
    if md is not None:
        if type(md) is dict and len(md) <= MAX_METADATA_KEYS \
                and _PLAIN_TYPES.issuperset(map(type, md.values())):
            pass  # strings, integers, booleans only: sent as-is (checked in C, not a loop)
        elif type(md) is dict:
            md, dropped = _metadata(md, problems)
        else:
            problems.append(Problem("metadata", f"metadata must be an object, got {_kind(md)}"))

    if problems:
        return problems

    out = {"event_name": name, "created_at": created_at}
    if user_id is not None:
        out["user_id"] = user_id
    if email is not None:
        out["email"] = email
    if contact_id is not None:
        out["id"] = contact_id
    if md:
        out["metadata"] = md
    # event_key(workspace_id, kind, identity, name, created_at), written out: the call
    # frame was ~40% of its cost (597 vs 358 ns, timeit). test_validate checks they agree.
    h = (_key_prefixes.get(workspace_id) or _key_prefix(workspace_id)).copy()
    h.update(orjson.dumps((kind, identity, name, created_at)))
    return _new_normalised(Normalised, (
        # positional: keyword arguments cost ~150 ns more per event
        Event(
            # orjson's bytes as they come (in a ~4 KB buffer): the queue keeps an exact copy
            orjson.dumps(out),
            h.digest(),
            _EVENTS,
            0,
            received_at,
        ),
        dropped,
        () if obj.keys() <= _EVENT_FIELDS else _unknown(obj, _EVENT_FIELDS),
    ))


# --- POST /events/summaries ----------------------------------------------------------


def validate_summaries(obj: object, received_at: float) -> Normalised | list[Problem]:
    """A body for POST /events/summaries, following the openapi schema
    create_data_event_summaries_request: user_id plus ONE event_summaries object
    {event_name, count, first, last}. Not de-duplicated (key b"")."""
    if type(obj) is not dict:
        return [Problem("body", f"an event summary must be a JSON object, got {_kind(obj)}")]
    problems: list[Problem] = []

    user_id = obj.get("user_id")
    if user_id is None:
        problems.append(Problem("user_id", "user_id is required", NOT_FOUND))
    else:
        user_id = _user_id(user_id, problems)

    summary = obj.get("event_summaries")
    out_summary: dict | None = None
    unknown_inner: tuple[str, ...] = ()
    if type(summary) is dict:
        name = _event_name(summary.get("event_name"), "event_summaries.event_name", problems)
        count = summary.get("count")
        if count is None:
            problems.append(
                Problem("event_summaries.count", "event_summaries.count is required", NOT_FOUND)
            )
        elif type(count) is not int or count < 1:
            problems.append(
                Problem(
                    "event_summaries.count",
                    f"event_summaries.count must be an integer >= 1, got {count!r}",
                )
            )
        first = _required_timestamp(summary.get("first"), "event_summaries.first", problems)
        last = _required_timestamp(summary.get("last"), "event_summaries.last", problems)
        if first is not None and last is not None and first > last:
            problems.append(
                Problem(
                    "event_summaries.last",
                    f"event_summaries.last ({last}) must not be before "
                    f"event_summaries.first ({first})",
                )
            )
        out_summary = {"event_name": name, "count": count, "first": first, "last": last}
        unknown_inner = _unknown(summary, _SUMMARY_FIELDS, "event_summaries.")
    elif summary is None:
        problems.append(Problem("event_summaries", "event_summaries is required", NOT_FOUND))
    elif type(summary) is list:
        problems.append(
            Problem(
                "event_summaries",
                "event_summaries must be one object {event_name, count, first, last}, not "
                "an array (Intercom's create_data_event_summaries_request); send one "
                "request per summary",
            )
        )
    else:
        problems.append(
            Problem(
                "event_summaries",
                f"event_summaries must be an object {{event_name, count, first, last}}, "
                f"got {_kind(summary)}",
            )
        )

    if problems:
        return problems
    return Normalised(
        Event(
            body=orjson.dumps({"user_id": user_id, "event_summaries": out_summary}),
            key=b"",
            route=Route.SUMMARIES,
            first_received_at=received_at,
        ),
        (),
        _unknown(obj, _SUMMARIES_FIELDS) + unknown_inner,
    )


def _required_timestamp(value: object, field: str, problems: list[Problem]) -> int | None:
    if value is None:
        problems.append(Problem(field, f"{field} is required", NOT_FOUND))
        return None
    return _timestamp(value, field, problems)
