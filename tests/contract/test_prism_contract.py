"""What we accept, Intercom accepts: one request of every documented shape goes through the
daemon to Prism, which mocks Intercom strictly from Intercom's OpenAPI description and
answers 422 with its reasons to anything that breaks it. Any 422 fails the test with
Prism's messages (checks.PrismRejected).

Shapes come from Intercom's pages in ../shared/intercom-docs: the metadata types
(event-metadata-types.md), the identities (event-model.md, "Lead Events"), event-name
normalisation, the 10-key limit (submit-a-data-event.md), create_data_event_summaries_request
and the three list queries of "List all data events".
"""

from __future__ import annotations

import aiohttp
import orjson
import pytest
from yarl import URL

from forwarder.event import Event, Route
from tests.contract.checks import (
    PrismRejected,
    assert_prism_accepted,
    assert_read_accepted,
)

pytestmark = pytest.mark.contract

NOW = 1_700_000_000
BASE = {"event_name": "placed-order", "created_at": NOW, "user_id": "314159"}

EVENTS = [
    pytest.param({**BASE, "metadata": {"source": "desktop"}}, id="metadata-string"),
    pytest.param({**BASE, "metadata": {"load": 3.67, "items": 3}}, id="metadata-number"),
    pytest.param({**BASE, "metadata": {"contact_date": 1392036272}},
                 id="metadata-date-key-ending-_date"),
    pytest.param({**BASE, "metadata": {"paid_at": 1392036272}},
                 id="metadata-date-key-ending-_at"),
    pytest.param({**BASE, "metadata": {"article": "https://example.org/ab1de.html"}},
                 id="metadata-link"),
    pytest.param({**BASE, "metadata": {"article": {"url": "https://example.org/ab1de.html",
                                                   "value": "the dude abides"}}},
                 id="metadata-rich-link"),
    pytest.param({**BASE, "metadata": {"stripe_customer": "cus_42424242424",
                                       "stripe_invoice": "inv_3434343434",
                                       "stripe_charge": "ch_3434343434"}},
                 id="metadata-stripe-data"),
    pytest.param({**BASE, "metadata": {"price": {"amount": 34999, "currency": "eur"}}},
                 id="metadata-monetary-amount"),
    pytest.param({**BASE, "metadata": {"gift": True}}, id="metadata-boolean"),
    pytest.param({**BASE, "metadata": {"order_date": 1392036272,
                                       "stripe_invoice": "inv_3434343434",
                                       "order_number": {
                                           "value": "3434-3434",
                                           "url": "https://example.org/orders/3434-3434"},
                                       "price": {"currency": "usd", "amount": 2999}}},
                 id="metadata-intercoms-own-example"),
    pytest.param({**BASE, "metadata": {"dropped": None, "kept": "x"}},
                 id="metadata-null-value-left-out"),
    pytest.param({**BASE, "metadata": {f"key_{i:02}": i for i in range(12)}},
                 id="metadata-12-keys-trimmed-to-10"),
    pytest.param({"event_name": "invited-friend", "created_at": NOW, "user_id": 314159},
                 id="identity-user_id-as-a-number"),
    pytest.param({"event_name": "invited-friend", "created_at": NOW,
                  "email": "frodo.baggins@example.com"}, id="identity-email"),
    pytest.param({"event_name": "invited-friend", "created_at": NOW,
                  "id": "8a88a590-e1c3-41e2-a502-e0649dbf721c"}, id="identity-lead-id"),
    pytest.param({"event_name": "Placed.Order$Gift", "created_at": NOW, "user_id": "1"},
                 id="name-normalised"),
    pytest.param({"event_name": "invited-friend", "user_id": "1"},
                 id="created_at-stamped-by-the-daemon"),
    pytest.param({**BASE, "app_version": "1.2.3"}, id="unknown-field-left-out"),
]  # fmt: skip

SUMMARY = {"user_id": "314159", "event_summaries": {"event_name": "Placed.Order", "count": 3,
                                                    "first": NOW - 3600, "last": NOW}}


async def send(svc, path: str, body: object) -> int:
    async with aiohttp.ClientSession() as s, s.post(svc.url + path,
                                                    data=orjson.dumps(body)) as r:
        return r.status


async def read(svc_or_url, query: str) -> tuple[int, bytes]:
    base = svc_or_url if isinstance(svc_or_url, str) else svc_or_url.url
    headers = {"Authorization": "Bearer contract-test"}
    async with aiohttp.ClientSession() as s, s.get(URL(f"{base}/events?{query}", encoded=True),
                                                   headers=headers) as r:
        return r.status, await r.read()


@pytest.mark.parametrize("body", EVENTS)
async def test_each_documented_event_shape_is_forwarded_and_prism_accepts_it(
        make_service, prism, body):
    svc = await make_service(upstream_url=prism.url)
    assert await send(svc, "/events", body) == 202
    await assert_prism_accepted(svc, sent=1)


