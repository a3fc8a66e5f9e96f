"""validate.py: one parametrized row per documented rule, ids named after the rule.

Rules come from Intercom's Data Events documentation; docs/validation.md names the page
of each (for example "Submit a data event",
https://developers.intercom.com/docs/references/rest-api/api.intercom.io/data-events/createdataevent).
"""

from __future__ import annotations

import orjson
import pytest

from forwarder.event import Route
from forwarder.validate import (
    MAX_TIMESTAMP_S,
    Normalised,
    Problem,
    error_body,
    event_key,
    parse_json,
    parse_ndjson,
    validate_event,
    validate_summaries,
)

RECEIVED_AT = 1_700_000_123.75
WS = "ws-1"


def validate(obj: object) -> Normalised | list[Problem]:
    return validate_event(WS, obj, RECEIVED_AT)


def accepted(obj: object) -> Normalised:
    result = validate(obj)
    assert isinstance(result, Normalised), result
    return result


def body_of(obj: object) -> dict:
    return orjson.loads(accepted(obj).event.body)


def ev(**fields: object) -> dict:
    """A valid, already-normalised event with fields replaced (... removes a field).

    Used for both the input and the body expected from it.
    """
    base: dict = {"event_name": "placed-order", "created_at": 1389913941, "user_id": "314159"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


# --- POST /events: accepted and normalised ---------------------------------------------

ACCEPT = [
    pytest.param(
        ev(event_name="Completed-Order"),
        ev(event_name="completed-order"),
        id="event_name_is_lower_cased",
    ),
    pytest.param(
        ev(event_name="completed.order$v2"),
        ev(event_name="completed-order-v2"),
        id="event_name_dots_and_dollars_become_hyphens",
    ),
    pytest.param(
        ev(event_name=" spaced name "),
        ev(event_name=" spaced name "),
        id="event_name_is_not_stripped",
    ),
    pytest.param(
        ev(created_at=...),
        ev(created_at=1_700_000_123),
        id="created_at_missing_is_stamped_with_received_at",
    ),
    pytest.param(
        ev(created_at=None),
        ev(created_at=1_700_000_123),
        id="created_at_null_is_stamped_with_received_at",
    ),
    pytest.param(
        ev(created_at=1389913941.999),
        ev(created_at=1389913941),
        id="created_at_float_is_truncated_to_seconds",
    ),
    pytest.param(
        ev(created_at=1),
        ev(created_at=1),
        id="created_at_smallest_positive_second",
    ),
    pytest.param(
        ev(created_at=MAX_TIMESTAMP_S),
        ev(created_at=MAX_TIMESTAMP_S),
        id="created_at_10e11_is_still_seconds",
    ),
    pytest.param(
        ev(user_id=314159),
        ev(user_id="314159"),
        id="user_id_integer_becomes_decimal_string",
    ),
    pytest.param(
        ev(user_id=..., email="pi@example.org"),
        ev(user_id=..., email="pi@example.org"),
        id="email_alone_identifies_the_user",
    ),
    pytest.param(
        ev(user_id=..., id="8a88a590-e1c3-41e2-a502-e0649dbf721c"),
        ev(user_id=..., id="8a88a590-e1c3-41e2-a502-e0649dbf721c"),
        id="id_alone_identifies_a_lead",
    ),
    pytest.param(
        ev(user_id=None, email="pi@example.org"),
        ev(user_id=..., email="pi@example.org"),
        id="identity_null_is_absent",
    ),
    pytest.param(
        ev(email="pi@example.org", id="abc"),
        ev(user_id="314159", email="pi@example.org", id="abc"),
        id="all_identities_are_forwarded",
    ),
    pytest.param(
        ev(metadata=None),
        ev(),
        id="metadata_null_is_absent",
    ),
    pytest.param(
        ev(metadata={}),
        ev(),
        id="metadata_empty_is_omitted",
    ),
    pytest.param(
        ev(metadata={"a": None, "b": None}),
        ev(),
        id="metadata_empty_after_dropping_nulls_is_omitted",
    ),
    pytest.param(
        ev(metadata={"a": "x", "gone": None, "b": 2}),
        ev(metadata={"a": "x", "b": 2}),
        id="metadata_null_values_are_dropped",
    ),
    pytest.param(
        ev(metadata={"source": "desktop", "load": 3.67, "n": -4, "paid": False}),
        ev(metadata={"source": "desktop", "load": 3.67, "n": -4, "paid": False}),
        id="metadata_string_number_boolean",
    ),
    pytest.param(
        ev(metadata={"contact_date": 1392036272, "contacted_at": 1392036272}),
        ev(metadata={"contact_date": 1392036272, "contacted_at": 1392036272}),
        id="metadata_date",
    ),
    pytest.param(
        ev(metadata={"article": "https://example.org/ab1de.html"}),
        ev(metadata={"article": "https://example.org/ab1de.html"}),
        id="metadata_link",
    ),
    pytest.param(
        ev(metadata={"stripe_invoice": "inv_3434343434"}),
        ev(metadata={"stripe_invoice": "inv_3434343434"}),
        id="metadata_stripe_data",
    ),
    pytest.param(
        ev(metadata={"order": {"url": "https://example.org/o/1", "value": "3434-3434"}}),
        ev(metadata={"order": {"url": "https://example.org/o/1", "value": "3434-3434"}}),
        id="metadata_rich_link",
    ),
    pytest.param(
        ev(metadata={"price": {"amount": 34999, "currency": "eur"}}),
        ev(metadata={"price": {"amount": 34999, "currency": "eur"}}),
        id="metadata_monetary_amount",
    ),
    pytest.param(
        ev(metadata={f"k{i}": i for i in range(12)}),
        ev(metadata={f"k{i}": i for i in range(10)}),
        id="metadata_first_10_keys_in_order_sent_are_kept",
    ),
    pytest.param(
        ev(metadata={**{f"k{i}": i for i in range(10)}, "k10": [1], "k11": {"deep": {}}}),
        ev(metadata={f"k{i}": i for i in range(10)}),
        id="metadata_keys_beyond_10_are_not_checked",
    ),
    pytest.param(
        ev(metadata={"n0": None, **{f"k{i}": i for i in range(10)}, "n1": None}),
        ev(metadata={f"k{i}": i for i in range(10)}),
        id="metadata_nulls_do_not_count_toward_10",
    ),
    pytest.param(
        ev(type="event", intercom_user_id="x", metadata={"a": 1}),
        ev(metadata={"a": 1}),
        id="unknown_fields_are_not_forwarded",
    ),
]


@pytest.mark.parametrize(("event", "expected"), ACCEPT)
def test_event_is_accepted_and_normalised(event: dict, expected: dict) -> None:
    assert body_of(event) == expected


# --- POST /events: rejected ---------------------------------------------------------

REJECT = [
    pytest.param([ev()], "body", "got an array", id="body_array_is_not_an_event"),
    pytest.param("placed-order", "body", "got a string", id="body_string_is_not_an_event"),
    pytest.param(42, "body", "got a number", id="body_number_is_not_an_event"),
    pytest.param(None, "body", "got null", id="body_null_is_not_an_event"),
    pytest.param(ev(event_name=...), "event_name", "required", id="event_name_missing"),
    pytest.param(ev(event_name=None), "event_name", "required", id="event_name_null"),
    pytest.param(ev(event_name=""), "event_name", "empty", id="event_name_empty"),
    pytest.param(ev(event_name=" \t\n"), "event_name", "empty", id="event_name_whitespace_only"),
    pytest.param(ev(event_name=12), "event_name", "must be a string", id="event_name_number"),
    pytest.param(ev(event_name=["a"]), "event_name", "must be a string", id="event_name_array"),
    pytest.param(ev(created_at="1389913941"), "created_at", "got a string", id="created_at_string"),
    pytest.param(ev(created_at=True), "created_at", "got a boolean", id="created_at_boolean"),
    pytest.param(ev(created_at={}), "created_at", "got an object", id="created_at_object"),
    pytest.param(ev(created_at=0), "created_at", "positive", id="created_at_zero"),
    pytest.param(ev(created_at=-5), "created_at", "positive", id="created_at_negative"),
    pytest.param(
        ev(created_at=0.9), "created_at", "positive", id="created_at_float_truncates_to_zero"
    ),
    pytest.param(ev(created_at=-0.5), "created_at", "positive", id="created_at_negative_float"),
    pytest.param(
        ev(created_at=1_700_000_000_000),
        "created_at",
        "looks like milliseconds",
        id="created_at_milliseconds",
    ),
    pytest.param(
        ev(created_at=MAX_TIMESTAMP_S + 1),
        "created_at",
        "looks like milliseconds",
        id="created_at_just_above_10e11",
    ),
    pytest.param(
        ev(created_at=1_700_000_000_000.5),
        "created_at",
        "looks like milliseconds",
        id="created_at_float_milliseconds",
    ),
    pytest.param(
        ev(created_at=float("nan")), "created_at", "positive", id="created_at_not_a_number"
    ),
    pytest.param(
        ev(user_id=...),
        "user_id",
        "one of user_id, email or id is required",
        id="identity_missing",
    ),
    pytest.param(
        ev(user_id=None, email=None, id=None),
        "user_id",
        "one of user_id, email or id is required",
        id="identity_all_null",
    ),
    pytest.param(ev(user_id=True), "user_id", "got a boolean", id="user_id_boolean"),
    pytest.param(ev(user_id=3.5), "user_id", "got a number", id="user_id_float"),
    pytest.param(ev(user_id=["1"]), "user_id", "got an array", id="user_id_array"),
    pytest.param(ev(user_id=""), "user_id", "must not be empty", id="user_id_empty"),
    pytest.param(ev(user_id="  "), "user_id", "must not be empty", id="user_id_whitespace"),
    pytest.param(ev(user_id=..., email=42), "email", "must be a string", id="email_not_string"),
    pytest.param(ev(user_id=..., email=""), "email", "must not be empty", id="email_empty"),
    pytest.param(ev(user_id=..., id=7), "id", "must be a string", id="id_not_string"),
    pytest.param(ev(user_id=..., id=""), "id", "must not be empty", id="id_empty"),
    pytest.param(
        ev(email=False), "email", "must be a string", id="bad_email_rejected_even_with_user_id"
    ),
    pytest.param(ev(metadata=[1]), "metadata", "must be an object", id="metadata_array"),
    pytest.param(ev(metadata="a=1"), "metadata", "must be an object", id="metadata_string"),
    pytest.param(
        ev(metadata={"tags": ["a", "b"]}),
        "metadata.tags",
        "got an array",
        id="metadata_array_value",
    ),
    pytest.param(
        ev(metadata={"ctx": {"a": 1}}),
        "metadata.ctx",
        "exactly the keys",
        id="metadata_other_object",
    ),
    pytest.param(
        ev(metadata={"ctx": {}}), "metadata.ctx", "exactly the keys", id="metadata_empty_object"
    ),
    pytest.param(
        ev(metadata={"link": {"url": "https://e.org", "value": "v", "title": "t"}}),
        "metadata.link",
        "exactly the keys",
        id="metadata_rich_link_extra_key",
    ),
    pytest.param(
        ev(metadata={"link": {"url": "https://e.org"}}),
        "metadata.link",
        "exactly the keys",
        id="metadata_rich_link_missing_value",
    ),
    pytest.param(
        ev(metadata={"link": {"url": 5, "value": "v"}}),
        "metadata.link",
        "url and value must both be strings",
        id="metadata_rich_link_url_not_string",
    ),
    pytest.param(
        ev(metadata={"link": {"url": "https://e.org", "value": {"nested": "x"}}}),
        "metadata.link",
        "url and value must both be strings",
        id="metadata_rich_link_nested_value",
    ),
    pytest.param(
        ev(metadata={"price": {"amount": 0, "currency": "usd"}}),
        "metadata.price",
        "positive integer",
        id="metadata_amount_zero",
    ),
    pytest.param(
        ev(metadata={"price": {"amount": -100, "currency": "usd"}}),
        "metadata.price",
        "positive integer",
        id="metadata_amount_negative",
    ),
    pytest.param(
        ev(metadata={"price": {"amount": 9.99, "currency": "usd"}}),
        "metadata.price",
        "positive integer",
        id="metadata_amount_float",
    ),
    pytest.param(
        ev(metadata={"price": {"amount": True, "currency": "usd"}}),
        "metadata.price",
        "positive integer",
        id="metadata_amount_boolean",
    ),
    pytest.param(
        ev(metadata={"price": {"amount": "2999", "currency": "usd"}}),
        "metadata.price",
        "positive integer",
        id="metadata_amount_string",
    ),
    pytest.param(
        ev(metadata={"price": {"amount": 2999, "currency": ""}}),
        "metadata.price",
        "currency must be a non-empty string",
        id="metadata_currency_empty",
    ),
    pytest.param(
        ev(metadata={"price": {"amount": 2999, "currency": 840}}),
        "metadata.price",
        "currency must be a non-empty string",
        id="metadata_currency_not_string",
    ),
    pytest.param(
        ev(metadata={"price": {"amount": 2999, "currency": "usd", "tax": 1}}),
        "metadata.price",
        "exactly the keys",
        id="metadata_amount_extra_key",
    ),
    pytest.param(
        ev(metadata={"load": float("inf")}),
        "metadata.load",
        "finite number",
        id="metadata_number_not_finite",
    ),
]


@pytest.mark.parametrize(("event", "field", "message_part"), REJECT)
def test_event_breaking_a_rule_gets_one_problem_naming_the_field(
    event: object, field: str, message_part: str
) -> None:
    result = validate(event)
    assert isinstance(result, list)
    assert [p.field for p in result] == [field]
    assert message_part in result[0].message


@pytest.mark.parametrize(
    ("event", "code"),
    [
        pytest.param(ev(event_name=...), "parameter_not_found", id="missing_event_name"),
        pytest.param(ev(user_id=...), "parameter_not_found", id="missing_identity"),
        pytest.param(ev(event_name=5), "parameter_invalid", id="wrong_type"),
        pytest.param(ev(metadata={"x": []}), "parameter_invalid", id="bad_metadata_value"),
    ],
)
def test_missing_fields_use_intercoms_not_found_code_and_bad_values_invalid(
    event: dict, code: str
) -> None:
    result = validate(event)
    assert isinstance(result, list)
    assert [p.code for p in result] == [code]


def test_every_problem_in_an_event_is_reported_not_just_the_first() -> None:
    result = validate(
        {
            "event_name": "",
            "created_at": "yesterday",
            "email": 5,
            "metadata": {"ok": 1, "tags": [1], "price": {"amount": 0, "currency": ""}},
        }
    )
    assert isinstance(result, list)
    assert [p.field for p in result] == [
        "event_name",
        "created_at",
        "email",
        "metadata.tags",
        "metadata.price",
        "metadata.price",
    ]


def test_invalid_user_id_is_reported_even_when_a_valid_email_is_sent() -> None:
    result = validate(ev(user_id=True, email="pi@example.org"))
    assert isinstance(result, list)
    assert [p.field for p in result] == ["user_id"]


def test_huge_integer_user_id_decodes_as_float_and_is_rejected() -> None:
    obj = parse_json(b'{"event_name":"x","user_id":123456789012345678901234567890}')
    result = validate(obj)
    assert isinstance(result, list)
    assert [p.field for p in result] == ["user_id"]


def test_huge_integer_created_at_is_rejected_as_milliseconds() -> None:
    obj = parse_json(b'{"event_name":"x","user_id":"1","created_at":99999999999999999999999}')
    result = validate(obj)
    assert isinstance(result, list)
    assert [(p.field, "milliseconds" in p.message) for p in result] == [("created_at", True)]


# --- POST /events: what is left out, and the Event ---------------------------------------


def test_body_has_known_fields_in_fixed_order_and_nothing_else() -> None:
    event = {
        "metadata": {"b": 1, "a": "x"},
        "extra": True,
        "id": "lead-1",
        "email": "pi@example.org",
        "user_id": 42,
        "created_at": 1389913941.5,
        "event_name": "Placed.Order",
    }
    assert accepted(event).event.body == (
        b'{"event_name":"placed-order","created_at":1389913941,"user_id":"42",'
        b'"email":"pi@example.org","id":"lead-1","metadata":{"b":1,"a":"x"}}'
    )


def test_keys_beyond_10_are_reported_as_dropped_in_order_sent() -> None:
    metadata = {f"k{i}": i for i in range(10)}
    metadata.update({"z_late": "x", "a_later": [1], "null_late": None})
    result = accepted(ev(metadata=metadata))
    assert result.dropped_metadata_keys == ("z_late", "a_later")


def test_null_metadata_values_are_not_reported_as_dropped_keys() -> None:
    assert accepted(ev(metadata={"a": None, "b": 1})).dropped_metadata_keys == ()


def test_unknown_fields_are_reported_in_order_sent() -> None:
    result = accepted({"zeta": 1, **ev(), "alpha": None, "type": "event"})
    assert result.unknown_fields == ("zeta", "alpha", "type")
    assert b"zeta" not in result.event.body and b"alpha" not in result.event.body


def test_clean_event_reports_nothing_dropped() -> None:
    result = accepted(ev(metadata={"a": 1}))
    assert (result.dropped_metadata_keys, result.unknown_fields) == ((), ())


def test_input_is_not_modified() -> None:
    metadata = {"a": None, **{f"k{i}": i for i in range(11)}}
    event = ev(event_name="Placed.Order", user_id=7, metadata=metadata, extra=1)
    snapshot = orjson.dumps(event)
    accepted(event)
    assert orjson.dumps(event) == snapshot


def test_event_routes_to_events_with_received_time_and_dedup_key() -> None:
    event = accepted(ev(event_name="Placed.Order", user_id=314159)).event
    assert event.route is Route.EVENTS
    assert event.first_received_at == RECEIVED_AT
    assert event.attempts == 0
    assert event.due == 0.0
    assert event.key == event_key(WS, "user_id", "314159", "placed-order", 1389913941)


# --- dedup key ----------------------------------------------------------------------


def key_of(obj: dict, workspace_id: str = WS, received_at: float = RECEIVED_AT) -> bytes:
    result = validate_event(workspace_id, obj, received_at)
    assert isinstance(result, Normalised), result
    return result.event.key


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param(
            ev(event_name="Placed.Order"),
            ev(event_name="placed-order"),
            id="raw_name_case_and_dots",
        ),
        pytest.param(
            ev(event_name="placed$order"), ev(event_name="PLACED.ORDER"), id="raw_name_dollar"
        ),
        pytest.param(ev(metadata={"a": 1}), ev(metadata={"b": "x"}), id="metadata_differs"),
        pytest.param(ev(), ev(metadata=None, extra=1), id="unknown_fields_differ"),
        pytest.param(ev(user_id=314159), ev(user_id="314159"), id="integer_and_string_user_id"),
        pytest.param(ev(created_at=1389913941), ev(created_at=1389913941.7), id="float_created_at"),
        pytest.param(
            ev(email="pi@example.org"), ev(email="other@example.org"), id="user_id_wins_over_email"
        ),
        pytest.param(
            ev(user_id=..., email="pi@example.org"),
            ev(user_id=..., email="pi@example.org", id="lead-1"),
            id="email_wins_over_id",
        ),
    ],
)
def test_same_dedup_key(a: dict, b: dict) -> None:
    assert key_of(a) == key_of(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param(
            ev(user_id="a@b.c"), ev(user_id=..., email="a@b.c"), id="user_id_vs_email_same_value"
        ),
        pytest.param(ev(user_id=..., email="x"), ev(user_id=..., id="x"), id="email_vs_id"),
        pytest.param(ev(user_id="1"), ev(user_id="2"), id="different_user"),
        pytest.param(ev(event_name="a"), ev(event_name="b"), id="different_name"),
        pytest.param(ev(created_at=100), ev(created_at=101), id="different_second"),
    ],
)
def test_different_dedup_key(a: dict, b: dict) -> None:
    assert key_of(a) != key_of(b)


