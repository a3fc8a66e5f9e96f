"""classify() is the only place that maps a status or a network error to an outcome: one
row per rule, named after it (style guide section 5)."""

from __future__ import annotations

import aiohttp
import pytest

from forwarder.upstream import (
    MAX_BODY_BYTES,
    Outcome,
    RateHeaders,
    Verdict,
    classify,
    parse_rate_headers,
)

D, R, RL, DL, P = (
    Outcome.DELIVERED,
    Outcome.RETRY_LATER,
    Outcome.RATE_LIMITED,
    Outcome.DEAD_LETTER,
    Outcome.PAUSE_AUTH,
)


@pytest.mark.parametrize(
    "status, outcome, reason",
    [
        pytest.param(200, D, "delivered", id="200_is_delivered"),
        pytest.param(202, D, "delivered", id="202_accepted_is_delivered"),
        pytest.param(204, D, "delivered", id="any_2xx_is_delivered"),
        pytest.param(401, P, "unauthorized", id="401_pauses_for_auth"),
        pytest.param(403, P, "forbidden", id="403_pauses_for_auth"),
        pytest.param(404, DL, "contact_not_found", id="404_unknown_contact_is_dead_lettered"),
        pytest.param(429, RL, "rate_limited", id="429_is_rate_limited"),
        pytest.param(408, R, "server_error", id="408_request_timeout_is_retried"),
        pytest.param(500, R, "server_error", id="500_is_retried"),
        pytest.param(502, R, "server_error", id="502_is_retried"),
        pytest.param(503, R, "server_error", id="503_is_retried"),
        pytest.param(504, R, "server_error", id="504_is_retried"),
        pytest.param(599, R, "server_error", id="any_5xx_is_retried"),
        pytest.param(400, DL, "rejected", id="400_is_rejected"),
        pytest.param(409, DL, "rejected", id="409_is_rejected"),
        pytest.param(413, DL, "rejected", id="413_is_rejected"),
        pytest.param(422, DL, "rejected", id="422_is_rejected"),
        pytest.param(301, DL, "rejected", id="3xx_is_unexpected_and_rejected"),
        pytest.param(304, DL, "rejected", id="304_is_unexpected_and_rejected"),
        pytest.param(100, DL, "rejected", id="1xx_is_unexpected_and_rejected"),
    ],
)
def test_status_maps_to_outcome(status: int, outcome: Outcome, reason: str) -> None:
    verdict = classify(status, {}, b"body", latency_s=0.25)
    assert (verdict.outcome, verdict.reason, verdict.status) == (outcome, reason, status)
    assert verdict.body == b"body"
    assert verdict.latency_s == 0.25


@pytest.mark.parametrize(
    "error, reason",
    [
        pytest.param(TimeoutError(), "timeout", id="timeout_error_is_retried"),
        pytest.param(aiohttp.ServerTimeoutError("read"), "timeout", id="read_timeout_is_retried"),
        pytest.param(
            aiohttp.ConnectionTimeoutError("connect"), "timeout", id="connect_timeout_is_retried"
        ),
        pytest.param(
            ConnectionRefusedError(111, "refused"), "connection_error", id="refused_is_retried"
        ),
        pytest.param(
            aiohttp.ClientConnectionError("refused"),
            "connection_error",
            id="client_connection_error_is_retried",
        ),
        pytest.param(ConnectionResetError(104, "reset"), "connection_error", id="reset_is_retried"),
        pytest.param(
            aiohttp.ServerDisconnectedError(), "connection_error", id="server_disconnect_is_retried"
        ),
        pytest.param(
            aiohttp.ClientPayloadError("truncated"),
            "connection_error",
            id="truncated_payload_is_retried",
        ),
        pytest.param(OSError(113, "no route"), "connection_error", id="os_error_is_retried"),
    ],
)
def test_network_error_is_retried_later(error: BaseException, reason: str) -> None:
    verdict = classify(None, None, b"", error, latency_s=1.5)
    assert verdict == Verdict(Outcome.RETRY_LATER, reason, latency_s=1.5)


def test_an_error_that_is_not_a_network_problem_is_raised_as_the_bug_it_is() -> None:
    with pytest.raises(KeyError):
        classify(None, None, b"", KeyError("oops"))


def test_no_status_and_no_error_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        classify(None, None, b"")


def test_body_is_cut_to_2048_bytes() -> None:
    verdict = classify(500, {}, b"x" * 5000)
    assert verdict.body == b"x" * MAX_BODY_BYTES and MAX_BODY_BYTES == 2048


def test_429_carries_rate_headers_and_retry_after() -> None:
    headers = {
        "X-RateLimit-Limit": "1666",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "1700000010",
        "Retry-After": "7",
    }
    verdict = classify(429, headers, b"")
    assert verdict.rate == RateHeaders(limit=1666, remaining=0, reset_at=1_700_000_010.0)
    assert verdict.retry_after_s == 7.0


@pytest.mark.parametrize(
    "headers, expected",
    [
        pytest.param({}, None, id="no_headers_is_none"),
        pytest.param({"Content-Type": "application/json"}, None, id="unrelated_headers_is_none"),
        pytest.param(
            {"x-ratelimit-limit": "100", "x-ratelimit-remaining": "5", "x-ratelimit-reset": "17"},
            RateHeaders(100, 5, 17.0),
            id="header_names_are_case_insensitive",
        ),
        pytest.param(
            {"X-RateLimit-Remaining": "5"}, RateHeaders(None, 5, None), id="partial_headers_kept"
        ),
        pytest.param(
            {"X-RateLimit-Limit": "lots", "X-RateLimit-Remaining": "-3", "X-RateLimit-Reset": "x"},
            None,
            id="garbage_everywhere_is_none",
        ),
        pytest.param(
            {"X-RateLimit-Remaining": "4", "X-RateLimit-Reset": "nan"},
            RateHeaders(None, 4, None),
            id="non_finite_reset_is_dropped",
        ),
        pytest.param(
            {"X-RateLimit-Reset": " 1700000010.5 "},
            RateHeaders(None, None, 1_700_000_010.5),
            id="fractional_reset_with_spaces_is_parsed",
        ),
    ],
)
def test_parse_rate_headers(headers: dict[str, str], expected: RateHeaders | None) -> None:
    assert parse_rate_headers(headers) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        pytest.param("12", 12.0, id="seconds"),
        pytest.param("0.5", 0.5, id="fractional_seconds"),
        pytest.param("Wed, 21 Oct 2015 07:28:00 GMT", None, id="http_date_not_supported"),
        pytest.param("-1", None, id="negative_ignored"),
    ],
)
def test_retry_after(value: str, expected: float | None) -> None:
    assert classify(503, {"Retry-After": value}, b"").retry_after_s == expected
