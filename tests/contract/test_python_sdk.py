"""The official Python SDK (python-intercom 5.0.1, pinned in pyproject's test extra) as an
app's client of the intake: `Intercom(token=..., base_url=<daemon>)`, then
events.create / events.summaries / events.list, unchanged. The fake Intercom shows what
arrived upstream; the last test sends the same calls on to Prism.

What the SDK sends, read from its source and seen by these tests: POST {base}/events with
the request as JSON; POST {base}/events/summaries with {"user_id", "event_summaries": {...}}
(one object, as the OpenAPI description says); GET {base}/events?type=user&<identity>
[&summary=true|false][&per_page=N]; `Authorization: Bearer <token>`, no Intercom-Version.
Its typed request models declare metadata as Dict[str, str]; a plain dict carries the other
documented types. The sync client runs in a thread so the daemon keeps serving.
"""

from __future__ import annotations

import asyncio

import pytest
from intercom import (
    AsyncIntercom,
    CreateDataEventRequestWithEmail,
    CreateDataEventRequestWithId,
    CreateDataEventRequestWithUserId,
    Intercom,
    UnauthorizedError,
)
from intercom.core.api_error import ApiError
from intercom.events.types import CreateDataEventSummariesRequestEventSummaries

from tests.conftest import TOKEN
from tests.contract.checks import assert_prism_accepted

pytestmark = pytest.mark.contract

NOW = 1_700_000_000
APP_TOKEN = "the-apps-token-never-leaves-the-app"


def sdk(svc) -> Intercom:
    return Intercom(token=APP_TOKEN, base_url=svc.url, timeout=10)


async def test_events_create_with_each_identity_and_metadata_type_arrives_upstream(
        make_service, fake_intercom):
    svc = await make_service()
    client = sdk(svc)
    requests = [
        CreateDataEventRequestWithUserId(user_id="314159", event_name="Invited.Friend",
                                         created_at=NOW, metadata={"source": "desktop"}),
        CreateDataEventRequestWithEmail(email="frodo.baggins@example.com",
                                        event_name="invited-friend", created_at=NOW),
        CreateDataEventRequestWithId(id="8a88a590-e1c3-41e2-a502-e0649dbf721c",
                                     event_name="invited-friend", created_at=NOW),
        {"user_id": "314159", "event_name": "placed-order", "created_at": NOW,
         "metadata": {"order_date": NOW, "load": 3.67, "stripe_invoice": "inv_3434343434",
                      "order_number": {"value": "3434-3434",
                                       "url": "https://example.org/orders/3434-3434"},
                      "price": {"amount": 2999, "currency": "usd"}}},
    ]

    def create_all() -> list[None]:
        return [client.events.create(request=r) for r in requests]

    assert await asyncio.to_thread(create_all) == [None] * 4
    await fake_intercom.wait_for_delivered(4)
    # 32 workers send concurrently: arrival order is not submission order.
    assert sorted(fake_intercom.delivered, key=repr) == sorted([
        {"event_name": "invited-friend", "created_at": NOW, "user_id": "314159",
         "metadata": {"source": "desktop"}},
        {"event_name": "invited-friend", "created_at": NOW,
         "email": "frodo.baggins@example.com"},
        {"event_name": "invited-friend", "created_at": NOW,
         "id": "8a88a590-e1c3-41e2-a502-e0649dbf721c"},
        requests[3],
    ], key=repr)
    assert {r.headers["Authorization"] for r in fake_intercom.requests} == {f"Bearer {TOKEN}"}


async def test_events_summaries_arrives_upstream_as_one_object(make_service, fake_intercom):
    svc = await make_service()
    client = sdk(svc)

    def summarise() -> None:
        client.events.summaries(
            user_id="314159",
            event_summaries=CreateDataEventSummariesRequestEventSummaries(
                event_name="Placed.Order", count=3, first=NOW - 60, last=NOW))
        client.events.summaries(user_id="271828", event_summaries={
            "event_name": "invited-friend", "count": 1, "first": NOW, "last": NOW})

    await asyncio.to_thread(summarise)
    await fake_intercom.wait_for_requests(2)
    sent = sorted((r.path, r.json["user_id"], r.json["event_summaries"])
                  for r in fake_intercom.requests)
    assert sent == [
        ("/events/summaries", "271828",
         {"event_name": "invited-friend", "count": 1, "first": NOW, "last": NOW}),
        ("/events/summaries", "314159",
         {"event_name": "placed-order", "count": 3, "first": NOW - 60, "last": NOW}),
    ]