def test_same_event_in_two_workspaces_has_different_keys() -> None:
    assert key_of(ev(), workspace_id="ws-1") != key_of(ev(), workspace_id="ws-2")


def test_events_without_created_at_share_a_key_only_within_the_same_second() -> None:
    no_time = ev(created_at=...)
    assert key_of(no_time, received_at=1000.1) == key_of(no_time, received_at=1000.9)
    assert key_of(no_time, received_at=1000.9) != key_of(no_time, received_at=1001.0)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param(
            ("w", "user_id", "a\x00b", "c", 1), ("w", "user_id", "a", "b\x00c", 1), id="nul"
        ),
        pytest.param(
            ("w", "user_id", 'a","b', "c", 1), ("w", "user_id", "a", 'b","c', 1), id="quote"
        ),
        pytest.param(
            ("wa", "user_id", "b", "c", 1), ("w", "user_id", "ab", "c", 1), id="workspace"
        ),
        pytest.param(
            ("w", "user_id", "a", "b1", 1), ("w", "user_id", "a", "b", 11), id="name_time"
        ),
    ],
)
def test_key_parts_cannot_run_into_each_other(a: tuple, b: tuple) -> None:
    assert event_key(*a) != event_key(*b)


@pytest.mark.parametrize(
    "identity",
    [{"user_id": "u-1"}, {"email": "a@b.c"}, {"id": "6f1"}],
    ids=["user_id", "email", "id"],
)
@pytest.mark.parametrize("workspace_id", [WS, "another-workspace"])
def test_key_is_intercoms_composite_key_for_each_identity_kind(
    identity: dict, workspace_id: str
) -> None:
    """Submit a data event, "Event de-duplication": the workspace, the contact external
    id, the event name and the created time, and nothing else, decide the key."""
    ((kind, value),) = identity.items()
    sent = {"event_name": "Signed.Up", "created_at": 1700000000, **identity}
    key = key_of(sent, workspace_id)
    assert key == event_key(workspace_id, kind, value, "signed-up", 1700000000)
    assert key_of({**sent, "event_name": "signed-up", "metadata": {"plan": "pro"}},
                  workspace_id) == key
    for other in (
        {**sent, kind: value + "2"},
        {**sent, "event_name": "signed-in"},
        {**sent, "created_at": 1700000001},
    ):
        assert key_of(other, workspace_id) != key
    assert key_of(sent, workspace_id + "2") != key


