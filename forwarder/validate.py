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

Input is what orjson.loads produced, so types are checked with `type(x) is`: exact, and
a bool is never taken for an int. Each documented rule of POST /events has one helper
(_event_name, _created_at, _identity, _metadata), called in the order the problems
are reported; the body is serialised once.
"""

from __future__ import annotations

import functools
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
# Metadata values that need no further check (a float must be finite, an object must be
# a Rich Link or Monetary Amount, null is dropped: _metadata() checks those one by one).
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
    """An accepted write, plus what was left out of it on the way (for metrics/logs)."""

    event: Event
    dropped_metadata_keys: tuple[str, ...] = ()
    unknown_fields: tuple[str, ...] = ()


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
    for lineno, line in enumerate(body.split(b"\n"), 1):
        if not line or line.isspace():
            continue
        try:
            items.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            items.append(Problem("body", f"line {lineno} is not valid JSON: {exc}"))
    return items


def error_body(problems: Sequence[Problem]) -> bytes:
    """Intercom's error list: {"type": "error.list", "errors": [{code, message, field}]}."""
    return orjson.dumps({"type": "error.list", "errors": [p.as_error() for p in problems]})


# --- dedup key -----------------------------------------------------------------------


def event_key(
    workspace_id: str, identity_kind: str, identity: str, event_name: str, created_at: int
) -> bytes:
    """16-byte digest of Intercom's de-duplication key (submit, "Event de-duplication"):
    workspace, contact external id, event name, created time.

    identity_kind ("user_id", "email", "id") is part of the key so that user_id "a@b.c"
    and email "a@b.c" never collide. The parts are JSON-encoded, which is unambiguous
    whatever characters they contain (a plain separator is not: "a\\0b"+"c" = "a"+"b\\0c").
    The workspace is hashed first and on its own: keys are kept in the spool across
    restarts, so the digest of the same event must not change from one version to the next.
    """
    h = _workspace_hasher(workspace_id).copy()
    h.update(orjson.dumps((identity_kind, identity, event_name, created_at)))
    return h.digest()


@functools.lru_cache(maxsize=16)  # workspaces come from config: one or two
def _workspace_hasher(workspace_id: str) -> blake2b:
    """A hasher already fed with the workspace, for event_key to copy (hashlib's copy():
    digests that share an initial substring) instead of building one per event.

    Kept for the batch floor (0.15x bare; measured 0.15-0.20 without it): with the
    positional Normalised in validate_event, +6.5% batch events/s (bench/ab_intake.py)."""
    return blake2b(orjson.dumps(workspace_id), digest_size=16)


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
    """Required non-empty string, normalised as Intercom stores it (model): names are
    case-insensitive, and '.' and '$' are replaced with '-'."""
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
    """Integer Unix seconds (model: "a UTC Unix timestamp"; submit's de-duplication note
    asks for second granularity). A float is truncated to whole seconds."""
    t = type(value)
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


def _metadata(md: object, problems: list[Problem]) -> tuple[dict, tuple[str, ...]]:
    """Optional (model; null is absent); when sent, an object. Keep what Intercom keeps
    (submit, "Metadata behaviour"): null values are dropped, then the first 10 keys in
    the order sent; later keys are ignored by Intercom, so they are returned unchecked.
    Returns (metadata to send, possibly empty; dropped keys).

    The caller's dict is returned as-is unless a key has to be left out.
    """
    if md is None:
        return {}, ()
    if type(md) is not dict:
        problems.append(Problem("metadata", f"metadata must be an object, got {_kind(md)}"))
        return {}, ()
    if len(md) <= MAX_METADATA_KEYS and _PLAIN_TYPES.issuperset(map(type, md.values())):
        # Strings, integers and booleans only, the shape apps send: nothing to leave out
        # or check one by one. Checked in C: with 4 keys the loop below runs ~2,400 more
        # instructions (callgrind, validate_event alone), ~4% of a batched event's cost.
        return md, ()
    out: dict | None = None  # a copy, made only once a key is left out
    dropped: list[str] = []
    kept = 0
    for k, v in md.items():
        if v is None or kept == MAX_METADATA_KEYS:
            if out is None:
                out = dict(islice(md.items(), kept))  # nothing left out so far
            if v is not None:
                dropped.append(k)
            continue
        kept += 1
        _metadata_value(k, v, problems)
        if out is not None:
            out[k] = v
    return (md if out is None else out), tuple(dropped)


