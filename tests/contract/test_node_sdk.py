"""The official Node SDK (intercom-client 7.0.3, pinned in package.json) as an app's client
of the intake: `new IntercomClient({token, baseUrl: <daemon>})`, then events.create /
events.summaries / events.list, unchanged (node_sdk_client.js). One Node process per test
keeps the cost to a fraction of a second.

What it sends, read from its source and seen here: the same paths and bodies as the Python
SDK, plus `Intercom-Version: 2.14` and its `X-Fern-*` headers; list sends `type` and the
identity, `summary` and `per_page` as strings.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.conftest import TOKEN
from tests.contract.checks import assert_prism_accepted

pytestmark = pytest.mark.contract

NOW = 1_700_000_000
NODE_TIMEOUT_S = 60.0


async def run_node(script: Path, daemon_url: str, calls: list[dict], tmp_path: Path
                   ) -> list[dict]:
    calls_file = tmp_path / "calls.json"
    calls_file.write_text(json.dumps(calls))
    proc = await asyncio.create_subprocess_exec(
        "node", str(script), daemon_url, str(calls_file), cwd=script.parent,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), NODE_TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def test_the_node_sdk_drives_all_three_endpoints_through_the_daemon(
        make_service, fake_intercom, node_sdk, tmp_path):
    svc = await make_service()
    results = await run_node(node_sdk, svc.url, [
        {"method": "create", "request": {
            "user_id": "314159", "event_name": "Placed.Order", "created_at": NOW,
            "metadata": {"order_date": NOW, "price": {"amount": 2999, "currency": "usd"},
                         "order_number": {"value": "3434-3434",
                                          "url": "https://example.org/orders/3434-3434"}}}},
        {"method": "create", "request": {
            "id": "8a88a590-e1c3-41e2-a502-e0649dbf721c", "event_name": "invited-friend",
            "created_at": NOW}},
        {"method": "summaries", "request": {
            "user_id": "314159", "event_summaries": {
                "event_name": "placed-order", "count": 3, "first": NOW - 60, "last": NOW}}},
    ], tmp_path)
    assert results == [{"ok": True, "data": None}] * 3
    await fake_intercom.wait_for_delivered(2)
    await fake_intercom.wait_for_requests(3)

    results = await run_node(node_sdk, svc.url, [
        {"method": "list", "request": {"type": "user", "user_id": "314159", "summary": True,
                                       "per_page": 5}},
        {"method": "list", "request": {"type": "user", "email": "frodo+ring@example.com"}},
        {"method": "list", "request": {"type": "user"}},
    ], tmp_path)
    listing, by_email, refused = results
    assert listing["ok"] and [e["event_name"] for e in listing["data"]["events"]] == \
        ["placed-order"]
    assert by_email == {"ok": True, "data": {"type": "event.list", "events": [], "pages": {}}}
    assert refused["ok"] is False and refused["status"] == 400
    assert refused["body"]["errors"][0]["field"] == "user_id"

    assert fake_intercom.delivered[0]["metadata"]["price"] == {"amount": 2999,
                                                               "currency": "usd"}
    [summary] = [r for r in fake_intercom.requests if r.path == "/events/summaries"]
    assert summary.json == {"user_id": "314159", "event_summaries": {
        "event_name": "placed-order", "count": 3, "first": NOW - 60, "last": NOW}}
    reads = [r for r in fake_intercom.requests if r.method == "GET"]
    assert [r.query for r in reads] == [
        {"user_id": "314159", "type": "user", "summary": "true", "per_page": "5"},
        {"email": "frodo+ring@example.com", "type": "user"},
    ]
    assert {r.headers["Authorization"] for r in fake_intercom.requests} == {f"Bearer {TOKEN}"}


async def test_what_the_node_sdk_sends_through_the_daemon_prism_accepts(
        make_service, prism, node_sdk, tmp_path):
    svc = await make_service(upstream_url=prism.url)
    results = await run_node(node_sdk, svc.url, [
        {"method": "create", "request": {
            "email": "frodo.baggins@example.com", "event_name": "invited-friend",
            "created_at": NOW, "metadata": {"invite_code": "ADDAFRIEND", "load": 3.67}}},
        {"method": "summaries", "request": {
            "user_id": "314159", "event_summaries": {
                "event_name": "invited-friend", "count": 1, "first": NOW, "last": NOW}}},
    ], tmp_path)
    assert results == [{"ok": True, "data": None}] * 2
    await assert_prism_accepted(svc, sent=2)
    [listing] = await run_node(node_sdk, svc.url, [
        {"method": "list", "request": {"type": "user",
                                       "intercom_user_id": "6762f22b1bb69f9f2193bc12"}}],
        tmp_path)
    assert listing["ok"], listing
    assert listing["data"]["type"] == "event.summary"