def test_a_key_is_the_same_digest_in_every_version() -> None:
    """Keys are written to the spool and re-added to the dedup window at start: an
    upgrade that changed them would forward a resent spooled event a second time."""
    key = event_key("ws-1", "user_id", "314159", "placed-order", 1389913941)
    assert key.hex() == "936db86c267e4aee6e4f6e04b8da0c8a"


def test_key_is_a_16_byte_digest() -> None:
    assert len(event_key(WS, "user_id", "1", "x", 1)) == 16


# --- POST /events/summaries -----------------------------------------------------------


def summary(**fields: object) -> dict:
    inner: dict = {
        "event_name": "invited-friend",
        "count": 3,
        "first": 1671028894,
        "last": 1671028999,
    }
    inner.update(fields)
    return {
        "user_id": "314159",
        "event_summaries": {k: v for k, v in inner.items() if v is not ...},
    }


def validate_s(obj: object) -> Normalised | list[Problem]:
    return validate_summaries(obj, received_at=RECEIVED_AT)


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        pytest.param(
            summary(),
            {"user_id": "314159", "event_summaries": summary()["event_summaries"]},
            id="summary_as_sent",
        ),
        pytest.param(
            summary(event_name="Invited.Friend$"),
            {
                "user_id": "314159",
                "event_summaries": {
                    **summary()["event_summaries"],
                    "event_name": "invited-friend-",
                },
            },
            id="summary_event_name_normalised",
        ),
        pytest.param(
            {**summary(), "user_id": 314159},
            {"user_id": "314159", "event_summaries": summary()["event_summaries"]},
            id="summary_user_id_integer_becomes_string",
        ),
        pytest.param(
            summary(first=1671028894, last=1671028894, count=1),
            {
                "user_id": "314159",
                "event_summaries": {
                    "event_name": "invited-friend",
                    "count": 1,
                    "first": 1671028894,
                    "last": 1671028894,
                },
            },
            id="summary_first_equals_last",
        ),
        pytest.param(
            summary(first=1671028894.9),
            {"user_id": "314159", "event_summaries": summary()["event_summaries"]},
            id="summary_float_time_truncated",
        ),
    ],
)
def test_summary_is_accepted_and_normalised(obj: dict, expected: dict) -> None:
    result = validate_s(obj)
    assert isinstance(result, Normalised), result
    assert orjson.loads(result.event.body) == expected