def _metadata_value(key: str, v: object, problems: list[Problem]) -> None:
    """One kept value (types; submit, "Metadata Object"): a string (Date, Link and Stripe
    identifiers are strings too), a number, a boolean, a Rich Link or a Monetary Amount.
    Nested structures are not supported."""
    t = type(v)
    if t is str or t is int or t is bool:
        return
    field = f"metadata.{key}"
    if t is float:
        if not math.isfinite(v):  # orjson.dumps would write null
            problems.append(Problem(field, f"{field} must be a finite number"))
    elif t is dict:
        _metadata_object(field, v, problems)
    else:
        problems.append(
            Problem(
                field,
                f"{field} must be a string, number, boolean, Rich Link or Monetary "
                f"Amount, got {_kind(v)} (Intercom does not support nested structures)",
            )
        )


def _metadata_object(field: str, v: dict, problems: list[Problem]) -> None:
    """The two object types allowed (types), with exactly their keys: Rich Link {url,
    value} and Monetary Amount {amount: positive int cents, currency}."""
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
    """One data event for POST /events, checked and normalised; all problems collected,
    in the order of the rules below.

    The body carries only event_name, created_at, user_id, email, id and metadata, in
    that order and only when present. A missing created_at is stamped with received_at
    (wall-clock seconds). workspace_id comes first so that intake can bind it with
    functools.partial.
    """
    if type(obj) is not dict:
        return [Problem("body", f"an event must be a JSON object, got {_kind(obj)}")]
    problems: list[Problem] = []
    name = _event_name(obj.get("event_name"), "event_name", problems)
    created_at = _created_at(obj.get("created_at"), received_at, problems)
    identity = _identity(obj, problems)
    metadata, dropped = _metadata(obj.get("metadata"), problems)
    if problems:
        return problems

    out: dict[str, object] = {"event_name": name, "created_at": created_at, **identity}
    if metadata:
        out["metadata"] = metadata
    kind, value = next(iter(identity.items()))  # user_id, else email, else id
    event = Event(
        # orjson's bytes as they come (in a ~4 KB buffer): the queue keeps an exact copy
        body=orjson.dumps(out),
        key=event_key(workspace_id, kind, value, name, created_at),
        route=Route.EVENTS,
        first_received_at=received_at,
    )
    # Positional (keywords build a dict per call): see _workspace_hasher for the figure.
    return Normalised(event, dropped, _unknown(obj, _EVENT_FIELDS))


def _created_at(value: object, received_at: float, problems: list[Problem]) -> int | None:
    """Integer Unix seconds (_timestamp). Missing or null: stamped with int(received_at),
    so the body and the dedup key always have one (model lists it as required; the
    forwarder supplies it rather than reject the event)."""
    if value is None:
        return int(received_at)
    return _timestamp(value, "created_at", problems)


def _identity(obj: dict, problems: list[Problem]) -> dict[str, str | None]:
    """The contact's identity fields that were sent, in the order user_id, email, id
    (model: user_id "yes if no email", email "yes if no user_id", id "yes if no email or
    user_id"); the first one is the contact's identity in the dedup key. null is absent,
    like every optional field here. Every field sent is checked, even when another one
    is valid; an invalid one maps to None, beside its problem."""
    user_id, email, contact_id = obj.get("user_id"), obj.get("email"), obj.get("id")
    if user_id is None and email is None and contact_id is None:
        problems.append(Problem("user_id", "one of user_id, email or id is required", NOT_FOUND))
        return {}
    identity: dict[str, str | None] = {}
    if user_id is not None:
        identity["user_id"] = _user_id(user_id, problems)
    if email is not None:
        identity["email"] = _string_identity(email, "email", problems)
    if contact_id is not None:
        identity["id"] = _string_identity(contact_id, "id", problems)
    return identity


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
        event=Event(
            body=orjson.dumps({"user_id": user_id, "event_summaries": out_summary}),
            key=b"",
            route=Route.SUMMARIES,
            first_received_at=received_at,
        ),
        unknown_fields=_unknown(obj, _SUMMARIES_FIELDS) + unknown_inner,
    )


def _required_timestamp(value: object, field: str, problems: list[Problem]) -> int | None:
    if value is None:
        problems.append(Problem(field, f"{field} is required", NOT_FOUND))
        return None
    return _timestamp(value, field, problems)
