"""A tiny stand-in for Intercom's POST /events: answers 202 to every POST, counts them.

The intake benchmark points the daemon's upstream here, so forwarding runs as in
production (paced by the daemon's own rate gate, ~166 requests/s by default) but the sink
itself lives on the load generator's core, not the daemon's.

    python bench/sink.py --port 8401 [--uvloop]

GET /count -> {"requests": n}  (a sanity check that the daemon really forwards)
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
from aiohttp import web


def make_app() -> web.Application:
    count = 0

    async def any_post(request: web.Request) -> web.Response:
        nonlocal count
        await request.read()
        count += 1
        return web.Response(status=202)

    async def get_count(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"requests": count}), content_type="application/json")

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_get("/count", get_count)
    app.router.add_post("/{tail:.*}", any_post)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8401)
    args = parser.parse_args()
    web.run_app(
        make_app(),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=asyncio.new_event_loop(),
    )


if __name__ == "__main__":
    main()