def test_summary_event_routes_to_summaries_without_dedup_key() -> None:
    result = validate_s(summary())
    assert isinstance(result, Normalised)
    assert (result.event.route, result.event.key) == (Route.SUMMARIES, b"")
    assert result.event.first_received_at == RECEIVED_AT


def test_summary_unknown_fields_are_dropped_and_reported() -> None:
    obj = summary(extra=1)
    obj["email"] = "pi@example.org"
    result = validate_s(obj)
    assert isinstance(result, Normalised)
    assert result.unknown_fields == ("email", "event_summaries.extra")
    assert b"extra" not in result.event.body and b"email" not in result.event.body


@pytest.mark.parametrize(
    ("obj", "fields", "message_part"),
    [
        pytest.param([summary()], ["body"], "got an array", id="summary_body_not_object"),
        pytest.param(
            {**summary(), "user_id": None}, ["user_id"], "required", id="summary_user_id_missing"
        ),
        pytest.param(
            {**summary(), "user_id": ""}, ["user_id"], "empty", id="summary_user_id_empty"
        ),
        pytest.param(
            {**summary(), "user_id": False}, ["user_id"], "boolean", id="summary_user_id_boolean"
        ),
        pytest.param({"user_id": "1"}, ["event_summaries"], "required", id="summaries_missing"),
        pytest.param(
            {"user_id": "1", "event_summaries": [summary()["event_summaries"]]},
            ["event_summaries"],
            "not an array",
            id="summaries_list_is_not_the_openapi_shape",
        ),
        pytest.param(
            {"user_id": "1", "event_summaries": "x"},
            ["event_summaries"],
            "got a string",
            id="summaries_string",
        ),
        pytest.param(
            summary(event_name=...),
            ["event_summaries.event_name"],
            "required",
            id="summary_event_name_missing",
        ),
        pytest.param(
            summary(event_name=" "),
            ["event_summaries.event_name"],
            "empty",
            id="summary_event_name_blank",
        ),
        pytest.param(
            summary(count=...), ["event_summaries.count"], "required", id="summary_count_missing"
        ),
        pytest.param(summary(count=0), ["event_summaries.count"], ">= 1", id="summary_count_zero"),
        pytest.param(
            summary(count=True), ["event_summaries.count"], ">= 1", id="summary_count_boolean"
        ),
        pytest.param(
            summary(count=2.0), ["event_summaries.count"], ">= 1", id="summary_count_float"
        ),
        pytest.param(
            summary(first=...), ["event_summaries.first"], "required", id="summary_first_missing"
        ),
        pytest.param(
            summary(last=...), ["event_summaries.last"], "required", id="summary_last_missing"
        ),
        pytest.param(
            summary(first=0), ["event_summaries.first"], "positive", id="summary_first_zero"
        ),
        pytest.param(
            summary(first="1671028894"),
            ["event_summaries.first"],
            "got a string",
            id="summary_first_string",
        ),
        pytest.param(
            summary(last=1_671_028_999_000),
            ["event_summaries.last"],
            "milliseconds",
            id="summary_last_milliseconds",
        ),
        pytest.param(
            summary(first=1671028999, last=1671028894),
            ["event_summaries.last"],
            "before",
            id="summary_first_after_last",
        ),
    ],
)
def test_summary_breaking_a_rule_is_rejected(
    obj: object, fields: list[str], message_part: str
) -> None:
    result = validate_s(obj)
    assert isinstance(result, list)
    assert [p.field for p in result] == fields
    assert message_part in result[0].message


