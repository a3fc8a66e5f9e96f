"""The bare aiohttp handler the intake is measured against.

It does the least an HTTP intake can do: read the body, `orjson.loads` it, answer 202.
No validation, dedup, queue, metrics or logging (access log off), so
daemon rps / baseline rps is the share of aiohttp's own ceiling that the daemon keeps.

    python bench/baseline_server.py --port 8400 [--uvloop]

POST /events        -> 202, empty body (what Intercom itself answers)
POST /events/batch  -> 202, {"accepted": n, "duplicates": 0, "rejected": []}
                       (the same response shape as the daemon's batch route, so both
                       serialise a small JSON body per batch)
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
from aiohttp import web


async def events(request: web.Request) -> web.Response:
    orjson.loads(await request.read())
    return web.Response(status=202)


async def events_batch(request: web.Request) -> web.Response:
    items = orjson.loads(await request.read())
    body = orjson.dumps({"accepted": len(items), "duplicates": 0, "rejected": []})
    return web.Response(status=202, body=body, content_type="application/json")


def make_app() -> web.Application:
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/events", events)
    app.router.add_post("/events/batch", events_batch)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8400)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio")
    args = parser.parse_args()
    loop = None
    if args.uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    web.run_app(
        make_app(),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        handle_signals=True,
        loop=loop,
    )


if __name__ == "__main__":
    main()