async def test_every_shape_sent_as_one_batch_is_forwarded_and_prism_accepts_them_all(
        make_service, prism):
    bodies = [{**p.values[0], "created_at": NOW + i} for i, p in enumerate(EVENTS)]
    svc = await make_service(upstream_url=prism.url)
    async with aiohttp.ClientSession() as s, s.post(svc.url + "/events/batch",
                                                    data=orjson.dumps(bodies)) as r:
        answer = await r.json()
    assert r.status == 202 and answer["accepted"] == len(bodies), answer
    await assert_prism_accepted(svc, sent=len(bodies))


async def test_a_summaries_request_is_forwarded_and_prism_accepts_it(make_service, prism):
    svc = await make_service(upstream_url=prism.url)
    assert await send(svc, "/events/summaries", SUMMARY) == 200
    await assert_prism_accepted(svc, sent=1)


@pytest.mark.parametrize("query", [
    pytest.param("type=user&user_id=314159", id="user_id"),
    pytest.param("type=user&email=frodo.baggins%40example.com", id="email"),
    pytest.param("type=user&intercom_user_id=6762f22b1bb69f9f2193bc12",
                 id="intercom_user_id"),
    pytest.param("type=user&user_id=314159&summary=true&per_page=5",
                 id="summary-and-per_page"),
])  # fmt: skip
async def test_each_list_query_is_proxied_and_prism_answers_its_example(make_service, prism,
                                                                        query):
    svc = await make_service(upstream_url=prism.url)
    status, body = await read(svc, query)
    assert_read_accepted(status, body, query)
    assert orjson.loads(body)["type"] == "event.summary"  # the description's example


# --- the suite catches what breaks the description -----------------------------------


async def test_a_forwarded_request_that_breaks_the_description_is_reported_with_prisms_message(
        make_service, prism):
    """The deliberately broken case. Steps: put an event whose Monetary Amount is 0 cents
    straight into the daemon's queue (the intake would refuse it with a 400), so the
    workers forward it to Prism. Expect: the same check every test above uses raises
    PrismRejected carrying Prism's own words, and the body that was sent."""
    svc = await make_service(upstream_url=prism.url)
    broken = {**BASE, "metadata": {"price": {"amount": 0, "currency": "usd"}}}
    assert svc.queue.offer(Event(orjson.dumps(broken), b"", Route.EVENTS))
    with pytest.raises(PrismRejected) as caught:
        await assert_prism_accepted(svc, sent=1)
    assert "Request body property metadata.price.amount must be >= 1" in caught.value.messages
    assert "metadata.price must match exactly one schema in oneOf" in str(caught.value)
    assert "'amount': 0" in str(caught.value)


async def test_a_list_query_that_breaks_the_description_is_reported_with_prisms_message(prism):
    """Straight to Prism, since the daemon answers this query 400 itself: two identities
    break the `filter` oneOf. This also shows the conftest's `filter` adaptation leaves
    Prism checking the query."""
    query = "type=user&user_id=1&email=a%40example.com"
    status, body = await read(prism.url, query)
    with pytest.raises(PrismRejected) as caught:
        assert_read_accepted(status, body, query)
    assert ("Request query parameter filter must match exactly one schema in oneOf"
            in caught.value.messages)


@pytest.mark.parametrize("body, field", [
    pytest.param({**BASE, "metadata": {"price": {"amount": 0, "currency": "usd"}}},
                 "metadata.price", id="amount-zero"),
    pytest.param({**BASE, "metadata": {"price": {"amount": 29.99, "currency": "usd"}}},
                 "metadata.price", id="amount-not-integer-cents"),
    pytest.param({**BASE, "metadata": {"tags": ["a", "b"]}}, "metadata.tags",
                 id="metadata-array"),
    pytest.param({**BASE, "metadata": {"order": {"id": {"deep": 1}}}}, "metadata.order",
                 id="metadata-nested-object"),
    pytest.param({**BASE, "metadata": {"article": {"url": "https://example.org", "value": "x",
                                                   "title": "y"}}},
                 "metadata.article", id="rich-link-extra-key"),
    pytest.param({**BASE, "created_at": "yesterday"}, "created_at", id="created_at-not-a-number"),
    pytest.param({"event_name": "a", "created_at": NOW}, "user_id", id="no-identity"),
    pytest.param({**BASE, "user_id": True}, "user_id", id="user_id-boolean"),
])  # fmt: skip
async def test_what_the_intake_refuses_with_a_400_prism_refuses_too(make_service, prism,
                                                                     body, field):
    """The other direction: each body the intake answers 400, sent straight to Prism, gets
    a 422. The daemon is not stricter than Intercom's description on these."""
    svc = await make_service(upstream_url=prism.url)
    async with aiohttp.ClientSession() as s:
        async with s.post(svc.url + "/events", data=orjson.dumps(body)) as r:
            assert r.status == 400
            assert field in [e["field"] for e in (await r.json())["errors"]]
        async with s.post(prism.url + "/events", data=orjson.dumps(body),
                          headers={"Authorization": "Bearer contract-test",
                                   "Content-Type": "application/json"}) as r:
            assert r.status == 422, await r.text()