def test_summary_reports_every_problem() -> None:
    result = validate_s(
        {"user_id": 1.5, "event_summaries": {"event_name": 1, "count": -1, "first": True}}
    )
    assert isinstance(result, list)
    assert [p.field for p in result] == [
        "user_id",
        "event_summaries.event_name",
        "event_summaries.count",
        "event_summaries.first",
        "event_summaries.last",
    ]


# --- parsing ------------------------------------------------------------------------


def test_parse_json_returns_the_decoded_value() -> None:
    assert parse_json(b' {"event_name": "x", "n": [1, 2.5, null]} \n') == {
        "event_name": "x",
        "n": [1, 2.5, None],
    }


@pytest.mark.parametrize(
    ("body", "message_part"),
    [
        pytest.param(b"", "empty", id="empty_body"),
        pytest.param(b" \r\n\t", "empty", id="whitespace_only_body"),
        pytest.param(b'{"event_name": ', "not valid JSON", id="malformed"),
        pytest.param(b"{'event_name': 'x'}", "not valid JSON", id="single_quotes"),
        pytest.param(b'{"event_name": "caf\xe9"}', "UTF-8", id="invalid_utf8"),
        pytest.param(b'{"event_name": "\xed\xa0\x80"}', "UTF-8", id="encoded_surrogate"),
        pytest.param(b"[" * 100_000, "not valid JSON", id="too_deep_nesting"),
        pytest.param(b'{"load": NaN}', "not valid JSON", id="nan_is_not_json"),
        pytest.param(b'{"load": 1e400}', "not valid JSON", id="number_overflows_to_infinity"),
        pytest.param(b'{"a": 1} {"b": 2}', "not valid JSON", id="two_documents"),
    ],
)
def test_parse_json_rejects_what_is_not_one_json_document(body: bytes, message_part: str) -> None:
    result = parse_json(body)
    assert isinstance(result, Problem)
    assert (result.field, result.code) == ("body", "parameter_invalid")
    assert message_part in result.message