async def test_events_list_returns_intercoms_listing_through_the_daemon(make_service,
                                                                        fake_intercom):
    svc = await make_service()
    client = sdk(svc)
    await asyncio.to_thread(client.events.create, request={
        "user_id": "314159", "event_name": "invited-friend", "created_at": NOW})
    await fake_intercom.wait_for_delivered(1)

    listing = await asyncio.to_thread(client.events.list, type="user", user_id="314159",
                                      summary=True, per_page=5)
    assert listing.type == "event.list"
    assert [(e.event_name, e.created_at, e.user_id) for e in listing.events] == \
        [("invited-friend", NOW, "314159")]
    await asyncio.to_thread(client.events.list, type="user", email="frodo+ring@example.com")
    reads = [r for r in fake_intercom.requests if r.method == "GET"]
    assert [r.query for r in reads] == [
        {"user_id": "314159", "type": "user", "summary": "true", "per_page": "5"},
        {"email": "frodo+ring@example.com", "type": "user"},
    ]
    assert {r.headers["Authorization"] for r in reads} == {f"Bearer {TOKEN}"}


async def test_the_sdk_raises_its_own_errors_for_the_daemons_400_and_intercoms_401(
        make_service, fake_intercom):
    svc = await make_service()
    client = sdk(svc)
    with pytest.raises(ApiError) as bad:
        await asyncio.to_thread(client.events.create, request={
            "user_id": "1", "event_name": "x", "created_at": "yesterday"})
    assert bad.value.status_code == 400
    assert bad.value.body["errors"][0]["field"] == "created_at"
    with pytest.raises(ApiError) as bad_query:
        await asyncio.to_thread(client.events.list, type="user")
    assert bad_query.value.status_code == 400
    assert bad_query.value.body["errors"][0]["field"] == "user_id"

    fake_intercom.token = "someone-rotated-it"
    with pytest.raises(UnauthorizedError) as refused:
        await asyncio.to_thread(client.events.list, type="user", user_id="1")
    assert refused.value.body.errors[0].code == "unauthorized"


async def test_the_async_client_drives_all_three_endpoints(make_service, fake_intercom):
    svc = await make_service()
    client = AsyncIntercom(token=APP_TOKEN, base_url=svc.url, timeout=10)
    await client.events.create(request={"user_id": "1", "event_name": "a", "created_at": NOW})
    await client.events.summaries(user_id="1", event_summaries={
        "event_name": "a", "count": 2, "first": NOW, "last": NOW})
    await fake_intercom.wait_for_delivered(1)
    listing = await client.events.list(type="user", user_id="1")
    assert [e.event_name for e in listing.events] == ["a"]
    assert sorted((r.method, r.path) for r in fake_intercom.requests) == [
        ("GET", "/events"), ("POST", "/events"), ("POST", "/events/summaries")]


async def test_what_the_sdk_sends_through_the_daemon_prism_accepts(make_service, prism):
    svc = await make_service(upstream_url=prism.url)
    client = AsyncIntercom(token=APP_TOKEN, base_url=svc.url, timeout=10)
    await client.events.create(request=CreateDataEventRequestWithUserId(
        user_id="314159", event_name="invited-friend", created_at=NOW,
        metadata={"invite_code": "ADDAFRIEND"}))
    await client.events.create(request={
        "email": "frodo.baggins@example.com", "event_name": "placed-order",
        "created_at": NOW, "metadata": {"price": {"amount": 34999, "currency": "eur"}}})
    await client.events.summaries(
        user_id="314159", event_summaries=CreateDataEventSummariesRequestEventSummaries(
            event_name="invited-friend", count=1, first=NOW, last=NOW))
    await assert_prism_accepted(svc, sent=3)
    listing = await client.events.list(type="user", intercom_user_id="6762f22b1bb69f9f2193bc12",
                                       summary=False, per_page=2)
    assert listing.type == "event.summary"  # Prism answers the description's example