def test_parse_json_huge_integer_becomes_a_float_not_an_error() -> None:
    assert parse_json(b"123456789012345678901234567890") == pytest.approx(1.2345678901234568e29)


def test_parse_ndjson_skips_blank_lines_and_keeps_order() -> None:
    body = b'\n{"a": 1}\r\n   \n\t\r\n[2]\n"three"\n\n'
    assert parse_ndjson(body) == [{"a": 1}, [2], "three"]


def test_parse_ndjson_bad_line_is_a_problem_at_its_index_and_the_rest_still_parse() -> None:
    body = b'{"a": 1}\n\n{"b": \n{"c": 3}\n\xff\n'
    items = parse_ndjson(body)
    assert len(items) == 4
    assert items[0] == {"a": 1}
    assert items[2] == {"c": 3}
    bad_json, bad_utf8 = items[1], items[3]
    assert isinstance(bad_json, Problem) and bad_json.field == "body"
    assert bad_json.message.startswith("line 3 ")
    assert isinstance(bad_utf8, Problem) and bad_utf8.message.startswith("line 5 ")
    assert "UTF-8" in bad_utf8.message


def test_parse_ndjson_of_an_empty_body_is_an_empty_list() -> None:
    assert parse_ndjson(b"") == []
    assert parse_ndjson(b"\n \n") == []


# --- error bodies -------------------------------------------------------------------


def test_problem_as_error_is_intercoms_error_object() -> None:
    problem = Problem("created_at", "created_at looks like milliseconds")
    assert problem.as_error() == {
        "code": "parameter_invalid",
        "message": "created_at looks like milliseconds",
        "field": "created_at",
    }


def test_error_body_is_an_intercom_error_list() -> None:
    problems = validate({"created_at": -1, "user_id": "1"})
    assert isinstance(problems, list)
    assert orjson.loads(error_body(problems)) == {
        "type": "error.list",
        "errors": [
            {
                "code": "parameter_not_found",
                "message": "event_name is required",
                "field": "event_name",
            },
            {
                "code": "parameter_invalid",
                "message": "created_at must be a positive Unix timestamp in seconds, got -1",
                "field": "created_at",
            },
        ],
    }
